/**
 * The daemon's vm.restore and snapshot.delete over a real supervisor and SQLite store, the VM steps faked (handed
 * in): a restore is made for the snapshot's own VMM, and whether the snapshot may go while its restores live follows
 * from what they run on (QEMU: overlays on its layers; Firecracker: copies of its disks).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { fromPromise } from 'xstate';
import { Supervisor } from '../../src/actors/supervisor.js';
import { configSchema } from '../../src/config.js';
import { snapshotHandlers } from '../../src/daemon/handlers/snapshots.js';
import type { DaemonServices } from '../../src/daemon/services.js';
import type { CallContext } from '../../src/rpc/server.js';
import { layout } from '../../src/paths.js';
import { openDb } from '../../src/store/db.js';
import { Store } from '../../src/store/repo.js';
import { SnapshotRepo, type SnapshotMeta } from '../../src/store/snapshots.js';
import { runtime } from '../support/vm-fixtures.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const neverEnding = fromPromise(async ({ signal }) => {
  await new Promise((r) => signal.addEventListener('abort', r));
  return { reason: 'aborted' };
});

function daemon() {
  const home = mkdtempSync(join(tmpdir(), 'bgsh-'));
  dirs.push(home);
  const store = new Store(openDb(join(home, 'banger.db')));
  const steps = {
    prepareDisks: fromPromise(async () => ({ net: { guestIp: '172.30.0.9', tap: 'bgtap9' } })),
    applyWorkSeed: fromPromise(async () => undefined),
    boot: fromPromise(async () => ({ runtime })),
    restore: fromPromise(async () => ({ runtime: { ...runtime, guestIp: '172.30.0.9', tap: 'bgtap9' } })),
    watchVmm: neverEnding,
    stopVmm: fromPromise(async () => undefined),
    applySettings: fromPromise(async () => undefined),
    destroy: fromPromise(async () => undefined),
  };
  const config = configSchema.parse({});
  const l = layout({ BANGER_HOME: home });
  const env = { layout: l, store, config, runner: async () => ({ exitCode: 0, stdout: '', stderr: '' }), log: () => {} };
  const supervisor = new Supervisor(env as never, { run: async () => ({}) }, { steps: steps as never });
  supervisor.start();
  const d = { layout: l, config, store, supervisor, startedAt: Date.now(), stop: async () => {} } as unknown as DaemonServices;
  return { d, store, supervisor, handlers: snapshotHandlers(d) };
}

const call = { signal: new AbortController().signal, progress: () => {} } as unknown as CallContext;

function meta(vmm: 'qemu' | 'firecracker'): SnapshotMeta {
  const disk = vmm === 'firecracker' ? 'img' : 'qcow2';
  return {
    image: 'debian-bookworm', vcpus: 1, memoryMiB: 512, diskBytes: 2 ** 30, accel: vmm === 'firecracker' ? 'kvm' : 'tcg', chain: [],
    root: { file: `root.${disk}`, format: vmm === 'firecracker' ? 'raw' : 'qcow2' }, work: { file: `work.${disk}`, format: vmm === 'firecracker' ? 'raw' : 'qcow2' },
    stateFile: 'state.bin', stateBytes: 1, timings: {}, identityDisk: true, builderVersion: 6, net: 'tap', vmm,
  };
}

describe('vm.restore and snapshot.delete in the daemon', () => {
  it('a Firecracker snapshot restores on Firecracker, and can be deleted while its restore runs (it runs on copies)', async () => {
    const { handlers, store, supervisor } = daemon();
    new SnapshotRepo(store.db).insert({ id: 'snapfc', name: 'fc-base', vmId: 'gone0001', vmName: 'src', createdAt: '2026-12-02T00:00:00Z', meta: meta('firecracker') });
    const view = await handlers['vm.restore']({ snapshot: 'fc-base', name: 'fc-fork' }, call);
    expect(view).toMatchObject({ name: 'fc-fork', state: 'running', vmm: 'firecracker' });
    expect(supervisor.snapshot(view.id).context.spec).toMatchObject({ vmm: 'firecracker', accel: 'kvm', net: 'tap', restore: { snapshotId: 'snapfc', chain: [] } });
    expect(await handlers['snapshot.delete']({ snapshot: 'fc-base' }, call)).toEqual({ deleted: 'fc-base' });
    supervisor.detachAll();
  });

  it('a QEMU snapshot restores on QEMU, and cannot be deleted while its restore runs on its layers: the refusal names it', async () => {
    const { handlers, store, supervisor } = daemon();
    new SnapshotRepo(store.db).insert({ id: 'snapq', name: 'q-base', vmId: 'gone0002', vmName: 'src', createdAt: '2026-12-02T00:00:00Z', meta: meta('qemu') });
    const view = await handlers['vm.restore']({ snapshot: 'q-base', name: 'q-fork' }, call);
    expect(supervisor.snapshot(view.id).context.spec).toMatchObject({ vmm: 'qemu', restore: { snapshotId: 'snapq', chain: ['snapq'] } });
    await expect(handlers['snapshot.delete']({ snapshot: 'q-base' }, call)).rejects.toThrow(/snapshot q-base backs the disks of vm q-fork/);
    supervisor.detachAll();
  });

  it('a Firecracker snapshot from an image before builder 6 is refused before anything is made, naming the builder it needs', async () => {
    const { handlers, store, supervisor } = daemon();
    new SnapshotRepo(store.db).insert({ id: 'snapold', name: 'fc-old', vmId: 'gone0003', vmName: 'src', createdAt: '2026-12-02T00:00:00Z', meta: { ...meta('firecracker'), builderVersion: 5 } });
    await expect(handlers['vm.restore']({ snapshot: 'fc-old', name: 'x' }, call)).rejects.toThrow(/firecracker needs builder 6 and an identity disk/);
    expect(supervisor.ids()).toEqual([]);
    supervisor.detachAll();
  });
});
