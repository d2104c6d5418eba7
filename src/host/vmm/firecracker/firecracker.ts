import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, fchownSync, openSync, unlinkSync } from 'node:fs';
import { access, constants as fsConstants, lchown, link, lstat, mkdir, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { createConnection } from 'node:net';
import { basename, delimiter, dirname, join, resolve } from 'node:path';
import { BangerError, errorMessage } from '../../../errors.js';
import { Files } from '../../../paths.js';
import type { LaunchSpec, VmmDriver, VmmExit, VmmProcess, VmmState } from '../qemu/qemu.js';
import type { Runner } from '../../exec/runner.js';

/**
 * The Firecracker driver. Firecracker is started detached (its own session, so the VM outlives the daemon),
 * directly or through the jailer, and configured over its HTTP API on a Unix socket:
 * machine-config → boot-source → drives → network-interfaces → vsock → InstanceStart.
 * Boot is a list of named steps, each logged with its time; cleanups are registered as resources are
 * acquired and run in reverse on failure (firecracker-go-sdk handlers.go / doCleanup).
 */

export type { LaunchSpec } from '../qemu/qemu.js';
import { checkSocketPath, MAX_SOCKET_PATH, sleep } from '../../exec/wait.js';
import { identifyProcess, type PidIdentity } from '../../exec/proc.js';

export { MAX_SOCKET_PATH };

/** File names this driver owns (sockets in the run dir, logs in the VM dir). */
export const FirecrackerFiles = {
  /** `<runDir>/<fcId>.fc.sock`: the API socket (a symlink into the chroot when jailed). */
  apiSocket: (fcId: string) => `${fcId}.fc.sock`,
  /** `<runDir>/<fcId>.vsock`: the vsock device's host-side socket (a symlink into the chroot when jailed). */
  vsock: (fcId: string) => `${fcId}.vsock`,
  /** `<vmDir>/firecracker.log`: the VMM's stderr. Its stdout (the guest's serial console) goes to spec.serialLog. */
  vmmLog: 'firecracker.log',
} as const;

/** Inside the jail: the jailer's default API socket, and where the files are linked. */
export const JAIL_API_SOCKET = '/run/firecracker.socket';
export const JAIL_FILES = {
  kernel: '/vmlinux',
  initrd: '/initrd.img',
  rootDisk: '/rootfs.ext4',
  workDisk: '/work.ext4',
  vsock: '/vsock.sock',
  serialLog: '/serial.log',
  vmmLog: '/firecracker.log',
} as const;

/** The guest's vsock CID. Firecracker's vsock is backed by a Unix socket per VM, so CIDs need not differ between VMs. */
export const GUEST_CID = 3;
export const BASE_BOOT_ARGS = 'console=ttyS0 reboot=k panic=1 root=/dev/vda rw';

// ───────────────────────────── API types (from Firecracker's swagger spec) ─────────────────────────────

export interface MachineConfiguration {
  vcpu_count: number;
  mem_size_mib: number;
  smt?: boolean;
  track_dirty_pages?: boolean;
  huge_pages?: 'None' | 'Transparent' | '2M';
}
export interface BootSource {
  kernel_image_path: string;
  boot_args?: string;
  initrd_path?: string;
}
export interface Drive {
  drive_id: string;
  is_root_device: boolean;
  path_on_host?: string;
  is_read_only?: boolean;
  cache_type?: 'Unsafe' | 'Writeback';
  io_engine?: 'Sync' | 'Async';
  partuuid?: string;
}
export interface NetworkInterface {
  iface_id: string;
  host_dev_name: string;
  guest_mac?: string;
  mtu?: number;
}
export interface Vsock {
  guest_cid: number;
  uds_path: string;
}
export interface InstanceActionInfo {
  action_type: 'InstanceStart' | 'SendCtrlAltDel' | 'FlushMetrics';
}
export interface InstanceInfo {
  id: string;
  state: 'Not started' | 'Running' | 'Paused';
  vmm_version: string;
  app_name: string;
}

// ───────────────────────────── HTTP over a Unix socket ─────────────────────────────

export interface ApiRequestOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/**
 * A minimal client for Firecracker's API. A non-2xx answer becomes a BangerError that carries Firecracker's
 * `fault_message`; an unreachable socket becomes a `host` error, a slow one a `timeout`.
 */
export class FirecrackerApi {
  constructor(
    readonly socketPath: string,
    private readonly defaults: { timeoutMs?: number } = {},
  ) {}

  request<T = unknown>(method: 'GET' | 'PUT' | 'PATCH', path: string, body?: unknown, opts: ApiRequestOptions = {}): Promise<T | undefined> {
    const timeoutMs = opts.timeoutMs ?? this.defaults.timeoutMs ?? 5000;
    const what = `${method} ${path}`;
    return new Promise<T | undefined>((resolvePromise, reject) => {
      if (opts.signal?.aborted) return reject(new BangerError('aborted', `Firecracker ${what}: aborted`));
      const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
      let settled = false;
      const finish = (fn: () => void) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        fn();
      };
      const req = httpRequest({
        socketPath: this.socketPath,
        path,
        method,
        agent: false,
        headers: {
          Host: 'localhost',
          Accept: 'application/json',
          ...(payload ? { 'Content-Type': 'application/json', 'Content-Length': payload.length } : {}),
        },
      });
      const timer = setTimeout(() => {
        finish(() => reject(new BangerError('timeout', `Firecracker ${what}: no answer within ${timeoutMs} ms on ${this.socketPath}`)));
        req.destroy();
      }, timeoutMs);
      const onAbort = () => {
        finish(() => reject(new BangerError('aborted', `Firecracker ${what}: aborted`)));
        req.destroy();
      };
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      req.on('error', (e: NodeJS.ErrnoException) =>
        finish(() =>
          reject(new BangerError('host', `cannot reach the Firecracker API at ${this.socketPath} (${e.code ?? e.message})`, undefined, { cause: e })),
        ),
      );
      req.on('response', (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (e) => finish(() => reject(new BangerError('host', `Firecracker ${what}: ${e.message}`))));
        res.on('end', () =>
          finish(() => {
            const text = Buffer.concat(chunks).toString('utf8');
            const status = res.statusCode ?? 0;
            let json: unknown;
            if (text.trim()) {
              try {
                json = JSON.parse(text);
              } catch {
                json = undefined;
              }
            }
            if (status >= 200 && status < 300) return resolvePromise(json as T | undefined);
            const fault =
              json && typeof json === 'object' && typeof (json as { fault_message?: unknown }).fault_message === 'string'
                ? (json as { fault_message: string }).fault_message
                : text.trim() || `HTTP ${status}`;
            reject(new FirecrackerApiError(method, path, status, fault));
          }),
        );
      });
      if (payload) req.end(payload);
      else req.end();
    });
  }

  describe(opts?: ApiRequestOptions): Promise<InstanceInfo> {
    return this.request<InstanceInfo>('GET', '/', undefined, opts).then((r) => {
      if (!r || typeof r !== 'object' || typeof r.state !== 'string') throw new BangerError('host', `Firecracker GET /: unexpected answer ${JSON.stringify(r)}`);
      return r;
    });
  }

  async put(path: string, body: unknown, opts?: ApiRequestOptions): Promise<void> {
    await this.request('PUT', path, body, opts);
  }
}

