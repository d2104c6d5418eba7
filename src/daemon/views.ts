/** The daemon's state as the wire shapes of src/rpc/types.ts: what a client is shown of a VM or an image. */
import { join } from 'node:path';
import type { VmContext, VmSnapshot } from '../machines/vm.machine.js';
import type { ImageManifest } from '../host/image/image.js';
import { DEFAULT_POLICY } from '../host/net/firewall-rules.js';
import type { ImageView, VmState, VmView } from '../rpc/types.js';
import { formatPublish } from '../rpc/publish.js';

const stateOf = (s: { value: unknown }): VmState => (typeof s.value === 'string' ? s.value : Object.keys(s.value as object)[0]) as VmState;

type WorkspaceChild = { getSnapshot(): { context: { queue: unknown[]; current: { kind: string } | null } } };

export function viewOf(s: VmSnapshot): VmView {
  const c: VmContext = s.context;
  const ws = (s.children as Record<string, WorkspaceChild | undefined>).workspace;
  const wsCtx = ws?.getSnapshot().context;
  return {
    id: c.id,
    name: c.name,
    state: stateOf(s),
    image: c.spec.image,
    vmm: c.spec.vmm,
    accel: c.spec.accel,
    net: c.spec.net,
    vcpus: c.spec.vcpus,
    memoryMiB: c.spec.memoryMiB,
    diskBytes: c.spec.diskBytes,
    guestIp: c.runtime?.guestIp ?? c.net?.guestIp ?? null,
    sshPort: c.runtime?.sshPort ?? null,
    pid: c.runtime?.pid ?? null,
    createdAt: c.createdAt,
    error: c.error,
    stopReason: c.stopReason,
    gitIdentity: c.spec.gitIdentity ?? null,
    isolation: c.spec.net === 'tap' ? (c.spec.isolation ?? { ...DEFAULT_POLICY }) : (c.spec.isolation ?? null),
    publish: (c.spec.publish ?? []).map(formatPublish),
    ...(wsCtx ? { workspace: { queued: wsCtx.queue.length, running: wsCtx.current?.kind ?? null } } : {}),
  };
}

/** An image as shown: its files as absolute paths in `dir`, and the VMs that use it. */
export function imageViewOf(name: string, dir: string, m: ImageManifest, usedBy: string[]): ImageView {
  return {
    name,
    createdAt: m.createdAt,
    kernel: join(dir, m.kernel),
    vmlinux: m.vmlinux ? join(dir, m.vmlinux) : null,
    initrd: m.initrd ? join(dir, m.initrd) : null,
    rootfs: join(dir, m.rootfs),
    workSeed: join(dir, m.workSeed),
    sizeBytes: m.sizeBytes,
    packages: m.packages,
    builderVersion: m.builderVersion,
    usedBy,
  };
}
