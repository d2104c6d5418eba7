/** vm.snapshot, vm.restore, vm.fork and snapshot.list/show/delete (QEMU and Firecracker VMs). */
import { readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { BangerError, validateName } from '../../errors.js';
import type { CallContext, Handlers } from '../../rpc/server.js';
import type { SnapshotView, VmView } from '../../rpc/types.js';
import { SnapshotRepo, snapshotDir, type SnapshotRecord } from '../../store/snapshots.js';
import type { DaemonServices } from '../services.js';
import { newId, vmAccess, type VmAccess } from './vm-access.js';
import { assertForkable } from '../../actors/snapshot-steps.js';
import { readLayers, vmFiles } from '../../actors/vm-files.js';
import { readManifest } from '../../host/image/image.js';
import { existsSync } from 'node:fs';

type SnapshotHandlers = Pick<Handlers, 'vm.snapshot' | 'vm.restore' | 'vm.fork' | 'snapshot.list' | 'snapshot.show' | 'snapshot.delete'>;

export function snapshotHandlers(d: DaemonServices): SnapshotHandlers {
  const repo = new SnapshotRepo(d.store.db);
  const vms = vmAccess(d);
  const view = (s: SnapshotRecord) => snapshotView(d, repo, s);
  return {
    'vm.snapshot': async (p, ctx) => view(await takeSnapshot(d, repo, vms, p.vm, { name: p.name, stop: p.stop === true }, ctx)),

    'vm.restore': async (p, ctx) => {
      const snap = repo.find(p.snapshot);
      const name = p.name !== undefined ? validateName('vm', p.name) : `${snap.name}-${newId().slice(0, 4)}`;
      const id = startRestore(d, snap, name);
      return vms.waitState(id, ['running'], ctx, vms.bootWait());
    },

    'vm.fork': async (p, ctx) => {
      const fromVm = d.store.resolveVm(p.source).length > 0;
      if (fromVm) await assertVmForkable(d, vms.resolveVm(p.source));
      const snap = fromVm ? await takeSnapshot(d, repo, vms, p.source, { stop: false, name: undefined }, ctx) : findForkSource(repo, p.source);
      const prefix = validateName('vm', p.namePrefix ?? `${fromVm ? d.store.findVm(p.source).name : snap.name}-fork`);
      const names = Array.from({ length: p.count ?? 1 }, (_, i) => `${prefix}-${i + 1}`);
      for (const n of names) validateName('vm', n);
      for (const n of names) d.store.assertNameFree(n);
      const ids = names.map((n) => startRestore(d, snap, n));
      const forks = await Promise.allSettled(ids.map((id) => vms.waitState(id, ['running'], ctx, vms.bootWait())));
      const failed = forks.flatMap((r, i) => (r.status === 'rejected' ? [`${names[i]}: ${(r.reason as Error).message}`] : []));
      if (failed.length) throw new BangerError('host', `${failed.length} of ${names.length} forks failed: ${failed.join('; ')}`, 'banger vm list shows them; banger vm delete removes them');
      return { snapshot: await view(snap), forks: forks.map((r) => (r as PromiseFulfilledResult<VmView>).value) };
    },

    'snapshot.list': async () => Promise.all(repo.list().map(view)),
    'snapshot.show': async (p) => view(repo.find(p.snapshot)),
    'snapshot.delete': async (p) => {
      const snap = repo.find(p.snapshot);
      const users = repo.users(snap.id);
      const all = [...users.vms.map((n) => `vm ${n}`), ...users.snapshots.map((n) => `snapshot ${n}`), ...(await buildingOn(d, snap.id)).map((n) => `vm ${n} (its next snapshot builds on it)`)];
      if (all.length) {
        throw new BangerError('invalid_state', `snapshot ${snap.name} backs the disks of ${all.join(', ')}`, 'delete those first (banger vm delete / banger snapshot delete), then this snapshot');
      }
      repo.delete(snap.id);
      await rm(snapshotDir(d.layout.home, snap.id), { recursive: true, force: true });
      return { deleted: snap.name };
    },
  };
}

/** A tap VM is refused before its snapshot is taken (see assertForkable): a snapshot changes its disks for good. */
async function assertVmForkable(d: DaemonServices, id: string): Promise<void> {
  const v = d.supervisor.snapshot(id).context;
  const manifest = await readManifest(d.layout.imageDir(v.spec.image)).catch(() => undefined);
  const identityDisk = existsSync(vmFiles(d.layout, id).identityDisk);
  assertForkable({ name: `vm ${v.name}`, net: v.spec.net, vmm: v.spec.vmm, image: v.spec.image, builderVersion: manifest?.builderVersion, identityDisk });
}

/** Live VMs whose last snapshot this is: their next snapshot's layers are rebased onto this one's. */
async function buildingOn(d: DaemonServices, snapshotId: string): Promise<string[]> {
  const names: string[] = [];
  for (const row of d.store.listVms()) {
    const layers = await readLayers(vmFiles(d.layout, row.id));
    if (layers?.base === snapshotId) names.push(row.name);
  }
  return names;
}

/** Asks the VM's actor for a snapshot and waits for it; the snapshot's row exists once it is complete. */
async function takeSnapshot(d: DaemonServices, repo: SnapshotRepo, vms: VmAccess, ref: string, o: { name?: string; stop: boolean }, ctx: CallContext): Promise<SnapshotRecord> {
  const id = vms.resolveVm(ref);
  const v = vms.view(id);
  const snapshotId = newId();
  const name = o.name !== undefined ? validateName('snapshot', o.name) : `${v.name}-${snapshotId.slice(0, 6)}`;
  repo.assertNameFree(name);
  d.supervisor.send(id, { type: 'SNAPSHOT', snapshotId, name, stop: o.stop });
  const after = await vms.waitState(id, ['running', 'stopped', 'failed'], ctx, 600_000);
  const snap = repo.get(snapshotId);
  if (!snap) throw new BangerError('host', `snapshot of vm ${v.name} failed: ${after.error?.message ?? `it is ${after.state}`}`, `see banger vm logs ${v.name}`);
  return snap;
}

/**
 * A new VM from a snapshot: same image, VMM, CPUs and memory, disks on its layers (Firecracker: copies, so it
 * depends on no snapshot once loaded); restored, not booted.
 */
function startRestore(d: DaemonServices, snap: SnapshotRecord, name: string): string {
  assertForkable({ name: `snapshot ${snap.name}`, ...snap.meta });
  d.store.assertNameFree(name);
  const id = newId();
  d.supervisor.create({
    id,
    name,
    createdAt: new Date().toISOString(),
    spec: {
      image: snap.meta.image,
      vcpus: snap.meta.vcpus,
      memoryMiB: snap.meta.memoryMiB,
      diskBytes: snap.meta.diskBytes,
      vmm: snap.meta.vmm ?? 'qemu',
      accel: snap.meta.accel,
      net: snap.meta.net ?? 'user',
      isolation: snap.meta.isolation,
      start: true,
      bootTimeoutMs: d.config.bootTimeoutMs,
      stopTimeoutMs: d.config.stopTimeoutMs,
      gitIdentity: snap.meta.gitIdentity,
      restore: { snapshotId: snap.id, chain: snap.meta.vmm === 'firecracker' ? [] : [snap.id, ...snap.meta.chain] },
    },
  });
  return id;
}

async function snapshotView(d: DaemonServices, repo: SnapshotRepo, s: SnapshotRecord): Promise<SnapshotView> {
  const dir = snapshotDir(d.layout.home, s.id);
  let allocatedBytes = 0;
  for (const f of await readdir(dir).catch(() => [] as string[])) allocatedBytes += await stat(join(dir, f)).then((st) => st.blocks * 512, () => 0);
  return {
    id: s.id,
    name: s.name,
    vmId: s.vmId,
    vmName: s.vmName,
    createdAt: s.createdAt,
    image: s.meta.image,
    vcpus: s.meta.vcpus,
    memoryMiB: s.meta.memoryMiB,
    dir,
    stateBytes: s.meta.stateBytes,
    allocatedBytes,
    timings: s.meta.timings,
    chain: s.meta.chain,
    users: repo.users(s.id),
  };
}

/** A snapshot to fork from, when `source` names no VM: the error names both kinds. */
function findForkSource(repo: SnapshotRepo, source: string) {
  try {
    return repo.find(source);
  } catch (e) {
    if (!(e instanceof BangerError && e.kind === 'not_found')) throw e;
    throw new BangerError('not_found', `no VM and no snapshot named ${JSON.stringify(source)}`, 'banger vm list and banger snapshot list show what can be forked');
  }
}