/** Firecracker refused a request; `faultMessage` is its own words. */
export class FirecrackerApiError extends BangerError {
  constructor(
    readonly method: string,
    readonly path: string,
    readonly status: number,
    readonly faultMessage: string,
  ) {
    super('host', `Firecracker refused ${method} ${path} (HTTP ${status}): ${faultMessage}`);
  }
}

/** Connect errors that mean nobody listens on a Unix socket path (absent, a socket file left behind, a plain file). */
const NOBODY_LISTENS = new Set(['ENOENT', 'ECONNREFUSED', 'ENOTSOCK']);

/**
 * Is something serving the API socket at `socketPath`? Not when the path is absent or nothing listens on it (a
 * socket file left behind by a Firecracker that exited, or a plain file): then it may be removed. The verdict
 * rests on connect(), which on a Unix socket succeeds or fails at once, never on a timer: on a busy machine a live
 * Firecracker can be slow to answer, and this process slow to see the answer, and neither means nobody is there.
 * Once connected, GET / (bounded by `timeoutMs`) only says who it is.
 */
export async function probeApiSocket(socketPath: string, timeoutMs: number, signal?: AbortSignal): Promise<{ serving: false } | { serving: true; info?: InstanceInfo; detail: string }> {
  if (signal?.aborted) throw new BangerError('aborted', `probing ${socketPath}: aborted`);
  const connectBoundMs = Math.max(timeoutMs, 30_000); // a safety net only: connect() on a Unix socket does not wait
  const connected = await new Promise<true | string>((res) => {
    const sock = createConnection(socketPath);
    const timer = setTimeout(() => {
      sock.destroy();
      res(`connect did not complete within ${connectBoundMs} ms`);
    }, connectBoundMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.destroy();
      res(true);
    });
    sock.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      res(e.code ?? e.message);
    });
  });
  if (connected !== true) {
    if (NOBODY_LISTENS.has(connected)) return { serving: false };
    return { serving: true, detail: `cannot tell whether something listens on it (${connected})` };
  }
  try {
    const info = await new FirecrackerApi(socketPath).describe({ timeoutMs, signal });
    return { serving: true, info, detail: `instance ${info.id}, ${info.state}` };
  } catch (e) {
    if (e instanceof BangerError && e.kind === 'aborted') throw e;
    // it went away in between
    if (NOBODY_LISTENS.has(errno(e instanceof Error ? e.cause : undefined) ?? '')) return { serving: false };
    if (e instanceof BangerError && e.kind === 'timeout') return { serving: true, detail: `it accepted a connection but did not answer GET / within ${timeoutMs} ms` };
    return { serving: true, detail: errorMessage(e) };
  }
}

// ───────────────────────────── small helpers ─────────────────────────────

const errno = (e: unknown) => (e as NodeJS.ErrnoException)?.code;


/** Firecracker's instance id: alphanumerics and hyphens, 64 at most. Other characters of banger's ids become '-'. */
export function firecrackerId(id: string): string {
  const fc = id.replace(/[^A-Za-z0-9-]/g, '-').slice(0, 64);
  if (!fc) throw new BangerError('invalid_params', `VM id ${JSON.stringify(id)} cannot be used as a Firecracker id`);
  return fc;
}

/** Kernel command line: banger's base arguments, then the spec's, without repeating an identical token. */
export function bootArgs(cmdline: string): string {
  const base = BASE_BOOT_ARGS.split(/\s+/);
  const extra = cmdline.split(/\s+/).filter((t) => t && !base.includes(t));
  return [...base, ...extra].join(' ');
}

