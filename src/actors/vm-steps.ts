/**
 * A VM's own lifecycle steps over the host layer: its disks, boot, watch, stop, settings and delete (steps.ts makes
 * them the machine's actors). Each is idempotent: a restored actor re-runs the step that was in flight when the
 * daemon died, so every step first looks at what is already there.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BangerError, errorMessage } from '../errors.js';
import { Files, type Layout } from '../paths.js';
import type { Config } from '../config.js';
import type { Store } from '../store/repo.js';
import type { BootOutput, GitIdentity, PrepareDisksOutput, VmContext, WatchOutput } from '../machines/vm.machine.js';
import { which, type Runner } from '../host/exec/runner.js';
import { generateHostKey, type UserKey } from '../host/guest/keys.js';
import { waitForSsh, type SshTarget } from '../host/guest/ssh.js';
import type { SshPool } from '../host/guest/pool.js';
import { capWhile, readTail, rotatedPath } from '../host/guest/serial.js';
import { passtFiles, stopPasst } from '../host/net/passt.js';
import { checkHostPortsFree, startPortProxies } from '../host/net/publish.js';
import { sleep } from '../host/exec/wait.js';
import { formatPublish } from '../rpc/publish.js';
import { findFreePort, identifyPid, qmpSocketPath, type LaunchSpec, type VmmDriver, type VmmProcess } from '../host/vmm/qemu/qemu.js';
import { FirecrackerFiles, firecrackerId } from '../host/vmm/firecracker/firecracker.js';
import { cloneWorkDisk } from '../host/disk/work-disk-clone.js';
import { CACHED_BASE_NAME, cloneDisk, createWorkDisk, growDisk, overlayDisk, overlayOnCachedDisk, type NetworkConfig } from '../host/disk/disks.js';
import { customizeRootDisk, writeIdentityDisk } from '../host/disk/identity-disk.js';
import { workDiskFromTemplate } from '../host/disk/work-disk-template.js';
import { IDENTITY_MARKER_BUILDER, readManifest, type ImageManifest } from '../host/image/image.js';
import { ensureFreeSpace } from '../host/disk/space.js';
import { Cleanups } from '../host/exec/cleanups.js';
import { macForVm } from '../host/net/net.js';
import { testStageDelay } from './fault-injection.js';
import { readLayers, vmFiles, writeLayers, type VmFiles } from './vm-files.js';

const KERNEL_CMDLINE = 'console=ttyS0 root=/dev/vda rw panic=-1 quiet';

export interface NetworkProvider {
  /** Lease what the VM needs on the network (TAP + address); idempotent per VM. */
  acquire(ctx: VmContext, signal: AbortSignal): Promise<{ guestIp?: string; gateway?: string; dns?: string[]; prefix?: number; tap?: string }>;
  release(vmId: string): Promise<void>;
}

export interface StepEnv {
  layout: Layout;
  store: Store;
  config: Config;
  runner: Runner;
  userKey(): Promise<UserKey>;
  driver(kind: VmContext['spec']['vmm']): VmmDriver;
  network?: NetworkProvider;
  /** The daemon's SSH connections to running guests, keyed by sshKey(): shared by boot, workspace jobs and guest commands. */
  ssh: SshPool;
  /** Lifecycle log: every stage with its duration. */
  log(vmId: string, stage: string, status: 'start' | 'done' | 'error' | 'info', ms?: number, message?: string): void;
}

/** A VM's key in the SSH pool: its id and its VMM's pid, so a restarted VM never gets the old process's connections. */
export const sshKey = (vmId: string, pid: number): string => `${vmId}#${pid}`;

/** Run one named stage, logging its start, its end and how long it took. */
export async function stage<T>(env: StepEnv, vmId: string, name: string, fn: () => Promise<T>, doneMessage?: (r: T) => string | undefined): Promise<T> {
  const t0 = performance.now();
  env.log(vmId, name, 'start');
  try {
    const r = await fn();
    env.log(vmId, name, 'done', Math.round(performance.now() - t0), doneMessage?.(r));
    return r;
  } catch (e) {
    env.log(vmId, name, 'error', Math.round(performance.now() - t0), errorMessage(e));
    throw e;
  }
}

async function imageOf(env: StepEnv, name: string): Promise<ImageManifest & { dir: string }> {
  const dir = env.layout.imageDir(name);
  const m = await readManifest(dir);
  return { ...m, dir };
}

