/**
 * The warm pool against real guests: a pool of size 2 boots two VMs (the only boots of this file). Two concurrent
 * `vm run --rm`s get the two distinct VMs (each prints its own guest's boot id) and return while the deletes go on
 * in the daemon; the daemon is SIGKILLed while both deletes and both refills are under way. After the restart
 * no VM was lost or handed out twice (the refills are still the pool's, the handed-out VMs are gone) and none
 * leaked: no VMM process, no files under vms/, no live DB row or address lease of a handed-out VM.
 *
 * Short states are held open with the daemon's test hook BANGER_TEST_STAGE_DELAY (src/actors/fault-injection.ts):
 * the deletes (so the kill lands during them) and the refills' creating step (so they never boot: no third boot).
 */
import { existsSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { waitUntil } from '../support/wait.js';
import { Banger, describeE2E, pidAlive, vmmPidsFor } from './harness.js';

const KIND = { image: 'debian-bookworm', size: 2, vcpus: 1, memoryMiB: 1024 };
const HELD = 'creating:1200000';

describeE2E('warm pool against real guests', () => {
  let b: Banger;
  const everIds = new Set<string>();
  let pooled: string[] = [];
  let handedOut: Array<{ id: string; name: string; state: string }> = [];

  const vms = async () => (await b.json<Array<{ id: string; name: string; state: string }>>(['vm', 'list'])).map((v) => (everIds.add(v.id), v));
  const pool = async () => (await b.json<{ warmPool: Array<{ ready: number; starting: number }> }>(['daemon', 'status'])).warmPool[0];

  beforeAll(async () => {
    b = await Banger.create();
    writeFileSync(join(b.home, 'config.json'), JSON.stringify({ bootTimeoutMs: 1_200_000, defaultDisk: '2G', warmPool: [KIND] }));
    await b.ok(['daemon', 'start']);
    await waitUntil('the warm pool to have 2 VMs ready', async () => (await pool()).ready === 2, 1_400_000, 2000);
    pooled = (await vms()).map((v) => v.id).sort();
    // The next daemon holds deletes and the refills' creating step open (VMs outlive a daemon stop).
    await b.ok(['daemon', 'stop']);
    b.env.BANGER_TEST_STAGE_DELAY = `deleting:300000,${HELD}`;
  }, 1_500_000);

  afterAll(async () => {
    if (!b) return;
    const pid = b.daemonPid();
    if (pid && pidAlive(pid)) process.kill(pid, 'SIGKILL');
    for (const vmm of vmmPidsFor([...everIds, ...(existsSync(join(b.home, 'vms')) ? readdirSync(join(b.home, 'vms')) : [])])) process.kill(vmm, 'SIGKILL');
    // Not b.cleanup(): a daemon started without the hook would boot the held refills only to delete them.
    rmSync(b.home, { recursive: true, force: true });
    rmSync(b.runDir, { recursive: true, force: true });
  }, 300_000);

  it('hands two concurrent vm runs two distinct pool VMs, and returns before the deletes end', async () => {
    expect(pooled).toHaveLength(2);
    const runs = await Promise.all(
      ['ra', 'rb'].map((name) => b.run(['vm', 'run', '--rm', '--name', name, '--vcpus', '1', '--memory', '1024', '--', 'cat', '/proc/sys/kernel/random/boot_id'], { timeoutMs: 600_000 })),
    );
    for (const r of runs) expect(r.exitCode, r.stderr).toBe(0);
    const bootIds = runs.map((r) => r.stdout.trim());
    expect(bootIds[0]).toMatch(/^[0-9a-f-]{36}$/);
    expect(bootIds[1]).toMatch(/^[0-9a-f-]{36}$/);
    expect(bootIds[0]).not.toBe(bootIds[1]);
    // The deletes are held open: both VMs show as deleting, under the names they were handed out as.
    const list = await vms();
    handedOut = list.filter((v) => v.name === 'ra' || v.name === 'rb');
    expect(handedOut.map((v) => v.state)).toEqual(['deleting', 'deleting']);
    expect(handedOut.map((v) => v.id).sort()).toEqual(pooled);
    expect(await pool()).toMatchObject({ ready: 0 });
  }, 900_000);

  it('a daemon SIGKILL during the hand-outs loses no VM and leaks none', async () => {
    expect(handedOut).toHaveLength(2);
    // The refills start a moment after the hand-outs; the kill lands with both deletes and both refills under way.
    await waitUntil('the two refills to be creating', async () => (await pool()).starting === 2, 60_000, 250);
    const refills = (await vms()).filter((v) => v.state === 'creating').map((v) => v.id).sort();
    expect(refills).toHaveLength(2);
    process.kill(b.daemonPid()!, 'SIGKILL');
    await waitUntil('the daemon to die', () => !pidAlive(b.daemonPid()!), 10_000, 50);
    b.env.BANGER_TEST_STAGE_DELAY = HELD;
    // The next command starts the daemon again: it finishes the deletes and keeps the refills.
    await waitUntil('the handed-out VMs to be deleted', async () => (await vms()).every((v) => v.name !== 'ra' && v.name !== 'rb'), 300_000, 500);
    const after = await vms();
    expect(after.map((v) => v.id).sort()).toEqual(refills);
    expect(await pool()).toMatchObject({ ready: 0, starting: 2 });
    const gone = handedOut.map((v) => v.id);
    expect(vmmPidsFor(gone)).toEqual([]);
    for (const id of gone) expect(existsSync(join(b.home, 'vms', id)), `vms/${id}`).toBe(false);
    const db = new Database(join(b.home, 'banger.db'), { readonly: true, fileMustExist: true });
    try {
      const live = db.prepare(`SELECT id FROM vms WHERE deleted = 0 AND id IN (${gone.map(() => '?').join(',')})`).all(...gone);
      const leases = db.prepare(`SELECT vm_id FROM ip_leases WHERE vm_id IN (${gone.map(() => '?').join(',')})`).all(...gone);
      expect(live).toEqual([]);
      expect(leases).toEqual([]);
    } finally {
      db.close();
    }
  }, 600_000);
});
