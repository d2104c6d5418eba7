import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { access, constants as fsConstants, mkdir, mkdtemp, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { release, tmpdir } from 'node:os';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { BangerError, errorMessage } from '../../../errors.js';
import { Files } from '../../../paths.js';
import { run, type Runner } from '../../exec/runner.js';
import { aborted, checkSocketPath, MAX_SOCKET_PATH, sleep } from '../../exec/wait.js';
import { identifyProcess, type PidIdentity } from '../../exec/proc.js';
import { passtFiles, passtNetdev, startPasst, stopPasst } from '../../net/passt.js';
import { nsForwards, prepareNamespace, startUserNs, stopUserNs, userNsFiles, wrapInNamespace } from '../../net/usernet-ns.js';
import { QmpClient, type QmpEvent } from './qmp.js';
import { AGENT_PORT_NAME } from '../../image/agent.js';
import { BULK_PORT_NAME } from '../../guest/bulk.js';
import { IDENTITY_DISK_SERIAL } from '../../disk/identity-disk.js';
import type { IoErrorStop, LaunchSpec, VmmDriver, VmmExit, VmmProcess, VmmState } from '../driver.js';

export { MAX_SOCKET_PATH };
export { QmpClient, type QmpEvent };
export type { IoErrorStop, LaunchSpec, VmmDriver, VmmExit, VmmProcess, VmmState } from '../driver.js';

// ───────────────────────────── small helpers ─────────────────────────────

const errno = (e: unknown) => (e as NodeJS.ErrnoException)?.code;

/** The QMP socket of a VM: `<runDir>/<id>.qmp`. */
export function qmpSocketPath(runDir: string, id: string): string {
  return checkSocketPath(join(runDir, `${id}.qmp`));
}

/**
 * A second QMP monitor only for watching events (waitExit holds it for the VM's life). QEMU serves one
 * client per monitor, so status/stop must not compete with a long-lived watcher on the same socket.
 */
export function eventsSocketPath(qmpSocket: string): string | undefined {
  return qmpSocket.endsWith('.qmp') ? `${qmpSocket.slice(0, -4)}.qev` : undefined;
}

/**
 * The host side of the guest agent's virtio-serial port (src/host/image/agent.ts): `<runDir>/<id>.agent`, next to
 * the QMP socket (the run dir keeps socket paths under the 108-byte limit, which a VM directory may not).
 */
export function agentSocketPath(qmpSocket: string): string | undefined {
  return qmpSocket.endsWith('.qmp') ? `${qmpSocket.slice(0, -4)}.agent` : undefined;
}

/**
 * The host side of the bulk port (src/host/guest/bulk.ts): `<runDir>/<id>.bulk`. A workspace's stream goes into
 * the guest through it instead of through SSH, so the guest does not decrypt it.
 */
export function bulkSocketPath(qmpSocket: string): string | undefined {
  return qmpSocket.endsWith('.qmp') ? `${qmpSocket.slice(0, -4)}.bulk` : undefined;
}

/** The bulk port's socket when the VM's QEMU has one (QEMU made it at launch), else undefined. */
export function liveBulkSocket(qmpSocket: string): string | undefined {
  const sock = bulkSocketPath(qmpSocket);
  return sock && existsSync(sock) ? sock : undefined;
}

/** Every socket a VM's QEMU serves in the run dir (QMP, events, agent, bulk): removed before a launch and after a kill. */
function socketsOf(qmpSocket: string): string[] {
  return [qmpSocket, eventsSocketPath(qmpSocket), agentSocketPath(qmpSocket), bulkSocketPath(qmpSocket)].filter((f): f is string => !!f);
}

/** Escapes a value for QEMU's comma-separated option syntax (`,` is written `,,`). */
export function qemuOptEscape(value: string): string {
  return value.replace(/,/g, ',,');
}

function assertPath(what: string, p: string): string {
  if (!isAbsolute(p)) throw new BangerError('internal', `${what} must be an absolute path (QEMU daemonizes into /): ${p}`);
  if (/[\n\r\0]/.test(p)) throw new BangerError('invalid_params', `${what} contains a control character: ${JSON.stringify(p)}`);
  return p;
}

const ID_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;
const TAP_RE = /^[A-Za-z0-9_.-]{1,15}$/;

// ───────────────────────────── argv ─────────────────────────────

export interface QemuFiles {
  qmpSocket: string;
  pidFile: string;
  /** Optional second monitor for events; defaults to eventsSocketPath(qmpSocket). Pass null for none. */
  eventsSocket?: string | null;
}

/**
 * The argument vector (without the binary) for one VM. Pure: same input, same output.
 * Disks: root first (vda), then work (vdb), then the identity disk (vdc, read-only) when there is one.
 */
export function qemuArgv(spec: LaunchSpec, files: QemuFiles, opts: { tscKhz?: number } = {}): string[] {
  if (!ID_RE.test(spec.id)) throw new BangerError('invalid_params', `invalid VM id for QEMU: ${JSON.stringify(spec.id)}`);
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1) throw new BangerError('invalid_params', `vcpus must be a positive integer, got ${spec.vcpus}`);
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 64) throw new BangerError('invalid_params', `memory must be at least 64 MiB, got ${spec.memoryMiB}`);
  const cache = spec.diskCache ?? 'writeback';
  const drive = (id: string, file: string, format: 'raw' | 'qcow2' = 'raw') => [
    '-drive',
    // werror=enospc (QEMU's default, stated): a full host disk pauses the guest (BLOCK_IO_ERROR, then STOP) instead
    // of failing its writes, so nothing is lost; `cont` after freeing space retries them. Other errors go to the guest.
    `id=${id},file=${qemuOptEscape(assertPath(`${id} disk`, file))},format=${format},if=none,cache=${cache},discard=unmap,werror=enospc,rerror=report`,
    '-device',
    `virtio-blk-device,drive=${id}`,
  ];
  const identity = (file: string) => [
    '-drive',
    `id=identity,file=${qemuOptEscape(assertPath('identity disk', file))},format=raw,if=none,readonly=on`,
    '-device',
    `virtio-blk-device,drive=identity,serial=${IDENTITY_DISK_SERIAL}`,
  ];
  const args: string[] = [
    '-name', `banger-${spec.id}`,
    '-M', 'microvm,acpi=on',
    '-accel', spec.accel,
    '-cpu', spec.accel === 'kvm' ? 'host' : 'max',
    '-smp', String(spec.vcpus),
    '-m', String(spec.memoryMiB),
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-no-reboot',
    '-kernel', assertPath('kernel', spec.kernel),
  ];
  if (spec.initrd) args.push('-initrd', assertPath('initrd', spec.initrd));
  args.push('-append', tcgCmdline(spec, opts.tscKhz));
  // append=on: the daemon caps the log by truncating it in place (src/host/guest/serial.ts).
  args.push('-chardev', `file,id=serial0,path=${qemuOptEscape(assertPath('serial log', spec.serialLog))},append=on`, '-serial', 'chardev:serial0');
  args.push(...drive('root', spec.rootDisk, spec.rootFormat), ...drive('work', spec.workDisk, spec.workFormat));
  if (spec.identityDisk) args.push(...identity(spec.identityDisk));
  if (spec.net.mode === 'user') {
    const port = spec.net.sshPort;
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new BangerError('invalid_params', `invalid SSH port ${port}`);
    args.push('-netdev', userNetdev(spec, spec.net), '-device', 'virtio-net-device,netdev=n0');
  } else {
    if (!TAP_RE.test(spec.net.tap)) throw new BangerError('invalid_params', `invalid TAP device name ${JSON.stringify(spec.net.tap)}`);
    if (!MAC_RE.test(spec.net.mac)) throw new BangerError('invalid_params', `invalid MAC address ${JSON.stringify(spec.net.mac)}`);
    args.push(
      '-netdev', `tap,id=n0,ifname=${spec.net.tap},script=no,downscript=no`,
      '-device', `virtio-net-device,netdev=n0,mac=${spec.net.mac.toLowerCase()}`,
    );
  }
  // Guest entropy: sshd must not wait for the CRNG on a slow emulated boot.
  args.push('-object', 'rng-random,id=rng0,filename=/dev/urandom', '-device', 'virtio-rng-device,rng=rng0');
  // The guest agent's channel: a virtio-serial port whose host side is a Unix socket QEMU listens on. (Not vsock:
  // vhost-vsock needs /dev/vhost-vsock and a host-wide CID per VM, and Node cannot open AF_VSOCK sockets.)
  const agent = agentSocketPath(files.qmpSocket);
  if (agent) {
    args.push(
      '-chardev', `socket,id=agent0,path=${qemuOptEscape(checkSocketPath(assertPath('agent socket', agent)))},server=on,wait=off`,
      '-device', 'virtio-serial-device',
      '-device', `virtserialport,chardev=agent0,name=${AGENT_PORT_NAME}`,
    );
    // The bulk port, on the same virtio-serial device. A restore must launch the devices its snapshot was saved
    // with (QEMU refuses a different set of ports), so a snapshot from before the port restores without it.
    const bulk = bulkSocketPath(files.qmpSocket);
    if (bulk && spec.bulkPort !== false) {
      args.push(
        '-chardev', `socket,id=bulk0,path=${qemuOptEscape(checkSocketPath(assertPath('bulk socket', bulk)))},server=on,wait=off`,
        '-device', `virtserialport,chardev=bulk0,name=${BULK_PORT_NAME}`,
      );
    }
  }
  args.push('-qmp', qmpArg(checkSocketPath(assertPath('QMP socket', files.qmpSocket))));
  const ev = files.eventsSocket === undefined ? eventsSocketPath(files.qmpSocket) : files.eventsSocket;
  if (ev) args.push('-qmp', qmpArg(checkSocketPath(assertPath('QMP events socket', ev))));
  if (spec.incoming) args.push('-incoming', 'defer');
  args.push('-pidfile', assertPath('pid file', files.pidFile), '-daemonize');
  return args;
}