/** The guest's address for SSH: forwarded loopback port (user networking) or its bridge address (tap). */
export async function sshTargetFor(env: StepEnv, ctx: Pick<VmContext, 'id' | 'name'>, rt: { sshPort?: number; guestIp?: string }): Promise<SshTarget> {
  const key = await env.userKey();
  const files = vmFiles(env.layout, ctx.id);
  const hostPublicKey = (await readFile(files.hostKeyPub, 'utf8')).trim();
  if (rt.guestIp) return { host: rt.guestIp, port: 22, privateKey: key.privateKey, hostPublicKey, label: ctx.name };
  if (!rt.sshPort) throw new BangerError('invalid_state', `vm ${ctx.name} has no SSH address`, 'start it first: banger vm start ' + ctx.name);
  return { host: '127.0.0.1', port: rt.sshPort, privateKey: key.privateKey, hostPublicKey, label: ctx.name };
}

/** The default guest identity where the host has none: says where it came from, and `.invalid` cannot be mailed. */
export const defaultGitIdentity = (vmName: string) => ({ name: 'banger guest', email: `root@${vmName}.banger.invalid` });

/**
 * The git identity a VM's guest gets: the host's (`git config --global`, as the daemon's user) where it has both
 * halves, else the default for whatever half is missing (source 'default': the guest's .gitconfig says so).
 */
export async function gitIdentity(runner: Runner, vmName: string): Promise<GitIdentity> {
  const get = async (k: string) => {
    const r = await runner('git', ['config', '--global', '--get', k], { reject: false }).catch(() => undefined);
    return r && r.exitCode === 0 ? r.stdout.trim() || undefined : undefined;
  };
  const [name, email] = await Promise.all([get('user.name'), get('user.email')]);
  if (name && email) return { name, email, source: 'host' };
  const fallback = defaultGitIdentity(vmName);
  return { name: name ?? fallback.name, email: email ?? fallback.email, source: 'default' };
}

/**
 * Waits until the guest's serial console shows a login prompt (systemd starts a getty on the kernel's console once
 * the guest reached multi-user, its network configured), reading only the log's tail. A guest that prints one
 * early only hurts its own boot. Throws when the deadline passes or the VMM is gone.
 */
export async function waitForLoginPrompt(
  serialLog: string,
  deadline: number,
  opts: { signal?: AbortSignal; isAlive?: () => Promise<boolean>; everyMs?: number } = {},
): Promise<void> {
  for (;;) {
    const { text } = await readTail(serialLog, 8 * 1024);
    if (LOGIN_PROMPT_RE.test(text)) return;
    if (opts.isAlive && !(await opts.isAlive())) throw new BangerError('host', 'the VMM exited before the guest reached its login prompt');
    if (Date.now() >= deadline) throw new BangerError('timeout', 'the guest did not reach its login prompt on the serial console in time');
    await sleep(Math.min(opts.everyMs ?? 500, Math.max(0, deadline - Date.now())), opts.signal);
  }
}

/** A getty's prompt at the end of a line: `<hostname> login: `. */
const LOGIN_PROMPT_RE = /(^|\n)\S+ login: *$/m;

async function serialTail(path: string, lines = 25): Promise<string> {
  try {
    const { text } = await readTail(path, 64 * 1024);
    if (!text) return '(no serial output)';
    return text.replace(/\r/g, '').split('\n').filter(Boolean).slice(-lines).join('\n');
  } catch {
    return '(no serial output)';
  }
}

interface VmmState {
  pid: number;
  control: string;
  sshPort?: number;
  guestIp?: string;
  tap?: string;
}

async function readVmmState(path: string): Promise<VmmState | undefined> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as VmmState;
  } catch {
    return undefined;
  }
}

/** The TCP proxies of a tap VM's published ports (none for user net: passt forwards those). */
async function openTapProxies(env: StepEnv, ctx: VmContext) {
  const ports = ctx.spec.publish ?? [];
  const guestIp = ctx.runtime?.guestIp ?? ctx.net?.guestIp;
  if (ctx.spec.net !== 'tap' || !ports.length || !guestIp) return undefined;
  const proxies = await startPortProxies(ports, guestIp);
  env.log(ctx.id, 'publish', 'info', undefined, `${ports.map(formatPublish).join(' ')} → ${guestIp}`);
  return proxies;
}

/** Is this VMM process still ours and alive? QEMU: by its command line; others: by the driver's status. */
async function alive(driver: VmmDriver, proc: VmmProcess): Promise<boolean> {
  if (driver.kind === 'qemu') return (await identifyPid(proc.pid, proc.qmpSocket)).id === 'ours';
  return (await driver.status(proc)).state !== 'gone';
}

