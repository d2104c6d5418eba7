/**
 * `banger doctor`: one line per check, ok / warn / fail, and a fix for each that is not ok. What
 * `--vmm auto --net auto` would pick comes from planVm, the same function vm.create decides with.
 */
import { constants, existsSync, statSync, statfsSync } from 'node:fs';
import { access, readdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { run, which } from '../host/exec/runner.js';
import { probeCowStrategies } from '../host/disk/disks.js';
import { readManifest } from '../host/image/image.js';
import { firecrackerVersion, restoresSnapshots, SNAPSHOT_LOAD_MIN_VERSION } from '../host/vmm/firecracker/firecracker.js';
import type { DoctorCheck, DoctorReport } from '../rpc/types.js';
import { firecrackerCapability, forceTcg, kvmCapability, rootHelperCapability } from './capabilities.js';
import { planVm, type HostCapabilities } from './plan.js';
import { errorMessage } from '../errors.js';
import { firewallEntryOf } from '../actors/firewall-sync.js';
import type { VerbResults } from '../roothelper/protocol.js';
import type { DaemonServices, HandlerDeps } from './services.js';
import { versionCheck } from '../version-skew.js';
import { userNetCheck } from './usernet-check.js';

export type Check = DoctorCheck;

export async function runDoctor(d: DaemonServices, deps: HandlerDeps): Promise<DoctorReport> {
  const checks: Check[] = [];
  const add = (c: Check) => checks.push(c);
  const kvm = await kvmCheck(d, add);
  add(await toolCheck('qemu-system-x86_64', 'qemu', 'qemu-system-x86'));
  const firecracker = await firecrackerCapability(d, deps);
  add(
    'binary' in firecracker
      ? { name: 'firecracker', status: kvm.usable ? 'ok' : 'warn', detail: `${firecracker.binary}${kvm.usable ? '' : ' (needs usable KVM, which this host lacks)'}` }
      : { name: 'firecracker', status: 'warn', detail: firecracker.missing.message, fix: firecracker.missing.hint },
  );
  if ('binary' in firecracker) add(await firecrackerSnapshotCheck(firecracker.binary));
  const rootHelper = await rootHelperCapability(d, 5000);
  const host: HostCapabilities = { firecracker, kvm, forceTcg: forceTcg(), rootHelper, defaultNet: d.config.defaultNet };
  const plan = planVm({ vmm: 'auto', net: 'auto' }, host);
  const vmmAuto = plan.vmm === 'firecracker' ? 'firecracker' : `qemu (${plan.accel})`;
  add({ name: 'vmm.auto', status: 'ok', detail: `--vmm auto picks ${vmmAuto}, --net auto picks ${plan.net} (${plan.why.join('; ')})` });
  for (const [tool, pkg] of [['mkfs.ext4', 'e2fsprogs'], ['debugfs', 'e2fsprogs'], ['resize2fs', 'e2fsprogs'], ['ssh-keygen', 'openssh-client'], ['git', 'git']] as const) {
    add(await toolCheck(tool, tool, pkg));
  }
  const mm = await which('mmdebstrap');
  const db = await which('debootstrap');
  add(mm || db ? { name: 'bootstrap', status: 'ok', detail: mm ? `mmdebstrap (${mm})` : `debootstrap (${db})` } : { name: 'bootstrap', status: 'fail', detail: 'neither mmdebstrap nor debootstrap found: images cannot be built', fix: 'apt-get install mmdebstrap' });
  add(await tunCheck());
  add(await userNetCheck(d.config.userNet));
  for (const c of await rootHelperChecks(d, rootHelper.reachable)) add(c);
  add(versionCheck({ daemon: deps, helper: rootHelper.reachable ? await helperRelease(d) : undefined }));
  add(diskCheck(d));
  for (const c of await cowChecks(d)) add(c);
  add(socketCheck(d));
  return { checks, ok: !checks.some((c) => c.status === 'fail'), vmmAuto };
}

/** Whether this Firecracker restores banger's snapshots: its PUT /snapshot/load must take vsock_override (1.16 on). */
export async function firecrackerSnapshotCheck(binary: string): Promise<Check> {
  const v = await firecrackerVersion(binary);
  if (v && restoresSnapshots(v)) return { name: 'firecracker.snapshots', status: 'ok', detail: `Firecracker ${v}: snapshots, restores and forks of Firecracker VMs` };
  const [major, minor] = SNAPSHOT_LOAD_MIN_VERSION;
  const detail = v ? `Firecracker ${v} cannot restore banger's snapshots: its PUT /snapshot/load has no vsock_override` : `${binary} --version did not say which Firecracker it is`;
  return { name: 'firecracker.snapshots', status: 'warn', detail, fix: `install Firecracker ${major}.${minor} or later to restore and fork Firecracker VMs` };
}

async function toolCheck(tool: string, name: string, pkg: string): Promise<Check> {
  const p = await which(tool);
  return p ? { name, status: 'ok', detail: p } : { name, status: 'fail', detail: `${tool} not found`, fix: `apt-get install ${pkg}` };
}

/** KVM: present, and does it really boot a stock kernel? Adds its check; returns the verdict planVm gets. */
async function kvmCheck(d: DaemonServices, add: (c: Check) => void): Promise<HostCapabilities['kvm']> {
  if (!existsSync('/dev/kvm')) {
    add({ name: 'kvm', status: 'warn', detail: '/dev/kvm is absent: VMs run under software emulation (QEMU TCG), ~10x slower to boot', fix: 'enable virtualisation (VT-x/AMD-V) or nested virtualisation, and load kvm_intel/kvm_amd' });
    return { usable: false, reason: '/dev/kvm is absent' };
  }
  const kernel = await anyImageKernel(d);
  if (!kernel) {
    add({ name: 'kvm', status: 'warn', detail: '/dev/kvm is present, but no image kernel is available to probe it with', fix: 'banger image pull debian-bookworm, then run doctor again' });
    return { usable: false, reason: 'no image kernel to probe /dev/kvm with' };
  }
  const v = await kvmCapability(d, kernel);
  add(
    v.usable
      ? { name: 'kvm', status: 'ok', detail: `/dev/kvm present and usable: ${v.reason}${v.cached ? ' (cached)' : ''}` }
      : { name: 'kvm', status: 'warn', detail: `/dev/kvm is present but not usable for a stock kernel: ${v.reason}${v.cached ? ' (cached verdict)' : ''}; QEMU on TCG will be used`, fix: 'on a nested host, enable nested virtualisation properly; otherwise nothing to do (TCG works, slower)' },
  );
  return v;
}

/** The kernel of the first image (by name) there is, to probe KVM with. */
async function anyImageKernel(d: DaemonServices): Promise<{ kernel: string; initrd?: string } | undefined> {
  let names: string[];
  try {
    names = (await readdir(d.layout.imagesDir)).sort();
  } catch {
    return undefined; // no images dir
  }
  for (const n of names) {
    const dir = d.layout.imageDir(n);
    try {
      const m = await readManifest(dir);
      return { kernel: join(dir, m.kernel), initrd: m.initrd ? join(dir, m.initrd) : undefined };
    } catch {
      /* not an image */
    }
  }
  return undefined;
}

async function tunCheck(): Promise<Check> {
  try {
    await access('/dev/net/tun', constants.R_OK | constants.W_OK);
    return { name: 'tun', status: 'ok', detail: '/dev/net/tun is usable' };
  } catch {
    return { name: 'tun', status: 'warn', detail: '/dev/net/tun is missing or not accessible: tap networking cannot work', fix: 'modprobe tun' };
  }
}

/** The release the helper runs; null when it is too old to say (it predates the ping's release field). */
async function helperRelease(d: DaemonServices): Promise<{ version: string } | null | undefined> {
  try {
    const p = await d.rootHelper?.request('ping', {}, { timeoutMs: 3000 });
    return p ? (p.release ? { version: p.release } : null) : undefined;
  } catch {
    return undefined;
  }
}

async function rootHelperChecks(d: DaemonServices, reachable: boolean): Promise<Check[]> {
  const { config } = d;
  if (!d.rootHelper) {
    const off = process.env.BANGER_ROOT_HELPER === 'off';
    return [{
      name: 'root-helper',
      status: 'warn',
      detail: `${off ? 'the root helper is disabled (BANGER_ROOT_HELPER=off)' : `no root helper: nothing answers on ${d.helperSocket} and the daemon is not root`}; --net auto uses QEMU user-mode networking`,
      fix: off ? 'unset BANGER_ROOT_HELPER and restart the daemon' : 'sudo banger system install --enable, or run the daemon as root',
    }];
  }
  if (!reachable) {
    const st = d.rootHelper.state();
    return [{ name: 'root-helper', status: 'fail', detail: `not reachable on ${d.helperSocket}: ${st.lastError ?? st.state}`, fix: 'sudo systemctl start banger-roothelper, or check the daemon log' }];
  }
  const r = await run('ip', ['-j', 'link', 'show', 'dev', config.bridge], { reject: false });
  const idle = d.tapPool?.leases().filter((l) => l.vmId === null).length ?? 0;
  return [
    { name: 'root-helper', status: 'ok', detail: `reachable on ${d.helperSocket}${d.helperIsService ? ' (a service); --net auto uses tap' : ' (run by this root daemon); --net tap works, --net auto stays on user networking unless config "defaultNet": "tap"'}` },
    r.exitCode === 0 ? { name: 'bridge', status: 'ok', detail: `${config.bridge} exists (subnet ${config.subnet}${config.nat ? ', NAT on' : ''})` } : { name: 'bridge', status: 'warn', detail: `${config.bridge} does not exist yet (made on the first tap VM)`, fix: 'banger vm create --net tap' },
    { name: 'tap-pool', status: 'ok', detail: `${idle} idle TAP device(s) warm of ${config.tapPoolSize}` },
    await firewallCheck(d),
  ];
}

/** The tap guests' isolation in force: the helper's tables and the VMs they cover, against this daemon's tap VMs. */
async function firewallCheck(d: DaemonServices): Promise<Check> {
  let st: VerbResults['firewall.status'];
  try {
    st = await d.rootHelper!.request('firewall.status', {}, { timeoutMs: 10_000 });
  } catch (e) {
    return { name: 'firewall', status: 'fail', detail: `the root helper did not say which isolation is in force: ${errorMessage(e)}`, fix: 'update and restart the root helper (banger system install)' };
  }
  const mine = d.supervisor.ids().flatMap((id) => firewallEntryOf(d.supervisor.snapshot(id).context) ?? []);
  const covered = new Set(st.vms.map((v) => v.tap));
  const missing = mine.filter((v) => !covered.has(v.tap) || !st.installed);
  if (missing.length) {
    return { name: 'firewall', status: 'fail', detail: `tap VM(s) without isolation: ${missing.map((v) => `${v.tap} ${v.ip}`).join(', ')}`, fix: 'restart the daemon (it registers every tap VM with the helper)' };
  }
  if (!st.installed) return { name: 'firewall', status: 'ok', detail: 'no tap VM: no rules installed (they come with the first tap VM)' };
  const policies = st.vms.map((v) => `${v.ip} egress ${v.egress}${v.allowPeers ? ', peers' : ''}${v.allow.length ? `, allow ${v.allow.join(' ')}` : ''}`);
  return { name: 'firewall', status: 'ok', detail: `nftables tables inet/bridge banger in force for ${st.vms.length} tap VM(s): no host, private ranges or other VMs unless allowed (${policies.join('; ')})` };
}

function diskCheck(d: DaemonServices): Check {
  const home = d.layout.home;
  try {
    const s = statfsSync(home);
    const gib = (s.bavail * s.bsize) / 2 ** 30;
    return gib >= 5 ? { name: 'disk', status: 'ok', detail: `${gib.toFixed(1)} GiB free in ${home}` } : { name: 'disk', status: gib >= 2 ? 'warn' : 'fail', detail: `only ${gib.toFixed(1)} GiB free in ${home}`, fix: 'free space or set BANGER_HOME elsewhere' };
  } catch (e) {
    return { name: 'disk', status: 'fail', detail: `cannot stat ${home}: ${(e as Error).message}` };
  }
}

async function cowChecks(d: DaemonServices): Promise<Check[]> {
  try {
    const probed = await probeCowStrategies(d.layout.vmsDir);
    return [
      ...probed.map((c): Check => ({ name: `cow.${c.strategy}`, status: c.ok ? 'ok' : 'warn', detail: c.why })),
      ...workspaceCloneChecks(probed),
    ];
  } catch (e) {
    return [{ name: 'cow', status: 'warn', detail: `could not probe copy-on-write strategies: ${(e as Error).message}` }];
  }
}

/**
 * How a workspace cache hit gets the cached work disk, strategy by strategy: a QEMU VM on an image with an identity
 * disk, a qcow2 overlay on a hard link of it (constant time); else a reflink where the filesystem has it, else a
 * full (sparse) copy, which the create or prepare output warns about.
 */
function workspaceCloneChecks(probed: Awaited<ReturnType<typeof probeCowStrategies>>): Check[] {
  const reflink = probed.find((c) => c.strategy === 'reflink');
  const copy = probed.find((c) => c.strategy === 'sparse-copy');
  const overlay = probed.find((c) => c.strategy === 'qcow2-overlay');
  return [
    { name: 'workspace.qcow2-overlay', status: overlay?.ok ? 'ok' : 'warn', detail: overlay?.ok ? 'QEMU VMs on images with an identity disk: a hard link of the cached work disk under a qcow2 overlay, constant time' : `not available: ${overlay?.why ?? 'not probed'}` },
    { name: 'workspace.reflink', status: reflink?.ok ? 'ok' : 'warn', detail: reflink?.ok ? 'workspace cache hits of other VMs (Firecracker, older images) clone the cached work disk instantly' : `not available: ${reflink?.why ?? 'not probed'}` },
    { name: 'workspace.full-copy', status: copy?.ok ? 'ok' : 'fail', detail: copy?.ok ? `the fallback${reflink?.ok ? '' : ' in use here'} where there is no overlay: a hit copies the cached disk\'s data (the prepare output warns)` : `cannot copy disks: ${copy?.why ?? 'not probed'}` },
  ];
}

function socketCheck(d: DaemonServices): Check {
  const socket = d.layout.socket;
  try {
    const mode = statSync(socket).mode & 0o777;
    const dmode = statSync(dirname(socket)).mode & 0o777;
    return mode === 0o600 && dmode === 0o700 ? { name: 'socket', status: 'ok', detail: `${socket} mode 0600 in a 0700 directory` } : { name: 'socket', status: 'fail', detail: `${socket} has mode ${mode.toString(8)} (dir ${dmode.toString(8)})`, fix: 'restart the daemon: banger daemon stop; banger daemon start' };
  } catch (e) {
    return { name: 'socket', status: 'fail', detail: `cannot stat the daemon socket: ${(e as Error).message}` };
  }
}