/**
 * Under TCG the guest calibrates its TSC against the emulated PIT; on a busy host that calibration fails,
 * the kernel marks the TSC unusable, finds no other reference on microvm (no HPET, no ACPI PM timer) and
 * hangs before it reaches init. Telling it the frequency (TCG's guest TSC runs at the host's TSC rate)
 * skips the calibration. A tsc_early_khz already in the cmdline wins.
 */
function tcgCmdline(spec: LaunchSpec, tscKhz: number | undefined): string {
  if (spec.accel !== 'tcg' || !tscKhz || !Number.isInteger(tscKhz) || tscKhz <= 0) return spec.cmdline;
  if (/(^|\s)tsc_early_khz=/.test(spec.cmdline)) return spec.cmdline;
  return `${spec.cmdline} tsc_early_khz=${tscKhz}`.trim();
}

/** The host's TSC frequency in kHz as far as /proc/cpuinfo tells it (x86 only), else undefined. */
export async function hostTscKhz(): Promise<number | undefined> {
  try {
    const text = await readFile('/proc/cpuinfo', 'utf8');
    const m = /^cpu MHz\s*:\s*([0-9.]+)/m.exec(text);
    const khz = m ? Math.round(Number.parseFloat(m[1]) * 1000) : NaN;
    return Number.isFinite(khz) && khz > 0 ? khz : undefined;
  } catch {
    return undefined;
  }
}