/**
 * The VMM of this VM when no vmm.json says so (the daemon died, or a write failed, between the VMM starting and
 * vmm.json being written): the pid file in the VM directory (QEMU writes it as it daemonizes, the Firecracker
 * driver right after the spawn), and the control socket this VM's id gives, which the process's command line
 * must name (so a reused pid is never taken for it). Undefined when there is none alive.
 */
async function vmmByPidFile(env: StepEnv, ctx: Pick<VmContext, 'id' | 'spec'>, driver: VmmDriver): Promise<VmmProcess | undefined> {
  const text = await readFile(join(vmFiles(env.layout, ctx.id).dir, Files.vmmPid), 'utf8').catch(() => '');
  const pid = Number.parseInt(text.trim(), 10);
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  const control =
    driver.kind === 'qemu' ? qmpSocketPath(env.layout.run, ctx.id) : join(env.layout.run, FirecrackerFiles.apiSocket(firecrackerId(ctx.id)));
  const proc = { pid, qmpSocket: control };
  return (await alive(driver, proc)) ? proc : undefined;
}

/** The VMM this VM has, from its runtime, else vmm.json, else the pid file; undefined when none is alive. */
export async function findVmm(env: StepEnv, ctx: VmContext, driver: VmmDriver): Promise<VmmProcess | undefined> {
  const st = ctx.runtime ? { pid: ctx.runtime.pid, control: ctx.runtime.control } : await readVmmState(vmFiles(env.layout, ctx.id).vmmState);
  if (st) {
    const proc = { pid: st.pid, qmpSocket: st.control };
    if (await alive(driver, proc)) return proc;
  }
  return vmmByPidFile(env, ctx, driver);
}

/**
 * A VMM already running for this VM as vmm.json records it is adopted (resumed if it is paused, e.g. by a full
 * disk: `cont` retries the writes that failed). One only the pid file knows (its launch never finished, so its
 * SSH port is unknown) is killed, so the launch that follows does not collide with it.
 */
async function adoptVmm(env: StepEnv, ctx: VmContext, driver: VmmDriver): Promise<{ proc: VmmProcess; sshPort?: number } | undefined> {
  const prev = await readVmmState(vmFiles(env.layout, ctx.id).vmmState);
  const recorded = prev ? { pid: prev.pid, qmpSocket: prev.control } : undefined;
  if (recorded && (await alive(driver, recorded))) {
    env.log(ctx.id, 'vmm.adopt', 'info', undefined, `pid ${recorded.pid}`);
    const st = await driver.status(recorded);
    if (st.state === 'paused' && driver.resume) {
      await stage(env, ctx.id, 'vmm.resume', () => driver.resume!(recorded), () => st.reasons.join('; '));
    }
    return { proc: recorded, sshPort: prev!.sshPort };
  }
  const orphan = await vmmByPidFile(env, ctx, driver);
  if (orphan) {
    await stage(env, ctx.id, 'vmm.kill', () => driver.kill(orphan), () => `pid ${orphan.pid}: left by a launch that did not finish`);
  }
  return undefined;
}

/**
 * Free space a create needs in the VM directory, checked before anything is written. The root disk: a sparse
 * copy takes what the image's rootfs takes on disk (its allocated blocks; a reflink takes almost nothing, but
 * whether one works is only known by trying). The work disk: a sparse file of the VM's disk size with a lazily
 * initialised ext4 (no inode tables or journal written) and the seed's files in it: the seed's allocated blocks,
 * plus the metadata mkfs writes anyway (bitmaps, group descriptors, superblock copies: well under 1/256 of the
 * size), plus 64 MiB for the host key, logs and headroom.
 */
async function createNeedsBytes(rootfs: string | undefined, seed: string | undefined, diskBytes: number): Promise<number> {
  const allocated = async (p: string | undefined) => (p ? await stat(p).then((s) => Math.min(s.size, s.blocks * 512), () => 0) : 0);
  return (await allocated(rootfs)) + (seed ? (await allocated(seed)) + Math.ceil(diskBytes / 256) : 0) + 64 * 2 ** 20;
}

/**
 * How this VM's root disk is made. A qcow2 overlay (constant time) for QEMU when the image applies its identity
 * from an identity disk (debugfs cannot edit qcow2) and qemu-img is there; else a raw clone customised with debugfs
 * (Firecracker takes raw disks only). A VM keeps the kind it was created with.
 */
