/**
 * What the Firecracker driver and the jailer share: file names, ids, the binary, and who a pid is.
 */
import { closeSync, openSync } from 'node:fs';
import { access, constants as fsConstants, readFile } from 'node:fs/promises';
import { basename, delimiter, dirname, join, resolve } from 'node:path';
import { BangerError } from '../../../errors.js';
import { Files } from '../../../paths.js';
import { errnoCode as errno } from '../../exec/errno.js';
import { identifyProcess, type PidIdentity } from '../../exec/proc.js';
import { spawnDetached, type Detached, type ExitStatus } from '../../exec/spawn.js';
import { run } from '../../exec/runner.js';
import type { VmmProcess } from '../driver.js';

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

export async function tail(file: string, lines = 8): Promise<string> {
  try {
    const text = await readFile(file, 'utf8');
    return text.trim().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

// ───────────────────────────── binary ─────────────────────────────

/**
 * The Firecracker binary: the option (config key `firecrackerBin`), else $BANGER_FIRECRACKER_BIN, else
 * `firecracker` on PATH. Missing → `not_found` naming what was tried and how to set it.
 */
/** What `firecracker --version` says its version is (`1.16.0`), or undefined when it says nothing of the kind. */
export async function firecrackerVersion(binary: string): Promise<string | undefined> {
  const r = await run(binary, ['--version'], { reject: false, timeoutMs: 5000 }).catch(() => undefined);
  return r ? /Firecracker v?(\d+\.\d+\.\d+\S*)/.exec(r.stdout)?.[1] : undefined;
}

/** The first Firecracker whose PUT /snapshot/load takes `vsock_override`, without which a restore binds the source's socket. */
export const SNAPSHOT_LOAD_MIN_VERSION = [1, 16] as const;

/** Does a Firecracker of this version (`1.16.0`, `v1.16.0-dev`) restore a banger snapshot (vsock_override)? */
export function restoresSnapshots(version: string): boolean {
  const m = /^v?(\d+)\.(\d+)/.exec(version);
  const [major, minor] = SNAPSHOT_LOAD_MIN_VERSION;
  return !!m && (Number(m[1]) > major || (Number(m[1]) === major && Number(m[2]) >= minor));
}

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

export function procFields(proc: VmmProcess): { apiSocket: string; fcId: string; vsockSocket?: string; vmDir?: string; serialLog?: string } {
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
const children = new Map<number, Promise<ExitStatus>>();

/** How the child `pid` of this process ends, when this process spawned it (and not long ago). */
export function childExit(pid: number): Promise<ExitStatus> | undefined {
  return children.get(pid);
}

/** Starts a VMM (or the jailer) detached, stdout and stderr appended to files, and remembers how it ends. */
export function spawnVmm(file: string, args: string[], out: { stdout: string; stderr: string }, cwd?: string): Detached {
  const outFd = openSync(out.stdout, 'a', 0o640);
  const errFd = out.stderr === out.stdout ? outFd : openSync(out.stderr, 'a', 0o640);
  try {
    const d = spawnDetached(file, args, { logFd: outFd, stderrFd: errFd, cwd });
    if (d.pid > 0) {
      children.set(d.pid, d.exitStatus);
      void d.exitStatus.then(() => setTimeout(() => children.delete(d.pid), 60_000).unref());
    }
    return d;
  } finally {
    closeSync(outFd);
    if (errFd !== outFd) closeSync(errFd);
  }
}

export function describeExit(ex: ExitStatus): string {
  if (ex.signal) return `killed by ${ex.signal}`;
  if (ex.code === null) return 'process exited';
  return `exited with code ${ex.code}`;
}