/**
 * User networking's netdev. slirp (config `userNet`, the default): SSH and the published ports as hostfwd on the
 * host; its gateway 10.0.2.2 is the host's loopback (README, Security model). isolated: QEMU runs in a namespace
 * of its own (src/host/net/usernet-ns.ts), its hostfwd listens there on 0.0.0.0:10000+i and slirp4netns brings
 * the host's ports to it. passt: `--no-map-gw`, it forwards the ports itself (src/host/net/passt.ts).
 * Egress none, whatever the backend: slirp with restrict=on in the host's namespace, the forwards only.
 */
function userNetdev(spec: LaunchSpec, net: Extract<LaunchSpec['net'], { mode: 'user' }>): string {
  const egressNone = net.egress === 'none';
  if (net.backend === 'passt' && !egressNone) return passtNetdev(assertPath('passt socket', passtFiles(spec.runDir, spec.vmDir, spec.id).socket));
  const forwards = userForwards(net);
  for (const f of forwards) {
    if (!IPV4_RE.test(f.hostAddress) || ![f.hostPort, f.guestPort].every((n) => Number.isInteger(n) && n >= 1 && n <= 65535)) {
      throw new BangerError('invalid_params', `invalid forward ${JSON.stringify(f)}`);
    }
  }
  const hostfwd = inNamespace(net)
    ? nsForwards(forwards).map((f) => `hostfwd=tcp:0.0.0.0:${f.nsPort}-:${f.guestPort}`)
    : forwards.map((f) => `hostfwd=tcp:${f.hostAddress}:${f.hostPort}-:${f.guestPort}`);
  return ['user', 'id=n0', ...(egressNone ? ['restrict=on'] : []), ...hostfwd].join(',');
}

/** SSH from 127.0.0.1:sshPort, then the VM's published ports. */
function userForwards(net: Extract<LaunchSpec['net'], { mode: 'user' }>) {
  return [{ hostAddress: '127.0.0.1', hostPort: net.sshPort, guestPort: 22 }, ...(net.publish ?? [])];
}

/** Does this user-net VM's QEMU run in a namespace of its own (isolated backend, egress internet)? */
function inNamespace(net: LaunchSpec['net']): boolean {
  return net.mode === 'user' && net.backend === 'isolated' && net.egress !== 'none';
}

const IPV4_RE = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

/** passt for a user-net VM: SSH forwarded from 127.0.0.1:sshPort, then the VM's published ports. */
function startUserNet(spec: LaunchSpec, net: Extract<LaunchSpec['net'], { mode: 'user' }>, signal?: AbortSignal) {
  return startPasst(passtFiles(spec.runDir, spec.vmDir, spec.id), userForwards(net), { signal });
}

/** The slirp4netns files of the VM whose QMP socket is `<runDir>/<id>.qmp` (none there: stopping is a no-op). */
function userNsOf(qmpSocket: string) {
  const id = basename(qmpSocket).replace(/\.qmp$/, '');
  return userNsFiles(dirname(qmpSocket), dirname(qmpSocket), id);
}

/** What a stopped or killed QEMU leaves of its user networking: a passt or slirp4netns still running, their files. */
function stopUserNetOf(qmpSocket: string): Promise<unknown> {
  return Promise.all([stopPasst(passtOf(qmpSocket)), stopUserNs(userNsOf(qmpSocket))]);
}

/** The passt of the VM whose QMP socket is `<runDir>/<id>.qmp` (a tap VM has none: stopping it is a no-op). */
function passtOf(qmpSocket: string) {
  const id = basename(qmpSocket).replace(/\.qmp$/, '');
  return passtFiles(dirname(qmpSocket), dirname(qmpSocket), id);
}

const qmpArg = (sock: string) => `unix:${qemuOptEscape(sock)},server=on,wait=off`;

// ───────────────────────────── process identity ─────────────────────────────

export type { PidIdentity };

/**
 * Is `pid` still the QEMU that serves `qmpSocket`? Guards against pid reuse: the socket path is on the
 * command line of exactly one QEMU. A reaped zombie counts as gone; an exiting one as unknown (still going).
 */
export function identifyPid(pid: number, qmpSocket: string): Promise<{ id: PidIdentity; detail?: string }> {
  const want = qmpArg(qmpSocket);
  return identifyProcess(pid, (argv) => argv.some((a, i) => a === want && argv[i - 1] === '-qmp'));
}

async function isOurs(proc: VmmProcess): Promise<boolean> {
  const { id } = await identifyPid(proc.pid, proc.qmpSocket);
  return id === 'ours' || id === 'unknown';
}