async function rootDiskKind(env: StepEnv, ctx: VmContext, image: ImageManifest, f: VmFiles): Promise<'overlay' | 'clone'> {
  if (existsSync(f.rootOverlay)) return 'overlay';
  if (existsSync(f.rootDisk)) return 'clone';
  if (ctx.spec.vmm !== 'qemu' || image.identity !== 'disk') return 'clone';
  return (await which('qemu-img', env.runner)) ? 'overlay' : 'clone';
}

/** The root disk: an overlay (from a template kept in the image's directory) or a clone; says which in the log. */
async function makeRootDisk(env: StepEnv, ctx: VmContext, image: ImageManifest & { dir: string }, f: VmFiles, signal: AbortSignal) {
  const kind = await rootDiskKind(env, ctx, image, f);
  const rootfs = join(image.dir, image.rootfs);
  const needed = await createNeedsBytes(
    kind === 'overlay' || existsSync(f.rootDisk) ? undefined : rootfs,
    existsSync(f.workDisk) ? undefined : join(image.dir, image.workSeed),
    ctx.spec.diskBytes,
  );
  await ensureFreeSpace(f.dir, needed, `creating vm ${ctx.name}`);
  const opts = { runner: env.runner, signal };
  const make = () =>
    kind === 'overlay' ? overlayDisk(rootfs, f.rootOverlay, { ...opts, templateDir: image.dir }) : cloneDisk(rootfs, f.rootDisk, opts);
  await stage(env, ctx.id, 'rootDisk', make, (s) => `strategy=${s}`);
  return kind;
}

/** The VM's own SSH host key, made in-process on first create and pinned (known_hosts) before first contact. */
async function ensureHostKey(env: StepEnv, ctx: VmContext, f: VmFiles): Promise<{ privateKey: string; publicKey: string }> {
  if (!existsSync(f.hostKey) || !existsSync(f.hostKeyPub)) {
    await stage(env, ctx.id, 'hostKey', async () => {
      const hk = generateHostKey({ comment: `banger-${ctx.id}` });
      await writeFile(f.hostKey, hk.privateKey, { mode: 0o600 });
      await writeFile(f.hostKeyPub, hk.publicKey + '\n', { mode: 0o644 });
    });
  }
  const hostKey = { privateKey: await readFile(f.hostKey, 'utf8'), publicKey: (await readFile(f.hostKeyPub, 'utf8')).trim() };
  await writeFile(f.knownHosts, `banger-${ctx.id} ${hostKey.publicKey}\n`, { mode: 0o600 });
  return hostKey;
}

