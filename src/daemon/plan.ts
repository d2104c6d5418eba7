/**
 * Which VMM, accelerator and network a VM gets: one pure function of what was asked and what the host has.
 * vm.create runs it to decide, and `banger doctor` runs it to say what `--vmm auto --net auto` would pick, so
 * the two cannot disagree. The rules (SPEC "Networking" and "VMMs", README):
 * - net `auto`: tap when the root helper is reachable and either runs as a service or config says
 *   "defaultNet": "tap" (a root daemon's own helper serves an explicit --net tap only); else user.
 * - net `tap` without a reachable helper is refused, naming the fix.
 * - vmm `auto`: Firecracker when its binary is present, KVM is usable and the net is tap; else QEMU.
 * - vmm `firecracker` is honoured even where the KVM probe failed, with a warning (Firecracker's own error
 *   says why if it cannot run); refused when there is no binary, or with user networking.
 * - accel: kvm when the probe says KVM is usable (and BANGER_ACCEL=tcg does not force TCG); else tcg.
 */
import { BangerError } from '../errors.js';
import type { Accel, Net, Vmm } from '../rpc/types.js';

export interface PlanRequest {
  vmm?: 'auto' | Vmm;
  net?: 'auto' | Net;
}

export interface HostCapabilities {
  /** The Firecracker binary banger would run, or the error that says why there is none. */
  firecracker: { binary: string } | { missing: BangerError };
  /** The KVM probe's verdict (a real boot, cached): /dev/kvm opening is not enough. */
  kvm: { usable: boolean; reason: string };
  /** BANGER_ACCEL=tcg: software emulation whatever the probe says. */
  forceTcg: boolean;
  /** Tap networking: the root helper answers (and the daemon has its TAP pool), and how it runs. */
  rootHelper: { reachable: boolean; isService: boolean; why?: string };
  defaultNet: 'user' | 'tap';
}

export interface VmPlan {
  vmm: Vmm;
  accel: Accel;
  net: Net;
  /** Why each choice was made, one line each (accel, net, vmm). */
  why: string[];
  /** Things the user should know: an explicit choice honoured against the host's verdict. */
  warnings: string[];
}

export function planVm(request: PlanRequest, host: HostCapabilities): VmPlan {
  const accel = planAccel(host);
  const net = planNet(request.net ?? 'auto', host);
  const vmm = planVmm(request.vmm ?? 'auto', host, accel.accel, net.net);
  return { vmm: vmm.vmm, accel: accel.accel, net: net.net, why: [accel.why, net.why, vmm.why], warnings: vmm.warnings };
}

function planAccel(host: HostCapabilities): { accel: Accel; why: string } {
  if (host.forceTcg) return { accel: 'tcg', why: 'accel tcg: BANGER_ACCEL=tcg' };
  return host.kvm.usable ? { accel: 'kvm', why: `accel kvm: ${host.kvm.reason}` } : { accel: 'tcg', why: `accel tcg: ${host.kvm.reason}` };
}

function planNet(wanted: 'auto' | Net, host: HostCapabilities): { net: Net; why: string } {
  const helper = host.rootHelper;
  if (wanted === 'user') return { net: 'user', why: 'net user: as asked' };
  if (wanted === 'tap') {
    if (!helper.reachable) {
      throw new BangerError('unsupported', `--net tap needs the root helper, which is not reachable${helper.why ? ` (${helper.why})` : ''}`, 'install and start it (banger system install), run the daemon as root, or use --net user');
    }
    return { net: 'tap', why: 'net tap: as asked' };
  }
  if (!helper.reachable) return { net: 'user', why: `net user: no reachable root helper${helper.why ? ` (${helper.why})` : ''}` };
  if (helper.isService) return { net: 'tap', why: 'net tap: the root helper runs as a service' };
  if (host.defaultNet === 'tap') return { net: 'tap', why: 'net tap: config "defaultNet" is "tap"' };
  return { net: 'user', why: 'net user: the root helper is this daemon\'s own; --net tap or config "defaultNet": "tap" uses it' };
}

function planVmm(wanted: 'auto' | Vmm, host: HostCapabilities, accel: Accel, net: Net): { vmm: Vmm; why: string; warnings: string[] } {
  const fc = host.firecracker;
  if (wanted === 'qemu') return { vmm: 'qemu', why: 'vmm qemu: as asked', warnings: [] };
  if (wanted === 'firecracker') {
    if ('missing' in fc) throw fc.missing;
    if (net === 'user') throw new BangerError('unsupported', 'Firecracker has no user-mode networking', 'use --net tap with the root helper, or --vmm qemu');
    const reason = host.forceTcg ? 'BANGER_ACCEL=tcg' : host.kvm.reason;
    const warnings = accel === 'kvm' ? [] : [`KVM is not usable here (${reason}); starting Firecracker anyway as asked — its own error will say why if it cannot run`];
    return { vmm: 'firecracker', why: `vmm firecracker: as asked (${fc.binary})`, warnings };
  }
  if ('missing' in fc) return { vmm: 'qemu', why: 'vmm qemu: no Firecracker binary', warnings: [] };
  if (accel !== 'kvm') return { vmm: 'qemu', why: 'vmm qemu: Firecracker needs usable KVM', warnings: [] };
  if (net !== 'tap') return { vmm: 'qemu', why: 'vmm qemu: Firecracker needs tap networking', warnings: [] };
  return { vmm: 'firecracker', why: `vmm firecracker: ${fc.binary}, KVM usable, net tap`, warnings: [] };
}