/** Polls until the process is gone (or no longer ours). True if gone within timeoutMs. */
async function waitGone(proc: VmmProcess, timeoutMs: number, signal?: AbortSignal, everyMs = 100): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!(await isOurs(proc))) return true;
    const left = deadline - Date.now();
    if (left <= 0) return false;
    await sleep(Math.min(everyMs, left), signal);
  }
}

// ───────────────────────────── the driver ─────────────────────────────

export interface QemuDriverOptions {
  /** Default: $BANGER_QEMU_BIN or qemu-system-x86_64. */
  qemuBin?: string;
  runner?: Runner;
  /** How long QEMU may take to set the VM up and daemonize. Default 60 s. */
  launchTimeoutMs?: number;
}

const STATUS_MAP: Record<string, VmmState> = {
  running: 'running',
  paused: 'paused',
  prelaunch: 'paused',
  suspended: 'paused',
  debug: 'paused',
  inmigrate: 'paused',
  postmigrate: 'paused',
  'finish-migrate': 'paused',
  'save-vm': 'paused',
  'restore-vm': 'paused',
  colo: 'paused',
  shutdown: 'shutdown',
  'internal-error': 'broken',
  'io-error': 'paused',
  'guest-panicked': 'broken',
  watchdog: 'broken',
};

// ───────────────────────────── disk errors that pause the guest ─────────────────────────────

/** A BLOCK_IO_ERROR event whose action paused the guest, as an IoErrorStop; undefined for any other event. */
export function ioErrorFromEvent(e: QmpEvent): IoErrorStop | undefined {
  if (e.event !== 'BLOCK_IO_ERROR' || e.data?.action !== 'stop') return undefined;
  const d = e.data;
  const str = (v: unknown) => (typeof v === 'string' && v ? v : undefined);
  return { device: str(d.device) ?? str(d['node-name']), operation: str(d.operation), nospace: d.nospace === true, detail: str(d.reason) };
}

/** query-block's answer: the first device whose io-status is not 'ok' ('nospace' or 'failed'). */
export function ioErrorFromBlocks(blocks: unknown): IoErrorStop | undefined {
  if (!Array.isArray(blocks)) return undefined;
  for (const b of blocks as Array<Record<string, unknown>>) {
    const st = b?.['io-status'];
    if (st === 'nospace' || st === 'failed') {
      return { device: typeof b.device === 'string' && b.device ? b.device : undefined, nospace: st === 'nospace' };
    }
  }
  return undefined;
}

/** "the guest's work disk hit an I/O error (ENOSPC: no space left on device) on write and QEMU paused it". */
export function describeIoErrorStop(io: IoErrorStop | undefined): string {
  const disk = io?.device === 'root' || io?.device === 'work' ? `${io.device} disk` : io?.device ? `disk ${io.device}` : 'disk';
  const what = io?.nospace ? 'ENOSPC: no space left on device' : io?.detail ? io.detail : undefined;
  const op = io?.operation ? ` on ${io.operation}` : '';
  return `the guest's ${disk} hit an I/O error${what ? ` (${what})` : ''}${op} and QEMU paused it`;
}

/** Is the VM paused on a disk error? Asks query-status, then query-block for which disk; `seen` fills gaps. */
async function ioErrorStop(qmp: QmpClient, seen?: IoErrorStop): Promise<IoErrorStop | undefined> {
  const st = await qmp.execute<{ status: string }>('query-status', undefined, { timeoutMs: 2000 });
  if (st.status !== 'io-error') return undefined;
  const blocks = await qmp.execute('query-block', undefined, { timeoutMs: 2000 }).catch(() => undefined);
  const fromBlocks = ioErrorFromBlocks(blocks);
  return { nospace: false, ...seen, ...fromBlocks, ...(seen?.nospace || fromBlocks?.nospace ? { nospace: true } : {}) };
}

/** Launches a QEMU VM that has already been built as argv, with -daemonize/-pidfile, and reads its pid. */
export async function startDaemonized(
  qemuBin: string,
  argv: readonly string[],
  files: { pidFile: string; qmpSocket: string },
  opts: { signal?: AbortSignal; runner?: Runner; timeoutMs?: number } = {},
): Promise<VmmProcess> {
  const runner = opts.runner ?? run;
  // A live QEMU with this socket would lose it to the new one (QEMU unlinks before bind): refuse instead.
  const old = await readPid(files.pidFile);
  if (old !== undefined && (await identifyPid(old, files.qmpSocket)).id === 'ours') {
    throw new BangerError('conflict', `a QEMU process (pid ${old}) is already running for ${files.qmpSocket}`, 'stop that VM first');
  }
  // A stale pid file names someone else's process by now: gone before QEMU writes its own.
  await Promise.all([...socketsOf(files.qmpSocket).map((f) => rm(f, { force: true })), rm(files.pidFile, { force: true })]);
  // From here on QEMU may exist: every failure (the runner's, a timeout, an abort, a missing pid) kills the QEMU
  // the pid file names, if it serves our socket, before it is reported. Nothing is left running unowned.
  try {
    await runner(qemuBin, argv, { signal: opts.signal, timeoutMs: opts.timeoutMs ?? 60_000 });
    let pid: number | undefined;
    for (let i = 0; i < 40 && pid === undefined; i++) {
      pid = await readPid(files.pidFile);
      if (pid === undefined) await sleep(50, opts.signal);
    }
    if (pid === undefined) throw new BangerError('host', `QEMU started but wrote no pid to ${files.pidFile}`);
    return { pid, qmpSocket: files.qmpSocket };
  } catch (e) {
    const killErr = await killByPidFile(files).then(() => undefined, (ke: unknown) => errorMessage(ke));
    if (killErr && e instanceof Error) e.message += ` (and the QEMU it started could not be killed: ${killErr})`;
    if (e instanceof BangerError && (e.kind === 'aborted' || e.message.startsWith('QEMU started'))) throw e;
    throw new BangerError('host', `QEMU failed to start: ${errorMessage(e)}`, launchHint(errorMessage(e)), { cause: e });
  }
}