/** A tap VM's lease (its TAP and static address); user networking has none and configures itself by DHCP. */
export async function leaseNetwork(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<{ net: PrepareDisksOutput['net']; network: NetworkConfig }> {
  if (ctx.spec.net !== 'tap') return { net: {}, network: { mode: 'dhcp' } };
  if (!env.network) throw new BangerError('unsupported', 'tap networking needs the root helper, which is not available', 'use --net user, or run the daemon as root');
  const lease = await stage(env, ctx.id, 'network.lease', () => env.network!.acquire(ctx, signal), (l) => `${l.tap} ${l.guestIp}`);
  return {
    net: { guestIp: lease.guestIp, tap: lease.tap },
    network: { mode: 'static', address: `${lease.guestIp}/${lease.prefix ?? 24}`, gateway: lease.gateway!, dns: lease.dns ?? [], mac: macForVm(ctx.id) },
  };
}

/**
 * A new VM's root disk and identity. An overlay root disk comes with an identity disk, git identity included (the
 * image applies it at boot); a cloned one has the identity written in with debugfs. A Firecracker VM gets an
 * identity disk besides where its image finds one without a serial: its forks apply their own after a restore.
 */
export async function prepareFreshDisks(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<PrepareDisksOutput> {
  const f = vmFiles(env.layout, ctx.id);
  await mkdir(f.dir, { recursive: true, mode: 0o700 });
  const image = await stage(env, ctx.id, 'image', () => imageOf(env, ctx.spec.image), (m) => `${m.name}`);
  const kind = await makeRootDisk(env, ctx, image, f, signal);
  const hostKey = await ensureHostKey(env, ctx, f);
  const { net, network } = await leaseNetwork(env, ctx, signal);
  const identity = { hostname: ctx.name, hostKey, network };
  if (kind === 'clone') await stage(env, ctx.id, 'rootDisk.customize', () => customizeRootDisk(f.rootDisk, { ...identity, runner: env.runner, signal }));
  if (kind === 'overlay' || forkableFirecracker(ctx, image)) {
    const writeDisk = async () => writeIdentityDisk(f.identityDisk, { ...identity, gitIdentity: await vmGitIdentity(env, ctx) });
    await stage(env, ctx.id, 'identity', writeDisk, () => 'identity disk');
  }
  return { net };
}

const forkableFirecracker = (ctx: VmContext, image: ImageManifest) =>
  ctx.spec.vmm === 'firecracker' && image.identity === 'disk' && image.builderVersion >= IDENTITY_MARKER_BUILDER;

const vmGitIdentity = (env: StepEnv, ctx: VmContext) => ctx.spec.gitIdentity ?? gitIdentity(env.runner, ctx.name);

/**
 * The VM's work disk: from the workspace cache when the create names a cached disk (a failed clone is a miss),
 * else a clone of the image's work disk template, else (file_sync configured: its files are read at each create) a
 * fresh one. A VM with an identity disk gets its git identity from there (a cached disk carries none), and a
 * cached disk as an overlay (workOverlayOnCached); a failed overlay is a copy instead.
 */
export async function makeWorkDisk(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<void> {
  const f = vmFiles(env.layout, ctx.id);
  if (existsSync(f.workDisk) || existsSync(f.workOverlay)) {
    if (existsSync(f.workOverlay) && !(await readLayers(f))) await writeLayers(f, overlayLayers(f));
    env.log(ctx.id, 'workDisk', 'info', undefined, 'work disk already exists; kept');
    return;
  }
  const image = await imageOf(env, ctx.spec.image);
  const seedImage = join(image.dir, image.workSeed);
  const cached = ctx.spec.workspace?.cachedDisk;
  // Firecracker's identity disk is for its forks: its root and work disks carry the identity as well
  const onIdentityDisk = ctx.spec.vmm === 'qemu' && existsSync(f.identityDisk);
  const [key, git] = await stage(env, ctx.id, 'workDisk.inputs', () => Promise.all([env.userKey(), onIdentityDisk ? undefined : vmGitIdentity(env, ctx)]));
  if (cached) {
    const clone = () => cloneWorkDisk(cached, f.workDisk, { gitIdentity: git, seedImage, runner: env.runner, signal });
    const copyInstead = (e: unknown) => {
      env.log(ctx.id, 'workDisk.fromCache', 'info', undefined, `no overlay on the cached disk (${errorMessage(e)}): copying it instead`);
      return clone();
    };
    const fromCache = onIdentityDisk ? () => workOverlayOnCached(env, f, cached, image.dir, signal).catch(copyInstead) : clone;
    const made = await stage(env, ctx.id, 'workDisk.fromCache', fromCache, (s) => `strategy=${s}`).then(() => true, () => false);
    if (made) return;
  }
  const common = { sizeBytes: ctx.spec.diskBytes, seedImage, authorizedKeys: key.publicKey + '\n', gitIdentity: git, runner: env.runner, signal };
  const fileSync = env.config.fileSync ?? [];
  if (fileSync.length === 0) {
    const fromTemplate = () => workDiskFromTemplate(f.workDisk, { ...common, templateDir: image.dir });
    await stage(env, ctx.id, 'workDisk', fromTemplate, (s) => `size=${ctx.spec.diskBytes}, template clone strategy=${s}`);
    return;
  }
  await stage(env, ctx.id, 'workDisk', () => createWorkDisk(f.workDisk, { ...common, fileSync }), () => `size=${ctx.spec.diskBytes}, fresh (file_sync)`);
}

/**
 * A QEMU VM's work disk as a qcow2 overlay on the cached disk, linked into its directory (overlayOnCachedDisk):
 * constant time where a copy costs the disk's data. Its git identity comes from its identity disk (a cached disk
 * carries none). Recorded as the VM's layers, so the VMM, snapshots and `vm show` find it.
 */
async function workOverlayOnCached(env: StepEnv, f: VmFiles, cached: string, templateDir: string, signal: AbortSignal) {
  if (!(await which('qemu-img', env.runner))) throw new BangerError('unsupported', 'qemu-img is not installed');
  try {
    const strategy = await overlayOnCachedDisk(cached, f.workOverlay, { templateDir, runner: env.runner, signal });
    await writeLayers(f, overlayLayers(f));
    return strategy;
  } catch (e) {
    // nothing of it may stay for the copy that follows: a later create would take a stray overlay for the work disk
    await Promise.all([f.workOverlay, join(f.dir, CACHED_BASE_NAME)].map((p) => rm(p, { force: true })));
    throw e;
  }
}

/** The layers of a VM whose work disk is an overlay on a cached disk: its root overlay and that work overlay. */
const overlayLayers = (f: VmFiles) => ({ root: { file: f.rootOverlay, format: 'qcow2' as const }, work: { file: f.workOverlay, format: 'qcow2' as const } });

/** For a tap VM: the lease again (it re-creates a vanished TAP), which must be the one the VM was created with. */
export async function checkTapLease(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<void> {
  if (ctx.spec.net !== 'tap') return;
  if (!env.network) throw new BangerError('unsupported', 'tap networking needs the root helper, which is not reachable', 'start the root helper, or recreate the VM with --net user');
  const lease = await stage(env, ctx.id, 'network.lease', () => env.network!.acquire(ctx, signal), (l) => `${l.tap} ${l.guestIp}`);
  if (lease.tap !== ctx.net?.tap || lease.guestIp !== ctx.net?.guestIp) throw new BangerError('conflict', `the VM's network lease changed (${ctx.net?.tap}/${ctx.net?.guestIp} → ${lease.tap}/${lease.guestIp})`);
}

/**
 * The disks the VMM gets: the snapshot layers when a snapshot or fork set them, else the root disk and work disk;
 * and the identity disk when the VM has one.
 */
export async function launchDisks(f: VmFiles) {
  const layers = await readLayers(f);
  const identityDisk = existsSync(f.identityDisk) ? f.identityDisk : undefined;
  if (layers) return { rootDisk: layers.root.file, rootFormat: layers.root.format, workDisk: layers.work.file, workFormat: layers.work.format, identityDisk };
  return { ...(existsSync(f.rootOverlay) ? { rootDisk: f.rootOverlay, rootFormat: 'qcow2' as const } : { rootDisk: f.rootDisk }), workDisk: f.workDisk, identityDisk };
}

/** The VMM's network: user networking's forwarded SSH port and published ports, or the VM's TAP and MAC. */
function vmmNet(env: StepEnv, ctx: VmContext, sshPort: number | undefined) {
  if (ctx.spec.net === 'user') return { mode: 'user' as const, sshPort: sshPort!, publish: ctx.spec.publish, backend: env.config.userNet, egress: ctx.spec.isolation?.egress };
  return { mode: 'tap' as const, tap: ctx.net!.tap!, mac: macForVm(ctx.id) };
}

/** What the VMM is launched with: the image's kernel (Firecracker: its uncompressed one), the VM's disks, size and network. */
export async function launchSpecFor(env: StepEnv, ctx: VmContext, sshPort: number | undefined): Promise<LaunchSpec> {
  const f = vmFiles(env.layout, ctx.id);
  const image = await imageOf(env, ctx.spec.image);
  return {
    id: ctx.id,
    vmDir: f.dir,
    runDir: env.layout.run,
    kernel: join(image.dir, ctx.spec.vmm === 'firecracker' && image.vmlinux ? image.vmlinux : image.kernel),
    initrd: image.initrd ? join(image.dir, image.initrd) : undefined,
    cmdline: KERNEL_CMDLINE,
    ...(await launchDisks(f)),
    vcpus: ctx.spec.vcpus,
    memoryMiB: ctx.spec.memoryMiB,
    accel: ctx.spec.accel,
    net: vmmNet(env, ctx, sshPort),
    serialLog: f.serialLog,
  };
}

/** Start a new VMM for this VM and record it in vmm.json. */
async function launchVmm(env: StepEnv, ctx: VmContext, driver: VmmDriver, signal: AbortSignal): Promise<{ proc: VmmProcess; sshPort?: number }> {
  const f = vmFiles(env.layout, ctx.id);
  const sshPort = ctx.spec.net === 'user' ? await findFreePort() : undefined;
  await checkTapLease(env, ctx, signal);
  await Promise.all([rm(f.serialLog, { force: true }), rm(rotatedPath(f.serialLog), { force: true })]);
  if (ctx.spec.publish?.length) await stage(env, ctx.id, 'publish.check', () => checkHostPortsFree(ctx.spec.publish!), () => ctx.spec.publish!.map(formatPublish).join(' '));
  const spec = await launchSpecFor(env, ctx, sshPort);
  const proc = await stage(env, ctx.id, 'vmm.launch', () => driver.launch(spec, { signal, runner: env.runner }), (p) => `pid ${p.pid} (${ctx.spec.vmm}, ${ctx.spec.accel})`);
  await writeFile(f.vmmState, JSON.stringify({ pid: proc.pid, control: proc.qmpSocket, sshPort, guestIp: ctx.net?.guestIp, tap: ctx.net?.tap } satisfies VmmState));
  return { proc, sshPort };
}

/** Wait until the guest answers SSH (first, with passt, its login prompt); on failure say why, with the console's tail. */
async function waitForGuest(env: StepEnv, ctx: VmContext, driver: VmmDriver, p: VmmProcess, sshPort: number | undefined, signal: AbortSignal): Promise<void> {
  const f = vmFiles(env.layout, ctx.id);
  const target = await sshTargetFor(env, ctx, { sshPort, guestIp: ctx.net?.guestIp });
  const deadline = ctx.bootDeadline ?? Date.now() + ctx.spec.bootTimeoutMs;
  const timeoutMs = Math.max(1000, deadline - Date.now());
  if (ctx.spec.net === 'user' && env.config.userNet === 'passt') {
    // passt must see no forwarded connection before the guest's network is up (src/host/net/passt.ts).
    await stage(env, ctx.id, 'guest.console', () => waitForLoginPrompt(f.serialLog, deadline, { signal, isAlive: () => alive(driver, p) }));
  }
  await stage(env, ctx.id, 'ssh.wait', () =>
    waitForSsh(target, { timeoutMs, signal, isAlive: () => alive(driver, p), keep: (c) => env.ssh.adopt(sshKey(ctx.id, p.pid), target, c) }).catch(async (e) => {
      const up = await alive(driver, p);
      const why = up ? `the guest did not answer SSH within ${Math.round(timeoutMs / 1000)} s` : 'the VMM exited during boot';
      throw new BangerError('timeout', `${why}: ${errorMessage(e)}\n--- serial console (last lines) ---\n${await serialTail(f.serialLog)}`, `see ${f.serialLog}`);
    }),
  );
}

/** Boot: adopt this VM's running VMM (daemon restarted mid-boot) or launch one, then wait for SSH. */
export async function bootVm(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<BootOutput> {
  const f = vmFiles(env.layout, ctx.id);
  const driver = env.driver(ctx.spec.vmm);
  const cleanups = new Cleanups();
  const t0 = performance.now();
  let proc: VmmProcess | undefined;
  // Registered before anything can fail: a launch cut short (an abort, ENOSPC writing vmm.json) leaves no VMM.
  // Until the launch returns, the pid file is how the VMM is found.
  cleanups.add('kill VMM', async () => {
    const p = proc ?? (await vmmByPidFile(env, ctx, driver));
    if (p) await driver.kill(p);
    await rm(f.vmmState, { force: true });
  });
  // The serial log stays capped while the guest boots (watchVmm takes over once it runs).
  const serialCap = new AbortController();
  void capWhile(f.serialLog, serialCap.signal);
  try {
    const vmm = (await adoptVmm(env, ctx, driver)) ?? (await launchVmm(env, ctx, driver, signal));
    proc = vmm.proc;
    await waitForGuest(env, ctx, driver, vmm.proc, vmm.sshPort, signal);
    cleanups.release();
    env.log(ctx.id, 'boot', 'done', Math.round(performance.now() - t0), `ssh ready`);
    const p = vmm.proc;
    return { runtime: { pid: p.pid, control: p.qmpSocket, sshPort: vmm.sshPort, guestIp: ctx.net?.guestIp, tap: ctx.net?.tap, bootedAt: new Date().toISOString() } };
  } catch (e) {
    await cleanups.run().catch((ce) => env.log(ctx.id, 'boot.cleanup', 'error', undefined, errorMessage(ce)));
    throw e;
  } finally {
    serialCap.abort();
  }
}

/** Watch the running VMM until it exits or the watch is aborted (a tap VM's published ports open meanwhile). */
export async function watchVm(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<WatchOutput> {
  const rt = ctx.runtime;
  if (!rt) return { reason: 'no VMM process recorded' };
  const driver = env.driver(ctx.spec.vmm);
  const proc = { pid: rt.pid, qmpSocket: rt.control };
  if (!(await alive(driver, proc))) {
    await rm(vmFiles(env.layout, ctx.id).vmmState, { force: true });
    return { reason: `VMM process ${rt.pid} is gone (it exited while the daemon was not watching)` };
  }
  const serialCap = new AbortController();
  const onAbort = () => serialCap.abort();
  signal.addEventListener('abort', onAbort, { once: true });
  void capWhile(vmFiles(env.layout, ctx.id).serialLog, serialCap.signal);
  // A tap VM's published ports are the daemon's own proxies: open while it watches the VM (again after adoption).
  const proxies = await openTapProxies(env, ctx).catch((e: unknown) => {
    env.log(ctx.id, 'publish', 'error', undefined, errorMessage(e));
    return undefined;
  });
  const exit = await driver.waitExit(proc, signal).finally(async () => {
    signal.removeEventListener('abort', onAbort);
    serialCap.abort();
    await proxies?.close();
  });
  if (exit.ioError) {
    // The VMM is still there, paused: vmm.json stays, so start adopts (and resumes) it and delete kills it.
    const error = `${exit.reason}; free space on the host, then banger vm start ${ctx.name} resumes it`;
    env.log(ctx.id, 'vmm.paused', 'error', undefined, error);
    return { reason: exit.reason, error };
  }
  if (!signal.aborted) await rm(vmFiles(env.layout, ctx.id).vmmState, { force: true });
  const reason = `VMM exited on its own: ${exit.reason}`;
  if (!signal.aborted) env.log(ctx.id, 'vmm.exit', 'info', undefined, reason);
  return { reason };
}

/** Stop the VM's VMM through its driver, if one runs. */
export async function stopVm(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<void> {
  await testStageDelay('stopping', signal); // test hook, see fault-injection.ts
  const f = vmFiles(env.layout, ctx.id);
  const driver = env.driver(ctx.spec.vmm);
  // The recorded VMM goes to driver.stop even if it looks gone: an exiting one is waited for there.
  const proc = ctx.runtime ? { pid: ctx.runtime.pid, qmpSocket: ctx.runtime.control } : await findVmm(env, ctx, driver);
  if (!proc) {
    env.log(ctx.id, 'vmm.stop', 'info', undefined, 'no VMM process of this VM is running; nothing to stop');
    await rm(f.vmmState, { force: true });
    return;
  }
  const how = await stage(env, ctx.id, 'vmm.stop', () => driver.stop(proc, { timeoutMs: ctx.spec.stopTimeoutMs, signal }), (h) => h);
  void how;
  await rm(f.vmmState, { force: true });
}

/** Apply the `vm set` changes that need the VM stopped (a larger work disk). */
export async function applyVmSettings(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<void> {
  await testStageDelay('reconfiguring', signal); // test hook, see fault-injection.ts
  const want = ctx.pendingSet;
  if (want?.diskBytes && want.diskBytes !== ctx.spec.diskBytes) {
    const f = vmFiles(env.layout, ctx.id);
    if (await readLayers(f)) throw new BangerError('unsupported', `vm ${ctx.name}'s work disk is a qcow2 overlay (on a snapshot's layers or a cached disk), which banger does not grow`, 'create a new VM with a larger --disk instead');
    await stage(env, ctx.id, 'workDisk.grow', () => growDisk(f.workDisk, want.diskBytes!, { runner: env.runner, signal }), () => `size=${want.diskBytes}`);
  }
}

/** Delete: the VMM, the network lease, the address and the VM's directory. */
export async function destroyVm(env: StepEnv, ctx: VmContext): Promise<void> {
  await testStageDelay('deleting'); // test hook, see fault-injection.ts
  const f = vmFiles(env.layout, ctx.id);
  const driver = env.driver(ctx.spec.vmm);
  const proc = await findVmm(env, ctx, driver);
  if (proc) await stage(env, ctx.id, 'vmm.kill', () => driver.kill(proc), () => `pid ${proc.pid}`);
  if (ctx.spec.net === 'user') await stopPasst(passtFiles(env.layout.run, f.dir, ctx.id));
  if (ctx.spec.net === 'tap') {
    if (!env.network) throw new BangerError('unsupported', 'this VM uses tap networking and the root helper is not reachable, so its TAP device cannot be removed', 'start the root helper, then delete again');
    await stage(env, ctx.id, 'network.release', () => env.network!.release(ctx.id));
  }
  env.store.releaseAddress(ctx.id);
  await stage(env, ctx.id, 'files.remove', () => rm(f.dir, { recursive: true, force: true }));
}
