/** The VM lifecycle: vm.create (planned by planVm), start, stop, restart, delete, set, wait. */
import { parsePublishList, PublishError, type PublishedPort } from '../../rpc/publish.js';
import { join } from 'node:path';
import { BangerError, validateName } from '../../errors.js';
import { gitIdentity } from '../../actors/vm-steps.js';
import { parseSize } from '../../host/disk/disks.js';
import { readManifest, type ImageManifest } from '../../host/image/image.js';
import { DEFAULT_POLICY, normalizeAllowCidr, type IsolationPolicy } from '../../host/net/firewall-rules.js';
import { run } from '../../host/exec/runner.js';
import type { ParamsOf } from '../../rpc/protocol.js';
import type { CallContext, Handlers } from '../../rpc/server.js';
import type { VmView } from '../../rpc/types.js';
import { firecrackerCapability, forceTcg, kvmCapability, rootHelperCapability } from '../capabilities.js';
import { planVm, type HostCapabilities } from '../plan.js';
import type { DaemonServices, HandlerDeps } from '../services.js';
import { newId, vmAccess, type VmAccess } from './vm-access.js';
import type { PoolKind, WarmPool } from '../warm-pool.js';
import { workspaceForCreate } from '../workspace-cache.js';
import { workspaceRequest } from './workspace.js';
import { waitHealthy } from './health.js';

type LifecycleHandlers = Pick<Handlers, 'vm.create' | 'vm.start' | 'vm.stop' | 'vm.restart' | 'vm.delete' | 'vm.set' | 'vm.wait'>;

export function vmHandlers(d: DaemonServices, deps: HandlerDeps): LifecycleHandlers {
  const { supervisor: sup, config } = d;
  const vms = vmAccess(d);
  const { resolveVm, waitState, bootWait } = vms;
  return {
    'vm.create': (p, ctx) => createVm(d, deps, vms, p, ctx, d.warmPool),

    'vm.start': async (p, ctx) => {
      const id = resolveVm(p.vm);
      sup.send(id, { type: 'START' });
      return p.wait === false ? vms.view(id) : waitState(id, ['running'], ctx, bootWait());
    },

    'vm.stop': async (p, ctx) => {
      const id = resolveVm(p.vm);
      sup.send(id, { type: 'STOP' });
      return p.wait === false ? vms.view(id) : waitState(id, ['stopped'], ctx, config.stopTimeoutMs + 30_000);
    },

    'vm.restart': async (p, ctx) => {
      const id = resolveVm(p.vm);
      sup.send(id, { type: 'RESTART' });
      return p.wait === false ? vms.view(id) : waitState(id, ['running'], ctx, bootWait() + config.stopTimeoutMs);
    },

    'vm.delete': async (p, ctx) => {
      const id = resolveVm(p.vm);
      const before = vms.view(id);
      sup.send(id, { type: 'DELETE' });
      if (p.wait !== false) await waitState(id, ['deleted'], ctx, 120_000);
      return { ...before, state: 'deleted' };
    },

    'vm.set': async (p, ctx) => {
      const id = resolveVm(p.vm);
      const cur = vms.view(id);
      const diskBytes = p.disk === undefined ? undefined : typeof p.disk === 'number' ? p.disk : parseSize(p.disk);
      if (p.vcpus === undefined && p.memoryMiB === undefined && diskBytes === undefined) {
        throw new BangerError('usage', 'nothing to set', 'give --vcpus, --memory or --disk');
      }
      if (diskBytes !== undefined && diskBytes < cur.diskBytes) {
        throw new BangerError('usage', `disks only grow: ${cur.name}'s work disk is ${cur.diskBytes} bytes, asked for ${diskBytes}`, 'give a size at least as large as the current one');
      }
      sup.send(id, { type: 'SET', vcpus: p.vcpus, memoryMiB: p.memoryMiB, diskBytes });
      const v = await waitState(id, ['stopped'], ctx, 300_000);
      if (v.error?.stage === 'reconfiguring') throw new BangerError('host', `vm set failed: ${v.error.message}`);
      return v;
    },

    'vm.wait': async (p, ctx) => {
      const id = resolveVm(p.vm);
      const timeoutMs = p.timeoutMs ?? bootWait();
      if (p.state !== 'healthy') return waitState(id, [p.state], ctx, timeoutMs);
      const deadline = Date.now() + timeoutMs;
      await waitState(id, ['running'], ctx, timeoutMs);
      await waitHealthy(d, id, Math.max(1, deadline - Date.now()), ctx.signal);
      return vms.view(id);
    },
  };
}

/** The warm pool's VMs: of the pool's kind, marked as pooled, booted in the background (not waited for). */
export async function createPoolVm(d: DaemonServices, deps: HandlerDeps, kind: PoolKind, key: string): Promise<void> {
  const quiet: CallContext = { progress: () => {}, signal: new AbortController().signal } as unknown as CallContext;
  const name = `pool-${newId().slice(0, 6)}`;
  await createVm(d, deps, vmAccess(d), { name, image: kind.image, vcpus: kind.vcpus, memoryMiB: kind.memoryMiB, vmm: 'qemu', net: 'user', wait: false }, quiet, undefined, { key });
}

/**
 * A request the warm pool can serve: defaults for disk, VMM and network, booted, and nothing decided at create
 * that a pooled VM was made without (published ports, a workspace, a tap policy).
 */