/**
 * Kills the QEMU that `pidFile` names if it serves `qmpSocket` (pid reuse is checked on its command line) and
 * waits for it to go. For a launch cut short before anyone learnt the pid: the pid file is all there is.
 * Returns the pid killed, if any.
 */
export async function killByPidFile(files: { pidFile: string; qmpSocket: string }): Promise<number | undefined> {
  const pid = await readPid(files.pidFile);
  if (pid === undefined || (await identifyPid(pid, files.qmpSocket)).id !== 'ours') return undefined;
  try {
    process.kill(pid, 'SIGKILL');
  } catch (e) {
    if (errno(e) === 'ESRCH') return undefined;
    throw new BangerError('host', `cannot kill QEMU pid ${pid}: ${errorMessage(e)}`);
  }
  if (!(await waitGone({ pid, qmpSocket: files.qmpSocket }, 10_000))) {
    throw new BangerError('host', `QEMU pid ${pid} did not exit within 10 s of SIGKILL`);
  }
  return pid;
}

function launchHint(msg: string): string | undefined {
  if (/hostfwd|Could not set up host forwarding/i.test(msg)) return 'the SSH port is taken; pick another free port and retry';
  if (/kvm/i.test(msg)) return 'KVM is not usable here; use software emulation (accel tcg)';
  if (/tap|TUNSETIFF/i.test(msg)) return 'the TAP device is missing or not owned by this user';
  return undefined;
}

