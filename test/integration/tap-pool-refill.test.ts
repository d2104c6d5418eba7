/**
 * The warm TAP pool against a real helper server (operations recorded, no devices): a lease that queues
 * behind a refill already running still gets the pool refilled (it used to be dropped, leaving the pool one
 * short until the next daemon start made one more); and reconcile deletes only devices this pool made.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { RootHelper } from '../../src/actors/root-helper.js';
import { TapPool, newTapName, ownerTag } from '../../src/actors/tap-pool.js';
import { openDb } from '../../src/store/db.js';
import { startRootHelper, type HelperOps } from '../../src/roothelper/server.js';
import { runInSystem } from '../support/infra.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const me = { uid: process.getuid!(), gid: process.getgid!() };

/** A pool on a helper (recorded operations) whose socket's owner is `me`; the pool learns its tag from the helper. */
async function poolWithHelper() {
  const dir = mkdtempSync(join(tmpdir(), 'bgtp-'));
  const tag = ownerTag(me.uid, dir);
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const taps = new Set<string>();
  const ops: Partial<HelperOps> = {
    // a create takes a moment, as a real one does: a lease can queue behind a refill in progress
    createTap: async (_caller, name) => {
      await new Promise((r) => setTimeout(r, 20));
      taps.add(name);
      return { name, created: true };
    },
    deleteTap: async (_caller, name) => ({ name, deleted: taps.delete(name) }),
    listTaps: async () => ({ taps: [...taps].map((name) => ({ name, up: true })) as never }),
  };
  const server = await startRootHelper({ socketPath: join(dir, 'h.sock'), stateDir: dir, owner: me, ops, log: () => {} });
  cleanups.push(() => server.close());
  const helper = new RootHelper({ socket: join(dir, 'h.sock'), spawnChild: false, stateDir: dir, network: { bridge: 'banger0', cidr: '172.30.0.1/24', nat: false }, log: () => {} });
  cleanups.push(() => helper.stop());
  const pool = new TapPool(openDb(':memory:'), helper, { size: 2, log: () => {} });
  cleanups.push(() => pool.stop());
  cleanups.push(runInSystem(helper, pool));
  return { pool, taps, tag };
}

const idle = (pool: TapPool) => pool.leases().filter((l) => l.vmId === null).length;

describe('tapPool refill and ownership', () => {
  it('a lease queued behind a running refill gets its refill too: the pool is back to its size', async () => {
    const { pool, taps } = await poolWithHelper();
    await pool.refill();
    await pool.lease('vmA'); // kicks a refill, which starts creating one device
    await new Promise((r) => setTimeout(r, 5));
    await pool.lease('vmB'); // queued behind that refill: takes the device it made
    const deadline = Date.now() + 3000;
    while ((idle(pool) < 2 || taps.size < 4) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(idle(pool)).toBe(2);
    expect(taps.size).toBe(4);
  });

  it('names carry the tag; reconcile deletes only tagged strays and leaves other owners\' devices', async () => {
    expect(ownerTag(1000, '/home/a/.banger')).not.toBe(ownerTag(1000, '/home/b/.banger'));
    const { pool, taps, tag } = await poolWithHelper();
    expect(newTapName(tag)).toMatch(new RegExp(`^bgtap${tag}[0-9a-z]{6}$`));
    const mineStray = newTapName(tag);
    const foreign = newTapName(ownerTag(1001, '/home/a/.banger'));
    taps.add(mineStray);
    taps.add(foreign);
    const r = await pool.reconcile(new Map(), true);
    expect(r.deleted).toEqual([mineStray]);
    expect(taps.has(foreign)).toBe(true);
  });

  it('keeps the lease of a VM that exists but has not recorded its TAP yet (a create interrupted after its lease)', async () => {
    const { pool, taps } = await poolWithHelper();
    const { tap } = await pool.lease('vmC');
    let r = await pool.reconcile(new Map(), true, () => ['vmC']);
    expect(r.deleted).toEqual([]);
    expect(pool.leases()).toContainEqual({ tap, vmId: 'vmC' });
    r = await pool.reconcile(new Map(), true, () => []);
    expect(r.deleted).toContain(tap);
    expect(taps.has(tap)).toBe(false);
  });
});