export function poolKindOf(d: DaemonServices, p: ParamsOf<'vm.create'>): PoolKind | undefined {
  if (p.start === false || p.disk !== undefined || (p.vmm && p.vmm !== 'auto' && p.vmm !== 'qemu') || (p.net && p.net !== 'auto' && p.net !== 'user')) return undefined;
  if (p.publish?.length || p.workspace || p.egress !== undefined || p.allowPeers !== undefined || p.allow?.length) return undefined;
  return { image: p.image ?? d.config.defaultImage, vcpus: p.vcpus ?? d.config.defaultVcpus, memoryMiB: p.memoryMiB ?? d.config.defaultMemoryMiB };
}

async function createVm(d: DaemonServices, deps: HandlerDeps, vms: VmAccess, p: ParamsOf<'vm.create'>, ctx: CallContext, pool?: Pick<WarmPool, 'claim'>, pooled?: { key: string }): Promise<VmView> {
  const { store, layout, config } = d;
  const id = newId();
  const name = p.name !== undefined ? validateName('vm', p.name) : `vm-${id.slice(0, 6)}`;
  store.assertNameFree(name);
  const kind = pool && poolKindOf(d, p);
  const claimed = kind && pool.claim(kind, name);
  if (claimed) {
    ctx.progress({ stage: 'warmPool', status: 'info', detail: `a booted ${kind.image} VM from the warm pool` });
    return vms.view(claimed);
  }
  const imageName = validateName('image', p.image ?? config.defaultImage);
  let manifest: ImageManifest;
  try {
    manifest = await readManifest(layout.imageDir(imageName));
  } catch {
    throw new BangerError('not_found', `image ${imageName} is not here`, `banger image pull ${imageName}`);
  }
  const diskBytes = typeof p.disk === 'number' ? p.disk : parseSize(p.disk ?? config.defaultDisk);
  if (diskBytes < 64 * 1024 * 1024) throw new BangerError('usage', `--disk ${p.disk} is too small`, 'the work disk needs at least 64M');
  const publish = publishParam(p.publish);
  const host = await hostFor(d, deps, manifest, imageName, p.net === 'tap' ? 15_000 : 2000);
  const plan = planVm({ vmm: p.vmm, net: p.net }, host);
  refuseIsolationWithoutTap(p, plan.net);
  for (const w of plan.warnings) ctx.progress({ stage: 'plan', status: 'info', detail: `warning: ${w}` });
  const accelWhy = host.forceTcg ? 'BANGER_ACCEL=tcg' : host.kvm.reason;
  ctx.progress({ stage: 'plan', status: 'info', detail: `${plan.vmm} ${plan.accel} (${accelWhy}), net ${plan.net}` });
  const spec = {
    image: imageName,
    vcpus: p.vcpus ?? config.defaultVcpus,
    memoryMiB: p.memoryMiB ?? config.defaultMemoryMiB,
    diskBytes,
    vmm: plan.vmm,
    accel: plan.accel,
    net: plan.net,
    start: p.start !== false,
    bootTimeoutMs: config.bootTimeoutMs,
    stopTimeoutMs: config.stopTimeoutMs,
    gitIdentity: await gitIdentity(run, name),
    ...(plan.net === 'tap' ? { isolation: isolationOf(p) } : p.egress === 'none' ? { isolation: { ...DEFAULT_POLICY, egress: 'none' as const } } : {}),
    ...(pooled ? { pool: pooled } : {}),
    ...(publish.length ? { publish } : {}),
  };
  const workspace = p.workspace ? await workspaceForCreate(d, spec, workspaceRequest(p.workspace)) : undefined;
  if (workspace?.cachedDisk) ctx.progress({ stage: 'plan', status: 'info', detail: `workspace cache hit ${workspace.key.slice(0, 12)}` });
  d.supervisor.create({ id, name, createdAt: new Date().toISOString(), spec: { ...spec, ...(workspace ? { workspace } : {}) } });
  if (p.wait === false) return vms.view(id);
  return vms.waitState(id, p.start === false ? ['stopped'] : ['running'], ctx, vms.bootWait());
}

/** --allow-peers and --allow are enforced by the tap firewall: with user networking they would be ignored. --egress works for both. */
function refuseIsolationWithoutTap(p: ParamsOf<'vm.create'>, net: string): void {
  if (net === 'tap' || (p.allowPeers === undefined && p.allow === undefined)) return;
  throw new BangerError('usage', `--allow-peers and --allow apply to --net tap only (this VM would get net ${net})`, 'add --net tap, or drop those flags');
}

function isolationOf(p: ParamsOf<'vm.create'>): IsolationPolicy {
  return { egress: p.egress ?? DEFAULT_POLICY.egress, allowPeers: p.allowPeers ?? false, allow: [...new Set((p.allow ?? []).map(normalizeAllowCidr))] };
}

/** The --publish values, checked: a bad one is a usage error naming it; a host port taken now is a conflict. */
function publishParam(specs: string[] | undefined): PublishedPort[] {
  try {
    return parsePublishList(specs ?? []);
  } catch (e) {
    if (e instanceof PublishError) throw new BangerError('usage', e.message, e.hint);
    throw e;
  }
}

/** What planVm needs to know, for a VM of this image (whose kernel the KVM probe boots). */
async function hostFor(d: DaemonServices, deps: HandlerDeps, image: ImageManifest, imageName: string, helperTimeoutMs: number): Promise<HostCapabilities> {
  const dir = d.layout.imageDir(imageName);
  const tcg = forceTcg();
  const kvm = tcg ? { usable: false, reason: 'BANGER_ACCEL=tcg' } : await kvmCapability(d, { kernel: join(dir, image.kernel), initrd: image.initrd ? join(dir, image.initrd) : undefined });
  return {
    firecracker: await firecrackerCapability(d, deps),
    kvm,
    forceTcg: tcg,
    rootHelper: await rootHelperCapability(d, helperTimeoutMs),
    defaultNet: d.config.defaultNet,
  };
}