async function readPid(file: string): Promise<number | undefined> {
  try {
    const n = Number.parseInt((await readFile(file, 'utf8')).trim(), 10);
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Isolated user net: QEMU in its own namespaces (unshare), then slirp4netns for its way out and the forwards.
 * A failure after QEMU started kills it (the slirp4netns, if any, exits with it) before it is reported.
 */
async function launchInNamespace(
  s: LaunchSpec,
  net: Extract<LaunchSpec['net'], { mode: 'user' }>,
  qemuBin: string,
  argv: readonly string[],
  files: { pidFile: string; qmpSocket: string },
  opts: { signal?: AbortSignal; runner?: Runner; timeoutMs?: number },
): Promise<VmmProcess> {
  const ns = userNsFiles(s.runDir, s.vmDir, s.id);
  await prepareNamespace(ns, opts.runner);
  const wrapped = wrapInNamespace(ns, qemuBin, argv);
  const proc = await startDaemonized(wrapped.file, wrapped.args, files, opts).catch(async (e: unknown) => {
    await stopUserNs(ns);
    throw e;
  });
  try {
    await startUserNs(ns, proc.pid, userForwards(net), { signal: opts.signal });
    return proc;
  } catch (e) {
    await killByPidFile(files).catch(() => undefined);
    await stopUserNs(ns);
    throw e;
  }
}

export function createQemuDriver(options: QemuDriverOptions = {}): VmmDriver {
  const qemuBin = options.qemuBin ?? process.env.BANGER_QEMU_BIN ?? 'qemu-system-x86_64';
  return {
    kind: 'qemu',
    launch: (spec, opts = {}) => launchQemu(qemuBin, spec, { signal: opts.signal, runner: opts.runner ?? options.runner, timeoutMs: options.launchTimeoutMs }),
    stop: stopQemu,
    kill: killQemu,
    status: qemuStatus,
    waitExit,
    async resume(proc) {
      const qmp = await QmpClient.connect(proc.qmpSocket, { timeoutMs: 5000 });
      try {
        await qmp.execute('cont', undefined, { timeoutMs: 5000 });
      } finally {
        qmp.close();
      }
    },
  };
}

/** Checks the VM's files, then starts QEMU daemonized (in its user-net namespace, or after passt, when asked). */
async function launchQemu(qemuBin: string, spec: LaunchSpec, startOpts: { signal?: AbortSignal; runner?: Runner; timeoutMs?: number }): Promise<VmmProcess> {
  const s: LaunchSpec = {
    ...spec,
    vmDir: resolve(spec.vmDir),
    runDir: resolve(spec.runDir),
    kernel: resolve(spec.kernel),
    initrd: spec.initrd ? resolve(spec.initrd) : undefined,
    rootDisk: resolve(spec.rootDisk),
    workDisk: resolve(spec.workDisk),
    identityDisk: spec.identityDisk ? resolve(spec.identityDisk) : undefined,
    serialLog: resolve(spec.serialLog),
  };
  const qmpSocket = qmpSocketPath(s.runDir, s.id);
  const pidFile = join(s.vmDir, Files.vmmPid);
  const files = [['kernel', s.kernel], ['initrd', s.initrd], ['root disk', s.rootDisk], ['work disk', s.workDisk], ['identity disk', s.identityDisk]] as const;
  for (const [what, file] of files) {
    if (file && !(await access(file, fsConstants.R_OK).then(() => true, () => false))) {
      throw new BangerError('not_found', `the VM's ${what} ${file} is missing or unreadable`);
    }
  }
  await mkdir(s.runDir, { recursive: true, mode: 0o700 });
  await mkdir(s.vmDir, { recursive: true });
  await mkdir(dirname(s.serialLog), { recursive: true });
  const argv = qemuArgv(s, { qmpSocket, pidFile }, { tscKhz: s.accel === 'tcg' ? await hostTscKhz() : undefined });
  if (s.net.mode === 'user' && inNamespace(s.net)) return launchInNamespace(s, s.net, qemuBin, argv, { pidFile, qmpSocket }, startOpts);
  if (s.net.mode === 'user' && s.net.backend === 'passt' && s.net.egress !== 'none') await startUserNet(s, s.net, startOpts.signal);
  return startDaemonized(qemuBin, argv, { pidFile, qmpSocket }, startOpts).catch(async (e: unknown) => {
    await stopPasst(passtOf(qmpSocket));
    throw e;
  });
}

/** ACPI power-down, then SIGKILL once timeoutMs passed without QEMU exiting. */
async function stopQemu(proc: VmmProcess, { timeoutMs, signal }: { timeoutMs: number; signal?: AbortSignal }): Promise<'graceful' | 'killed' | 'already-gone'> {
  if (!(await isOurs(proc))) return tidyAfter(proc).then(() => 'already-gone' as const);
  let sent = false;
  let qmp: QmpClient | undefined;
  try {
    qmp = await QmpClient.connect(proc.qmpSocket, { timeoutMs: 5000, signal }); // waits out a status() holding the monitor
    await qmp.execute('system_powerdown', undefined, { timeoutMs: 3000 });
    sent = true;
  } catch (e) {
    if (e instanceof BangerError && e.kind === 'aborted') throw e;
  } finally {
    // Do not hold the monitor while waiting: status() must still be able to use it.
    qmp?.close();
  }
  if (!sent && !(await isOurs(proc))) return tidyAfter(proc).then(() => 'already-gone' as const);
  if (sent && (await waitGone(proc, timeoutMs, signal))) {
    await tidyAfter(proc); // passt and slirp4netns exit with QEMU; this only tidies files
    return 'graceful';
  }
  if (signal?.aborted) throw aborted('stopping the VM', signal);
  await killQemu(proc);
  return 'killed';
}

/** SIGKILL the VM's QEMU if it still runs; then its monitor sockets go too (a killed QEMU leaves them). */
async function killQemu(proc: VmmProcess): Promise<void> {
  if (await isOurs(proc)) {
    try {
      process.kill(proc.pid, 'SIGKILL');
    } catch (e) {
      if (errno(e) !== 'ESRCH') throw new BangerError('host', `cannot kill QEMU pid ${proc.pid}: ${errorMessage(e)}`);
    }
    if (!(await waitGone(proc, 10_000))) {
      throw new BangerError('host', `QEMU pid ${proc.pid} did not exit within 10 s of SIGKILL`);
    }
  }
  await tidyAfter(proc);
}

/** Once QEMU is gone: its sockets (a QEMU that died by a signal leaves them) and its user-net helpers' files. */
async function tidyAfter(proc: VmmProcess): Promise<void> {
  await Promise.all([...socketsOf(proc.qmpSocket).map((f) => rm(f, { force: true })), stopUserNetOf(proc.qmpSocket)]);
}

/** What QEMU says (query-status), or gone when its process is, or broken when it runs but QMP does not answer. */
async function qemuStatus(proc: VmmProcess): Promise<{ state: VmmState; reasons: string[] }> {
  const ident = await identifyPid(proc.pid, proc.qmpSocket);
  if (ident.id === 'gone') return { state: 'gone', reasons: [`QEMU process ${proc.pid} is not running${ident.detail ? ` (${ident.detail})` : ''}`] };
  if (ident.id === 'other') {
    return { state: 'gone', reasons: [`pid ${proc.pid} now belongs to another program (${ident.detail}); the VM's QEMU is gone`] };
  }
  let qmp: QmpClient | undefined;
  try {
    qmp = await QmpClient.connect(proc.qmpSocket, { timeoutMs: 2000 });
    const st = await qmp.execute<{ status: string; running: boolean }>('query-status', undefined, { timeoutMs: 2000 });
    const state = STATUS_MAP[st.status] ?? (st.running ? 'running' : 'paused');
    if (st.status === 'io-error') {
      const io = await ioErrorStop(qmp).catch(() => undefined);
      return { state, reasons: [`QEMU reports status 'io-error': ${describeIoErrorStop(io)}`] };
    }
    return { state, reasons: state === 'running' ? [] : [`QEMU reports status '${st.status}'`] };
  } catch (e) {
    if (!(await isOurs(proc))) return { state: 'gone', reasons: [`QEMU process ${proc.pid} exited`] };
    return { state: 'broken', reasons: [`QEMU process ${proc.pid} is running but QMP did not answer: ${errorMessage(e)}`] };
  } finally {
    qmp?.close();
  }
}

/**
 * Resolves when the QEMU is gone (with the SHUTDOWN reason when one was seen), or when QEMU paused the guest on a
 * disk error (`ioError` set; the process stays). Watches the events monitor: a STOP event (or the start of the
 * watch: the daemon may have restarted meanwhile) asks query-status whether the pause is an I/O error.
 */
async function waitExit(proc: VmmProcess, signal: AbortSignal): Promise<VmmExit> {
  if (!(await isOurs(proc))) return { reason: 'process not running' };
  let shutdown: { reason?: string; guest?: boolean } | undefined;
  let lastIoError: IoErrorStop | undefined;
  let checkPause = true;
  const ev = await connectEvents(proc, signal);
  // Poll /proc every 250 ms; QEMU closing the events monitor (it is exiting) wakes the loop early and switches
  // to quick polls for a moment. One wake-up hook, not one promise reaction per tick.
  const ticker = new Ticker(signal);
  let quickUntil = 0;
  ev?.onEvent((e) => {
    if (e.event === 'SHUTDOWN') shutdown = (e.data ?? {}) as { reason?: string; guest?: boolean };
    lastIoError = ioErrorFromEvent(e) ?? lastIoError;
    if (e.event === 'STOP') {
      checkPause = true;
      ticker.wake();
    }
  });
  ev?.onClose(() => {
    quickUntil = Date.now() + 2000;
    ticker.wake();
  });
  try {
    while (await isOurs(proc)) {
      if (ev?.isOpen && checkPause) {
        checkPause = false;
        const io = await ioErrorStop(ev, lastIoError).catch(() => undefined);
        if (io) return { reason: describeIoErrorStop(io), ioError: io };
      }
      await ticker.sleep(Date.now() < quickUntil ? 20 : 250);
    }
  } finally {
    ev?.close();
  }
  if (shutdown) return { reason: `shutdown: ${shutdown.reason ?? 'unknown'}`, shutdownReason: shutdown.reason, guest: shutdown.guest };
  return { reason: 'process exited' };
}

/** The events monitor of a QEMU, or undefined when it has none or someone else holds it (then /proc only). */
async function connectEvents(proc: VmmProcess, signal: AbortSignal): Promise<QmpClient | undefined> {
  const evPath = eventsSocketPath(proc.qmpSocket);
  if (!evPath) return undefined;
  try {
    return await QmpClient.connect(evPath, { timeoutMs: 2000, signal });
  } catch (e) {
    if (e instanceof BangerError && e.kind === 'aborted') throw e;
    return undefined;
  }
}

/** An abortable sleep that wake() ends early. */
class Ticker {
  private waker?: () => void;
  constructor(private readonly signal: AbortSignal) {}
  wake(): void {
    this.waker?.();
  }
  sleep(ms: number): Promise<void> {
    const signal = this.signal;
    return new Promise<void>((res, rej) => {
      const done = () => {
        clearTimeout(t);
        signal.removeEventListener('abort', onAbort);
        this.waker = undefined;
        res();
      };
      const onAbort = () => {
        clearTimeout(t);
        this.waker = undefined;
        rej(aborted('waiting for the VM to exit', signal));
      };
      const t = setTimeout(done, ms);
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      this.waker = done;
    });
  }
}

/** The default QEMU driver (qemu-system-x86_64 from PATH, or $BANGER_QEMU_BIN). */
export const qemuDriver: VmmDriver = createQemuDriver();

// ───────────────────────────── ports ─────────────────────────────

/** A TCP port that was free on 127.0.0.1 a moment ago (another process may still take it before QEMU binds). */
export function findFreePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.unref();
    srv.once('error', rej);
    srv.listen({ host: '127.0.0.1', port: 0, exclusive: true }, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port ? res(port) : rej(new BangerError('host', 'could not find a free TCP port on 127.0.0.1'))));
    });
  });
}