async function tail(file: string, lines = 8): Promise<string> {
  try {
    const text = await readFile(file, 'utf8');
    return text.trim().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

/** Runs registered cleanups once, in reverse order, and joins their errors. */
class CleanupStack {
  private fns: Array<{ name: string; fn: () => unknown }> = [];
  add(name: string, fn: () => unknown): void {
    this.fns.push({ name, fn });
  }
  release(): void {
    this.fns = [];
  }
  async run(): Promise<string[]> {
    const errors: string[] = [];
    for (const { name, fn } of this.fns.reverse()) {
      try {
        await fn();
      } catch (e) {
        errors.push(`${name}: ${errorMessage(e)}`);
      }
    }
    this.fns = [];
    return errors;
  }
}

// ───────────────────────────── binary ─────────────────────────────

/**
 * The Firecracker binary: the option (config key `firecrackerBin`), else $BANGER_FIRECRACKER_BIN, else
 * `firecracker` on PATH. Missing → `not_found` naming what was tried and how to set it.
 */
export async function resolveFirecrackerBinary(explicit?: string, env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const howToSet = 'install Firecracker, or point banger at it with BANGER_FIRECRACKER_BIN=/path/to/firecracker or the config key "firecrackerBin"';
  const given = explicit ?? env.BANGER_FIRECRACKER_BIN;
  if (given) {
    const from = explicit ? 'the config key firecrackerBin' : 'BANGER_FIRECRACKER_BIN';
    const p = resolve(given);
    try {
      await access(p, fsConstants.X_OK);
    } catch (e) {
      throw new BangerError('not_found', `Firecracker binary ${p} (from ${from}) ${errno(e) === 'EACCES' ? 'is not executable' : 'does not exist'}`, howToSet);
    }
    return p;
  }
  const dirs = (env.PATH ?? '').split(delimiter).filter(Boolean);
  for (const d of dirs) {
    const p = join(d, 'firecracker');
    try {
      await access(p, fsConstants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  throw new BangerError('not_found', `Firecracker binary not found: no executable "firecracker" on PATH (${dirs.join(delimiter) || 'empty'})`, howToSet);
}

// ───────────────────────────── process identity ─────────────────────────────

/** What the driver hands back for a VM: the VmmProcess fields plus Firecracker's own. */
export interface FirecrackerProcess extends VmmProcess {
  /** The API socket to connect to (the VmmDriver interface names the control socket `qmpSocket`; same path). */
  apiSocket: string;
  vsockSocket: string;
  fcId: string;
  vmDir?: string;
  serialLog?: string;
  /** Set when the VMM runs in the jailer's chroot. */
  chrootDir?: string;
}

export type { PidIdentity };

/**
 * Is `pid` still the Firecracker of instance `fcId`? Guards against pid reuse: `--id <fcId>` is on its command
 * line (the jailer passes it on too), next to a program named like firecracker. See proc.ts for exiting processes.
 */
export function identifyFirecracker(pid: number, fcId: string): Promise<{ id: PidIdentity; detail?: string }> {
  return identifyProcess(pid, (argv) => argv.some((a, i) => a === fcId && argv[i - 1] === '--id') && argv.some((a) => a.includes('firecracker')));
}

function procFields(proc: VmmProcess): { apiSocket: string; fcId: string; vsockSocket?: string; vmDir?: string; serialLog?: string } {
  const p = proc as Partial<FirecrackerProcess> & VmmProcess;
  const apiSocket = p.apiSocket ?? p.qmpSocket;
  const name = basename(apiSocket);
  const fcId = p.fcId ?? (name.endsWith('.fc.sock') ? name.slice(0, -'.fc.sock'.length) : name);
  return {
    apiSocket,
    fcId,
    vsockSocket: p.vsockSocket ?? join(dirname(apiSocket), FirecrackerFiles.vsock(fcId)),
    vmDir: p.vmDir,
    serialLog: p.serialLog ?? (p.vmDir ? join(p.vmDir, Files.serialLog) : undefined),
  };
}

// ───────────────────────────── children we spawned ─────────────────────────────

/** Exit of processes this process spawned (for adopted ones only /proc polling is possible). */
const children = new Map<number, Promise<{ code: number | null; signal: NodeJS.Signals | null }>>();

function track(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const p = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => {
    child.once('exit', (code, signal) => res({ code, signal }));
    child.once('error', () => res({ code: null, signal: null }));
  });
  if (child.pid) {
    const pid = child.pid;
    children.set(pid, p);
    void p.then(() => setTimeout(() => children.delete(pid), 60_000).unref());
  }
  return p;
}

/** Spawns a long-lived VMM detached from us (own session), stdout/stderr to files, unref'd. */
function spawnDetached(file: string, args: string[], out: { stdout: string; stderr: string }, cwd?: string) {
  const outFd = openSync(out.stdout, 'a', 0o640);
  const errFd = out.stderr === out.stdout ? outFd : openSync(out.stderr, 'a', 0o640);
  try {
    const child = spawn(file, args, { detached: true, stdio: ['ignore', outFd, errFd], cwd });
    const exited = track(child);
    const started = new Promise<void>((res, rej) => {
      child.once('spawn', () => res());
      child.once('error', (e) => rej(new BangerError('host', `cannot start ${file}: ${e.message}`, undefined, { cause: e })));
    });
    child.unref();
    return { child, exited, started };
  } finally {
    closeSync(outFd);
    if (errFd !== outFd) closeSync(errFd);
  }
}

// ───────────────────────────── the jailer ─────────────────────────────

/** What launching through the jailer needs (the root helper's `firecracker.jail` arguments). */
export interface JailRequest {
  id: string;
  vmDir: string;
  binary: string;
  uid: number;
  gid: number;
  kernel: string;
  initrd?: string;
  rootDisk: string;
  workDisk: string;
}

export interface JailResult {
  pid: number;
  chrootDir: string;
  apiSocket: string;
  /** Host paths of the VMM's stdout (the guest's serial console) and stderr, inside the chroot. */
  logs: { serial: string; vmm: string };
  jailPaths: { kernel: string; initrd?: string; rootDisk: string; workDisk: string; vsock: string };
}

/** Something that can launch Firecracker through the jailer: the root helper client, or launchJailed when root. */
export type JailLauncher = (req: JailRequest, opts?: { signal?: AbortSignal }) => Promise<JailResult>;

/** Firecracker's own default chroot base. It must be root-owned and on the same filesystem as the VM disks. */
export const DEFAULT_CHROOT_BASE = '/srv/jailer';

export interface JailerConfig {
  /** The jailer binary. Default `jailer` on PATH. Root helper configuration only, never taken from a request. */
  jailerBin?: string;
  /** The chroot base (`--chroot-base-dir`). It must be on the same filesystem as the VM disks (they are hard-linked). */
  chrootBase: string;
}

/**
 * Every directory from / down to `dir` must be a real directory (no symlink) owned by root and writable by
 * nobody else (or sticky, like /tmp): otherwise the user could swap a component for a symlink and have root
 * create, link or chown files anywhere.
 */
export async function assertRootOwnedDir(dir: string): Promise<void> {
  const parts = resolve(dir).split('/').filter(Boolean);
  let p = '/';
  for (const part of ['', ...parts]) {
    p = part ? join(p, part) : p;
    let st;
    try {
      st = await lstat(p);
    } catch (e) {
      if (errno(e) === 'ENOENT') return; // created below by root, inside a checked parent
      throw e;
    }
    const safeMode = (st.mode & 0o022) === 0 || (st.mode & 0o1000) !== 0;
    if (!st.isDirectory() || st.uid !== 0 || !safeMode) {
      throw new BangerError(
        'invalid_params',
        `refused to use ${dir} as the jailer's chroot base: ${p} is ${st.isSymbolicLink() ? 'a symlink' : !st.isDirectory() ? 'not a directory' : st.uid !== 0 ? `owned by uid ${st.uid}` : 'writable by others'}`,
        'use a root-owned directory (Firecracker\'s default is /srv/jailer) on the same filesystem as banger\'s state directory',
      );
    }
  }
}

/**
 * Hard-link `src` to `dest` (a new name in a root-owned directory). The file must be a regular file owned by
 * `uid`: root never hands a file of someone else to the jail (link() does not follow a symlink at `src`).
 */
async function linkOwned(src: string, dest: string, uid: number): Promise<void> {
  await rm(dest, { force: true });
  try {
    await link(src, dest);
  } catch (e) {
    throw new BangerError(
      'host',
      `cannot hard-link ${src} into the jail (${errno(e) ?? errorMessage(e)})`,
      errno(e) === 'EXDEV' ? 'put the jailer chroot base on the same filesystem as banger\'s state directory' : undefined,
    );
  }
  const st = await lstat(dest);
  if (!st.isFile() || st.uid !== uid) {
    await rm(dest, { force: true });
    throw new BangerError('invalid_params', `refused to put ${src} in the jail: it is ${st.isFile() ? `owned by uid ${st.uid}, not ${uid}` : 'not a regular file'}`);
  }
}

/** Create a log file afresh in a root-owned directory and give it to uid:gid. */
function createOwnedLog(path: string, uid: number, gid: number): void {
  try {
    unlinkSync(path);
  } catch {
    /* none */
  }
  const fd = openSync(path, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, 0o640);
  try {
    fchownSync(fd, uid, gid);
  } finally {
    closeSync(fd);
  }
}

/**
 * Launch Firecracker through the jailer (as root): hard-link the kernel, initrd and disks into
 * `<chrootBase>/<binary name>/<id>/root`, and start
 * `jailer --id ID --exec-file BINARY --uid U --gid G --chroot-base-dir BASE -- --api-sock /run/firecracker.socket`
 * detached. The jailer execs Firecracker in place, so the pid is Firecracker's. The disks are hard links (the
 * same inodes as the VM's own files): a copy would let the guest's writes go somewhere else.
 *
 * Root writes nothing in the user's directories: the chroot base must be root-owned all the way up, the linked
 * files must already belong to uid (nothing is chowned), and the VMM's output goes to log files inside the
 * chroot (`logs`), which the driver links to from the VM directory. Arguments are validated by the root helper.
 */
export async function launchJailed(req: JailRequest, cfg: JailerConfig): Promise<JailResult> {
  const jailer = cfg.jailerBin ?? (await findOnPath('jailer'));
  if (!jailer) throw new BangerError('not_found', 'the Firecracker jailer was not found on PATH', 'install jailer next to firecracker, or configure the helper\'s jailer binary');
  const fcId = firecrackerId(req.id);
  const base = resolve(cfg.chrootBase);
  await assertRootOwnedDir(base);
  await mkdir(base, { recursive: true, mode: 0o755 });
  const chrootDir = join(base, basename(req.binary), fcId, 'root');
  await mkdir(chrootDir, { recursive: true, mode: 0o755 });
  await assertRootOwnedDir(chrootDir);
  const placed: Array<[string, string]> = [
    [req.kernel, JAIL_FILES.kernel],
    ...(req.initrd ? ([[req.initrd, JAIL_FILES.initrd]] as Array<[string, string]>) : []),
    [req.rootDisk, JAIL_FILES.rootDisk],
    [req.workDisk, JAIL_FILES.workDisk],
  ];
  for (const [src, inJail] of placed) await linkOwned(src, join(chrootDir, inJail), req.uid);
  const runDir = join(chrootDir, 'run');
  await rm(runDir, { recursive: true, force: true });
  await mkdir(runDir, { mode: 0o755 });
  await lchown(runDir, req.uid, req.gid);
  await rm(join(chrootDir, JAIL_FILES.vsock), { force: true });

  const logs = { serial: join(chrootDir, JAIL_FILES.serialLog), vmm: join(chrootDir, JAIL_FILES.vmmLog) };
  createOwnedLog(logs.serial, req.uid, req.gid);
  createOwnedLog(logs.vmm, req.uid, req.gid);
  const args = ['--id', fcId, '--exec-file', req.binary, '--uid', String(req.uid), '--gid', String(req.gid), '--chroot-base-dir', base, '--', '--api-sock', JAIL_API_SOCKET];
  const { child, started } = spawnDetached(jailer, args, { stdout: logs.serial, stderr: logs.vmm }, chrootDir);
  await started;
  return {
    pid: child.pid!,
    chrootDir,
    apiSocket: join(chrootDir, JAIL_API_SOCKET),
    logs,
    jailPaths: {
      kernel: JAIL_FILES.kernel,
      initrd: req.initrd ? JAIL_FILES.initrd : undefined,
      rootDisk: JAIL_FILES.rootDisk,
      workDisk: JAIL_FILES.workDisk,
      vsock: JAIL_FILES.vsock,
    },
  };
}

/**
 * Remove the chroot(s) of instance `id` under the chroot base (`<base>/<exec name>/<id>`), which hold hard links
 * to the VM's disks: left behind, they would keep a deleted VM's disk space in use. Refused while a Firecracker
 * still answers on the jail's API socket. Idempotent.
 */
export async function removeJail(id: string, cfg: Pick<JailerConfig, 'chrootBase'>): Promise<{ removed: string[] }> {
  const fcId = firecrackerId(id);
  const base = resolve(cfg.chrootBase);
  await assertRootOwnedDir(base);
  let execDirs: string[];
  try {
    execDirs = await readdir(base);
  } catch (e) {
    if (errno(e) === 'ENOENT') return { removed: [] };
    throw e;
  }
  const removed: string[] = [];
  for (const d of execDirs) {
    const dir = join(base, d, fcId);
    try {
      if (!(await lstat(dir)).isDirectory()) continue;
    } catch {
      continue;
    }
    const sock = join(dir, 'root', JAIL_API_SOCKET);
    const probe = await probeApiSocket(sock, 2000);
    if (probe.serving) throw new BangerError('conflict', `refused to remove the jail ${dir}: its Firecracker is still running (${probe.detail})`, 'stop the VM first');
    await rm(dir, { recursive: true, force: true });
    removed.push(dir);
  }
  return { removed };
}

async function findOnPath(cmd: string): Promise<string | undefined> {
  for (const d of (process.env.PATH ?? '').split(delimiter).concat(['/usr/sbin', '/sbin'])) {
    if (!d) continue;
    try {
      await access(join(d, cmd), fsConstants.X_OK);
      return join(d, cmd);
    } catch {
      /* next */
    }
  }
  return undefined;
}

// ───────────────────────────── the driver ─────────────────────────────

export interface FirecrackerDriverOptions {
  /** The Firecracker binary (config key `firecrackerBin`); else $BANGER_FIRECRACKER_BIN; else PATH. */
  binary?: string;
  env?: NodeJS.ProcessEnv;
  /** Bound on "the API socket answers GET /" after spawn. Default 10 s. */
  readyTimeoutMs?: number;
  /** Bound on each API call. Default 5 s. */
  requestTimeoutMs?: number;
  /** Launch through the jailer: with `launch` (the root helper) or, when running as root, launchJailed with `config`. */
  jailer?: {
    uid: number;
    gid: number;
    launch?: JailLauncher;
    /** Removes an instance's chroot after it exited (the root helper's firecracker.unjail). */
    unjail?: (fcId: string) => Promise<unknown>;
    config?: JailerConfig;
  };
  /** One line per boot step with its time, and warnings. */
  log?: (line: string) => void;
  /** Unused by Firecracker itself (it needs no helper commands); accepted for symmetry with QEMU. */
  runner?: Runner;
}

export interface FirecrackerDriver extends VmmDriver {
  kind: 'firecracker';
  launch(spec: LaunchSpec, opts?: { signal?: AbortSignal; runner?: Runner }): Promise<FirecrackerProcess>;
  /** The API client for a launched VM. */
  api(proc: VmmProcess): FirecrackerApi;
  /** GET / on the VM's socket. */
  describe(proc: VmmProcess, opts?: ApiRequestOptions): Promise<InstanceInfo>;
}

interface Step {
  name: string;
  run: () => Promise<void>;
}

/** How long to wait for the exit event of our child once /proc shows it gone. */
const EXIT_EVENT_GRACE_MS = 5000;

export function createFirecrackerDriver(options: FirecrackerDriverOptions = {}): FirecrackerDriver {
  const log = options.log ?? (() => {});
  const readyTimeoutMs = options.readyTimeoutMs ?? 10_000;
  const requestTimeoutMs = options.requestTimeoutMs ?? 5000;
  const apiFor = (proc: VmmProcess) => new FirecrackerApi(procFields(proc).apiSocket, { timeoutMs: requestTimeoutMs });

  async function isOurs(proc: VmmProcess): Promise<boolean> {
    const { id } = await identifyFirecracker(proc.pid, procFields(proc).fcId);
    return id === 'ours' || id === 'unknown';
  }

  /** Resolves true once the process is gone, false at the deadline. */
  async function waitGone(proc: VmmProcess, timeoutMs: number, signal?: AbortSignal): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    const child = children.get(proc.pid);
    if (child) {
      // Our own child: gone when its exit event says so (the kernel reports it once every thread is done).
      return new Promise<boolean>((res, rej) => {
        if (signal?.aborted) return rej(new BangerError('aborted', 'aborted'));
        const done = (fn: () => void) => {
          clearTimeout(timer);
          signal?.removeEventListener('abort', onAbort);
          fn();
        };
        const timer = setTimeout(() => done(() => res(false)), Math.max(0, timeoutMs));
        const onAbort = () => done(() => rej(new BangerError('aborted', 'aborted')));
        signal?.addEventListener('abort', onAbort, { once: true });
        void child.then(() => done(() => res(true)));
      });
    }
    for (;;) {
      if (!(await isOurs(proc))) return true;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await sleep(Math.min(100, left), signal);
    }
  }

  async function removeSockets(proc: VmmProcess): Promise<void> {
    const f = procFields(proc);
    await Promise.all([rm(f.apiSocket, { force: true }), f.vsockSocket ? rm(f.vsockSocket, { force: true }) : undefined]);
    if (f.vmDir) await rm(join(f.vmDir, Files.vmmPid), { force: true });
    const j = options.jailer;
    if (j) {
      // The logs live in the chroot, linked from the VM directory: keep a copy before the chroot goes.
      for (const l of [f.serialLog, f.vmDir ? join(f.vmDir, FirecrackerFiles.vmmLog) : undefined]) {
        if (!l) continue;
        try {
          if (!(await lstat(l)).isSymbolicLink()) continue;
          const text = await readFile(l).catch(() => Buffer.alloc(0));
          await rm(l, { force: true });
          await writeFile(l, text);
        } catch {
          /* no log to keep */
        }
      }
      try {
        if (j.unjail) await j.unjail(f.fcId);
        else if (j.config) await removeJail(f.fcId, j.config);
      } catch (e) {
        log(`firecracker ${f.fcId}: could not remove its jail: ${errorMessage(e)}`);
      }
    }
  }

  async function kill(proc: VmmProcess): Promise<void> {
    if (await isOurs(proc)) {
      try {
        process.kill(proc.pid, 'SIGKILL');
      } catch (e) {
        if (errno(e) !== 'ESRCH') throw new BangerError('host', `cannot kill Firecracker pid ${proc.pid}: ${errorMessage(e)}`);
      }
      if (!(await waitGone(proc, 10_000))) throw new BangerError('host', `Firecracker pid ${proc.pid} did not exit within 10 s of SIGKILL`);
    }
    await removeSockets(proc);
  }

  /** Wait until GET / answers; end early (with the VMM's own words) if the process exits. */
  async function waitReady(api: FirecrackerApi, pid: number, exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | undefined, fcId: string, logs: string[], signal?: AbortSignal) {
    const deadline = Date.now() + readyTimeoutMs;
    let gone = false;
    void exited?.then(() => (gone = true));
    let last: unknown;
    for (;;) {
      if (signal?.aborted) throw new BangerError('aborted', 'launching Firecracker: aborted');
      if (gone || (await identifyFirecracker(pid, fcId)).id === 'gone') {
        // /proc may show it gone (a zombie) before our exit event: it is our child, so the event is coming, but a
        // busy machine can take a while to deliver it.
        const ex = exited ? await Promise.race([exited, sleep(EXIT_EVENT_GRACE_MS).then(() => undefined)]) : undefined;
        const how = ex ? (ex.signal ? ` (killed by ${ex.signal})` : ` (exit code ${ex.code})`) : '';
        const said = (await Promise.all(logs.map((l) => tail(l)))).filter(Boolean).join('\n');
        throw new BangerError('host', `Firecracker exited before its API socket answered${how}${said ? `: ${said}` : ''}`, 'see the VM\'s firecracker.log; Firecracker needs a usable /dev/kvm');
      }
      try {
        await api.describe({ timeoutMs: Math.max(200, Math.min(1000, deadline - Date.now())) });
        return;
      } catch (e) {
        last = e;
      }
      if (Date.now() >= deadline) {
        throw new BangerError('timeout', `Firecracker's API socket ${api.socketPath} did not answer within ${readyTimeoutMs} ms: ${errorMessage(last)}`);
      }
      await sleep(20, signal);
    }
  }

  async function launch(spec0: LaunchSpec, opts: { signal?: AbortSignal } = {}): Promise<FirecrackerProcess> {
    const { signal } = opts;
    if (spec0.net.mode === 'user') {
      throw new BangerError('unsupported', 'Firecracker has no user-mode networking: a VM on Firecracker needs TAP networking', 'use --net tap (needs the root helper), or --vmm qemu for --net user');
    }
    const spec: LaunchSpec = {
      ...spec0,
      vmDir: resolve(spec0.vmDir),
      runDir: resolve(spec0.runDir),
      kernel: resolve(spec0.kernel),
      initrd: spec0.initrd ? resolve(spec0.initrd) : undefined,
      rootDisk: resolve(spec0.rootDisk),
      workDisk: resolve(spec0.workDisk),
      serialLog: resolve(spec0.serialLog),
    };
    const net = spec0.net;
    if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 32) throw new BangerError('invalid_params', `Firecracker takes 1-32 vCPUs, got ${spec.vcpus}`);
    if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 64) throw new BangerError('invalid_params', `memory must be at least 64 MiB, got ${spec.memoryMiB}`);
    if (spec.accel !== 'kvm') log(`warning: Firecracker always uses KVM; accel '${spec.accel}' is ignored`);
    const fcId = firecrackerId(spec.id);
    const apiSocket = checkSocketPath(join(spec.runDir, FirecrackerFiles.apiSocket(fcId)));
    const vsockSocket = checkSocketPath(join(spec.runDir, FirecrackerFiles.vsock(fcId)));
    const vmmLog = join(spec.vmDir, FirecrackerFiles.vmmLog);
    const pidFile = join(spec.vmDir, Files.vmmPid);
    const api = new FirecrackerApi(apiSocket, { timeoutMs: requestTimeoutMs });
    const cleanups = new CleanupStack();

    let pid = 0;
    let exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | undefined;
    let chrootDir: string | undefined;
    // Paths as Firecracker sees them (inside the chroot when jailed).
    let paths = { kernel: spec.kernel, initrd: spec.initrd, rootDisk: spec.rootDisk, workDisk: spec.workDisk, vsock: vsockSocket };
    let binary = '';

    const steps: Step[] = [
      {
        name: 'resolve-binary',
        run: async () => {
          binary = await resolveFirecrackerBinary(options.binary, options.env ?? process.env);
        },
      },
      {
        name: 'prepare-dirs',
        run: async () => {
          await mkdir(spec.runDir, { recursive: true, mode: 0o700 });
          await mkdir(spec.vmDir, { recursive: true });
          await mkdir(dirname(spec.serialLog), { recursive: true });
          // A Firecracker still serving this socket would be cut off from it: refuse instead. Only a socket that
          // nothing listens on (left behind by a VMM that exited) is removed; a slow answer is not "nobody".
          const probe = await probeApiSocket(apiSocket, 2000, signal);
          if (probe.serving) {
            throw new BangerError('conflict', `a Firecracker ${probe.info ? `(instance ${probe.info.id}) ` : ''}is already serving ${apiSocket}${probe.info ? '' : ` (${probe.detail})`}`, 'stop that VM first');
          }
          await rm(apiSocket, { force: true });
          await rm(vsockSocket, { force: true });
        },
      },
      options.jailer
        ? {
            name: 'jail',
            run: async () => {
              const j = options.jailer!;
              const req: JailRequest = { id: fcId, vmDir: spec.vmDir, binary, uid: j.uid, gid: j.gid, kernel: spec.kernel, initrd: spec.initrd, rootDisk: spec.rootDisk, workDisk: spec.workDisk };
              cleanups.add('remove jail', async () => {
                if (j.unjail) await j.unjail(fcId);
                else if (j.config) await removeJail(fcId, j.config);
              });
              let res: JailResult;
              if (j.launch) res = await j.launch(req, { signal });
              else if (j.config) res = await launchJailed(req, j.config);
              else throw new BangerError('internal', 'jailer configured without a launcher or a jailer config');
              pid = res.pid;
              chrootDir = res.chrootDir;
              cleanups.add('kill jailed firecracker', () => kill({ pid, qmpSocket: apiSocket, apiSocket, fcId, vsockSocket, vmDir: spec.vmDir, serialLog: spec.serialLog } as FirecrackerProcess));
              // At once: a daemon killed from here on leaves the pid where `vm delete` finds it.
              await writeFile(pidFile, `${pid}\n`);
              // Long chroot paths would break the 108-byte socket limit: reach them through short symlinks.
              await symlink(res.apiSocket, apiSocket);
              await symlink(join(res.chrootDir, res.jailPaths.vsock), vsockSocket);
              // The VMM writes its output inside the chroot; the VM directory links to it until it exits.
              for (const [link, target] of [[spec.serialLog, res.logs.serial], [vmmLog, res.logs.vmm]] as const) {
                await rm(link, { force: true });
                await symlink(target, link);
              }
              paths = { kernel: res.jailPaths.kernel, initrd: res.jailPaths.initrd, rootDisk: res.jailPaths.rootDisk, workDisk: res.jailPaths.workDisk, vsock: res.jailPaths.vsock };
            },
          }
        : {
            name: 'spawn',
            run: async () => {
              const s = spawnDetached(binary, ['--api-sock', apiSocket, '--id', fcId], { stdout: spec.serialLog, stderr: vmmLog }, spec.vmDir);
              await s.started;
              pid = s.child.pid!;
              exited = s.exited;
              cleanups.add('kill firecracker', () => kill({ pid, qmpSocket: apiSocket, apiSocket, fcId, vsockSocket, vmDir: spec.vmDir, serialLog: spec.serialLog } as FirecrackerProcess));
              await writeFile(pidFile, `${pid}\n`); // at once: a daemon killed from here on leaves the pid where `vm delete` finds it
            },
          },
      {
        name: 'wait-api-socket',
        run: async () => {
          await waitReady(api, pid, exited, fcId, [vmmLog, spec.serialLog], signal);
        },
      },
      {
        name: 'machine-config',
        run: () => api.put('/machine-config', { vcpu_count: spec.vcpus, mem_size_mib: spec.memoryMiB, smt: false } satisfies MachineConfiguration, { signal }),
      },
      {
        name: 'boot-source',
        run: () =>
          api.put(
            '/boot-source',
            { kernel_image_path: paths.kernel, boot_args: bootArgs(spec.cmdline), ...(paths.initrd ? { initrd_path: paths.initrd } : {}) } satisfies BootSource,
            { signal },
          ),
      },
      {
        name: 'drive-rootfs',
        run: () => api.put('/drives/rootfs', { drive_id: 'rootfs', path_on_host: paths.rootDisk, is_root_device: true, is_read_only: false } satisfies Drive, { signal }),
      },
      {
        name: 'drive-work',
        run: () => api.put('/drives/work', { drive_id: 'work', path_on_host: paths.workDisk, is_root_device: false, is_read_only: false } satisfies Drive, { signal }),
      },
      {
        name: 'network',
        run: async () => {
          if (net.mode !== 'tap') return;
          await api.put('/network-interfaces/eth0', { iface_id: 'eth0', host_dev_name: net.tap, guest_mac: net.mac.toLowerCase() } satisfies NetworkInterface, { signal });
        },
      },
      {
        name: 'vsock',
        run: () => api.put('/vsock', { guest_cid: GUEST_CID, uds_path: paths.vsock } satisfies Vsock, { signal }),
      },
      {
        name: 'instance-start',
        run: () => api.put('/actions', { action_type: 'InstanceStart' } satisfies InstanceActionInfo, { signal, timeoutMs: Math.max(requestTimeoutMs, 10_000) }),
      },
    ];

    const t0 = Date.now();
    for (const step of steps) {
      const started = Date.now();
      try {
        await step.run();
        log(`firecracker ${spec.id}: ${step.name} ${Date.now() - started} ms`);
      } catch (e) {
        log(`firecracker ${spec.id}: ${step.name} failed after ${Date.now() - started} ms: ${errorMessage(e)}`);
        const cleanupErrors = await cleanups.run();
        const suffix = cleanupErrors.length ? ` (cleanup also failed: ${cleanupErrors.join('; ')})` : '';
        if (e instanceof BangerError) {
          throw new BangerError(e.kind, `Firecracker launch failed at step ${step.name}: ${e.message}${suffix}`, e.hint, { cause: e });
        }
        throw new BangerError('host', `Firecracker launch failed at step ${step.name}: ${errorMessage(e)}${suffix}`, undefined, { cause: e });
      }
    }
    cleanups.release();
    log(`firecracker ${spec.id}: booted (pid ${pid}) in ${Date.now() - t0} ms`);
    return { pid, qmpSocket: apiSocket, apiSocket, vsockSocket, fcId, vmDir: spec.vmDir, serialLog: spec.serialLog, ...(chrootDir ? { chrootDir } : {}) };
  }

  return {
    kind: 'firecracker',
    launch,
    kill,
    api: apiFor,
    describe: (proc, opts) => apiFor(proc).describe(opts),

    async stop(proc, { timeoutMs, signal }) {
      if (!(await isOurs(proc))) {
        await removeSockets(proc);
        return 'already-gone';
      }
      let sent = false;
      try {
        await apiFor(proc).put('/actions', { action_type: 'SendCtrlAltDel' } satisfies InstanceActionInfo, { timeoutMs: 3000, signal });
        sent = true;
      } catch (e) {
        if (e instanceof BangerError && e.kind === 'aborted') throw e;
        log(`firecracker pid ${proc.pid}: SendCtrlAltDel failed (${errorMessage(e)}); killing`);
      }
      if (sent && (await waitGone(proc, timeoutMs, signal))) {
        await removeSockets(proc);
        return 'graceful';
      }
      if (!sent && !(await isOurs(proc))) {
        await removeSockets(proc);
        return 'already-gone';
      }
      if (signal?.aborted) throw new BangerError('aborted', 'stopping the VM: aborted');
      await kill(proc);
      return 'killed';
    },

    async status(proc) {
      const f = procFields(proc);
      const ident = await identifyFirecracker(proc.pid, f.fcId);
      const api = apiFor(proc);
      if (ident.id === 'gone' || ident.id === 'other') {
        const reasons =
          ident.id === 'gone'
            ? [`Firecracker process ${proc.pid} is not running${ident.detail ? ` (${ident.detail})` : ''}`]
            : [`pid ${proc.pid} now belongs to another program (${ident.detail}); the VM's Firecracker is gone`];
        const probe = await probeApiSocket(f.apiSocket, 500);
        if (probe.serving) return { state: 'broken', reasons: [...reasons, `yet something serves ${f.apiSocket} (${probe.detail})`] };
        return { state: 'gone', reasons };
      }
      if (ident.detail === 'exiting') return { state: 'shutdown', reasons: [`Firecracker process ${proc.pid} is exiting`] };
      let info: InstanceInfo;
      try {
        info = await api.describe({ timeoutMs: 2000 });
      } catch (e) {
        if (!(await isOurs(proc))) return { state: 'gone', reasons: [`Firecracker process ${proc.pid} exited`] };
        return { state: 'broken', reasons: [`Firecracker process ${proc.pid} is running but its API socket ${f.apiSocket} did not answer: ${errorMessage(e)}`] };
      }
      if (info.id !== f.fcId) {
        return { state: 'broken', reasons: [`the API socket ${f.apiSocket} answers for instance ${info.id}, expected ${f.fcId}`] };
      }
      const map: Record<string, VmmState> = { Running: 'running', Paused: 'paused' };
      const state = map[info.state];
      if (state) return { state, reasons: state === 'running' ? [] : [`Firecracker reports state '${info.state}'`] };
      return { state: 'broken', reasons: [`Firecracker process ${proc.pid} is up but reports state '${info.state}' (the instance was never started)`] };
    },

    async waitExit(proc, signal): Promise<VmmExit> {
      const child = children.get(proc.pid);
      // Our own child: its exit event tells how it ended. Not /proc first: it can show the child gone (a zombie)
      // before the event arrives, and the exit status would be lost.
      if (child) {
        const ex = await Promise.race([
          child,
          new Promise<never>((_, rej) => {
            if (signal.aborted) rej(new BangerError('aborted', 'waiting for Firecracker to exit: aborted'));
            signal.addEventListener('abort', () => rej(new BangerError('aborted', 'waiting for Firecracker to exit: aborted')), { once: true });
          }),
        ]);
        return { reason: describeExit(ex) };
      }
      if (!(await isOurs(proc))) return { reason: 'process not running' };
      while (await isOurs(proc)) await sleep(250, signal);
      return { reason: 'process exited' };
    },
  };
}

function describeExit(ex: { code: number | null; signal: NodeJS.Signals | null }): string {
  if (ex.signal) return `killed by ${ex.signal}`;
  if (ex.code === null) return 'process exited';
  return `exited with code ${ex.code}`;
}

/** The default Firecracker driver (binary from $BANGER_FIRECRACKER_BIN or PATH). */
export const firecrackerDriver: FirecrackerDriver = createFirecrackerDriver();
