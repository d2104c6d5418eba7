/** What this host and daemon can do, gathered for planVm (src/daemon/plan.ts) by vm.create and the doctor. */
import { join } from 'node:path';
import { BangerError } from '../errors.js';
import { resolveFirecrackerBinary } from '../host/vmm/firecracker/firecracker.js';
import { probeKvm } from '../host/vmm/qemu/qemu.js';
import type { HostCapabilities } from './plan.js';
import type { DaemonServices, HandlerDeps } from './services.js';

/** The Firecracker binary, when there is one and this daemon has the driver to run it. */
export async function firecrackerCapability(d: DaemonServices, deps: HandlerDeps): Promise<HostCapabilities['firecracker']> {
  if (!deps.drivers.firecracker) return { missing: new BangerError('unsupported', 'the firecracker VMM driver is not available in this daemon', 'use --vmm qemu') };
  try {
    return { binary: await resolveFirecrackerBinary(d.config.firecrackerBin) };
  } catch (e) {
    return { missing: e instanceof BangerError ? e : new BangerError('not_found', `no Firecracker binary: ${(e as Error).message}`) };
  }
}

/** Tap networking: is the root helper reachable (waiting up to timeoutMs), and does it run as a service? */
export async function rootHelperCapability(d: DaemonServices, timeoutMs: number): Promise<HostCapabilities['rootHelper']> {
  const isService = !!d.helperIsService;
  if (!d.rootHelper || !d.network) return { reachable: false, isService, why: `nothing answers on ${d.helperSocket}` };
  if (await d.rootHelper.reachable(timeoutMs)) return { reachable: true, isService };
  const st = d.rootHelper.state();
  return { reachable: false, isService, why: st.lastError ?? undefined };
}

/** The KVM probe's verdict for this kernel (a real boot with a timeout, cached by the probe). */
export async function kvmCapability(d: DaemonServices, kernel: { kernel: string; initrd?: string }): Promise<HostCapabilities['kvm'] & { cached: boolean }> {
  return probeKvm({ ...kernel, cacheFile: join(d.layout.cache, 'kvm-probe.json'), timeoutMs: d.config.kvmProbeTimeoutMs });
}

export const forceTcg = (env: NodeJS.ProcessEnv = process.env): boolean => env.BANGER_ACCEL === 'tcg';