// ───────────────────────────── KVM probe ─────────────────────────────

export interface KvmProbeOptions {
  kernel: string;
  initrd?: string;
  cacheFile: string;
  /** Default 20 s. */
  timeoutMs?: number;
  runner?: Runner;
  signal?: AbortSignal;
  qemuBin?: string;
  /** Default /dev/kvm. */
  kvmDevice?: string;
}

export interface KvmVerdict {
  usable: boolean;
  reason: string;
  cached: boolean;
}

interface KvmCacheEntry {
  key: { kernel: string; size: number; mtimeMs: number; hostKernel: string };
  usable: boolean;
  reason: string;
  checkedAt: string;
}

/** Serial-console lines proving the kernel ran: it reached userspace, or it panicked for lack of a root. */
export const KERNEL_RAN_RE =
  /(Run \/\S* as init process|Freeing unused kernel (image )?memory|VFS: Unable to mount root|VFS: Cannot open root device|Kernel panic - not syncing: (VFS|No working init|Attempted to kill init))/;

/** The argv for a KVM probe boot (no disks, no network, kernel panics or runs init, never reboots). */
export function kvmProbeArgv(kernel: string, initrd: string | undefined, serialLog: string): string[] {
  return [
    '-M', 'microvm,acpi=on',
    '-accel', 'kvm',
    '-cpu', 'host',
    '-smp', '1',
    '-m', '256',
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-no-reboot',
    '-kernel', kernel,
    ...(initrd ? ['-initrd', initrd] : []),
    '-append', 'console=ttyS0 root=/dev/vda panic=-1 loglevel=7',
    '-serial', `file:${serialLog}`,
  ];
}

/**
 * Is KVM usable for a stock kernel? Opening /dev/kvm is not enough (a nested hypervisor may accept the
 * open and then fail every real guest), so boot the kernel under KVM and watch its serial console.
 * The verdict is cached per kernel file (path, size, mtime) and host kernel release.
 */
