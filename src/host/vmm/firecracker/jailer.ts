/**
 * Firecracker's jailer, as root: the chroot with the VM's files hard-linked in, the launch, and the removal.
 * Called by the root helper (or by the daemon when it runs as root).
 */
import { closeSync, fchownSync, openSync, unlinkSync } from 'node:fs';
import { access, constants as fsConstants, lchown, link, lstat, mkdir, readdir, rm } from 'node:fs/promises';
import { basename, delimiter, join, resolve } from 'node:path';
import { BangerError, errorMessage } from '../../../errors.js';
import { errnoCode as errno } from '../../exec/errno.js';
import { probeApiSocket } from './api.js';
import { firecrackerId, JAIL_API_SOCKET, JAIL_FILES, spawnVmm } from './process.js';

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
  const { pid, started } = spawnVmm(jailer, args, { stdout: logs.serial, stderr: logs.vmm }, chrootDir);
  await started;
  return {
    pid,
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