export async function probeKvm(opts: KvmProbeOptions): Promise<KvmVerdict> {
  const dev = opts.kvmDevice ?? '/dev/kvm';
  try {
    const fh = await open(dev, 'r+');
    await fh.close();
  } catch (e) {
    return { usable: false, reason: `${dev} cannot be opened (${errno(e) ?? errorMessage(e)})`, cached: false };
  }
  const kernel = resolve(opts.kernel);
  const st = await stat(kernel).catch((e) => {
    throw new BangerError('not_found', `kernel for the KVM probe not found: ${kernel} (${errno(e) ?? errorMessage(e)})`);
  });
  const key: KvmCacheEntry['key'] = { kernel, size: st.size, mtimeMs: Math.trunc(st.mtimeMs), hostKernel: release() };
  const cached = await readKvmCache(opts.cacheFile, key);
  if (cached) return { ...cached, cached: true };
  const verdict = await probeBoot(kernel, opts);
  if (opts.signal?.aborted) throw aborted('KVM probe', opts.signal);
  await writeKvmCache(opts.cacheFile, { key, ...verdict, checkedAt: new Date().toISOString() });
  return { ...verdict, cached: false };
}

async function readKvmCache(file: string, key: KvmCacheEntry['key']): Promise<{ usable: boolean; reason: string } | undefined> {
  try {
    const c = JSON.parse(await readFile(file, 'utf8')) as KvmCacheEntry;
    if (c && c.key && JSON.stringify(c.key) === JSON.stringify(key) && typeof c.usable === 'boolean') return { usable: c.usable, reason: c.reason };
  } catch {
    /* no cache or unreadable: probe */
  }
  return undefined;
}

async function writeKvmCache(file: string, entry: KvmCacheEntry): Promise<void> {
  try {
    await mkdir(dirname(file), { recursive: true });
    const tmp = `${file}.tmp-${process.pid}-${randomBytes(3).toString('hex')}`;
    await writeFile(tmp, `${JSON.stringify(entry, null, 2)}\n`);
    await rename(tmp, file);
  } catch {
    /* an unwritable cache only costs a probe next time */
  }
}

type ProbeOutcome = { exitCode?: number; stderr?: string; error?: unknown };

/** Boots the kernel under KVM until its serial console shows it ran, QEMU ends, or the timeout; the probe VM is always gone after. */
async function probeBoot(kernel: string, opts: KvmProbeOptions): Promise<{ usable: boolean; reason: string }> {
  const timeoutMs = opts.timeoutMs ?? 20_000;
  const runner = opts.runner ?? run;
  const qemuBin = opts.qemuBin ?? process.env.BANGER_QEMU_BIN ?? 'qemu-system-x86_64';
  const dir = await mkdtemp(join(tmpdir(), 'banger-kvmprobe-'));
  const serial = join(dir, 'serial.log');
  const ac = new AbortController();
  const onOuterAbort = () => ac.abort(opts.signal?.reason);
  opts.signal?.addEventListener('abort', onOuterAbort, { once: true });
  const started = Date.now();
  let running: Promise<unknown> | undefined;
  try {
    let outcome: ProbeOutcome | undefined;
    running = runner(qemuBin, kvmProbeArgv(kernel, opts.initrd ? resolve(opts.initrd) : undefined, serial), { signal: ac.signal, reject: false, timeoutMs: timeoutMs + 10_000 }).then(
      (r) => (outcome = { exitCode: r.exitCode, stderr: r.stderr }),
      (e) => (outcome = { error: e }),
    );
    const ran = async () => KERNEL_RAN_RE.exec(await readFile(serial, 'utf8').catch(() => ''));
    for (;;) {
      const ended = outcome; // read before the serial log: a kernel that ran just before QEMU ended still counts
      const m = await ran();
      if (m) return { usable: true, reason: `a probe boot under KVM ran the kernel (serial: "${m[0]}") in ${Date.now() - started} ms` };
      if (ended) return { usable: false, reason: `a probe boot under KVM failed before the kernel ran: ${probeFailure(ended)}` };
      if (opts.signal?.aborted) throw aborted('KVM probe', opts.signal);
      if (Date.now() - started > timeoutMs) {
        return { usable: false, reason: `a probe boot under KVM showed no sign of the kernel running within ${timeoutMs} ms (nested virtualization that cannot run this kernel?)` };
      }
      await sleep(200);
    }
  } finally {
    // Kill the probe VM in every case (verdict reached, timeout, abort) and wait for it to be gone.
    ac.abort(new Error('KVM probe finished'));
    await running;
    opts.signal?.removeEventListener('abort', onOuterAbort);
    await rm(dir, { recursive: true, force: true });
  }
}

/** How a probe QEMU ended: its signal or status, and the last lines of its stderr. */
function probeFailure(o: ProbeOutcome): string {
  const stderr = (o.error as { stderr?: unknown } | undefined)?.stderr ?? o.stderr;
  const tail = typeof stderr === 'string' ? stderr.trim().split('\n').slice(-3).join(' | ') : '';
  const sig = o.error ? /SIG[A-Z]+/.exec(errorMessage(o.error))?.[0] : undefined;
  const how = o.error ? (sig ? `QEMU died of ${sig}` : errorMessage(o.error)) : `QEMU exited with status ${o.exitCode}`;
  return `${how}${tail ? `: ${tail}` : ''}`;
}
