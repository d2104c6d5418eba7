/**
 * Firecracker's jailer, as root: the chroot with the VM's files hard-linked in, the launch, and the removal.
 * Called by the root helper (or by the daemon when it runs as root).
 */
import { closeSync, fchownSync, openSync, unlinkSync } from 'node:fs';
import { access, constants as fsConstants, lchown, link, lstat, mkdir, open, readdir, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import { basename, delimiter, dirname, join, resolve } from 'node:path';
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

/** Who a jail was made for, written next to its `root` by launchJailed and checked by removeJail. */
export interface JailOwner {
  uid: number;
  /** The owner's tag (ownerTag of uid and state directory): one user's two homes do not share jails. */
  tag: string;
}

export const JAIL_OWNER_FILE = 'banger-owner.json';

export interface JailOpOptions {
  /** Recorded with the jail (launch) / required to match the record (remove). */
  owner?: JailOwner;
  /** Aborts the work between steps (a launched jailer is killed again). */
  signal?: AbortSignal;
}

function aborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new BangerError('aborted', `${what}: aborted (${errorMessage(signal.reason)})`);
}

/**
 * Hard-link `src` to `dest` (a new name in a root-owned directory). The file must be a regular file owned by
 * `uid`: root never hands a file of someone else to the jail. The owner controls the directories above `src`,
 * so its parent is opened first without following a link and checked to be the validated directory (readlink
 * of /proc/self/fd/N); the link is then made through that descriptor (`/proc/self/fd/N/<name>`), so a parent
 * swapped after validation is never walked. link() does not follow a symlink at the last component.
 */
async function linkOwned(src: string, dest: string, uid: number): Promise<void> {
  const dir = dirname(src);
  let parent;
  try {
    parent = await open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW);
  } catch (e) {
    throw new BangerError('invalid_params', `refused to put ${src} in the jail: its directory cannot be opened without following links (${errno(e) ?? errorMessage(e)})`);
  }
  try {
    const real = await readlink(`/proc/self/fd/${parent.fd}`);
    if (real !== dir) throw new BangerError('invalid_params', `refused to put ${src} in the jail: ${dir} changed after it was checked (it is now ${real})`);
    await rm(dest, { force: true });
    await link(`/proc/self/fd/${parent.fd}/${basename(src)}`, dest);
  } catch (e) {
    if (e instanceof BangerError) throw e;
    throw new BangerError(
      'host',
      `cannot hard-link ${src} into the jail (${errno(e) ?? errorMessage(e)})`,
      errno(e) === 'EXDEV' ? 'put the jailer chroot base on the same filesystem as banger\'s state directory' : undefined,
    );
  } finally {
    await parent.close();
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
export async function launchJailed(req: JailRequest, cfg: JailerConfig, opts: JailOpOptions = {}): Promise<JailResult> {
  if (req.uid === 0 || req.gid === 0) throw new BangerError('invalid_params', 'refused to jail Firecracker as root (uid or gid 0): the jailer exists to drop root');
  const jailer = cfg.jailerBin ?? (await findOnPath('jailer'));
  if (!jailer) throw new BangerError('not_found', 'the Firecracker jailer was not found on PATH', 'install jailer next to firecracker, or configure the helper\'s jailer binary');
  const fcId = firecrackerId(req.id);
  const base = resolve(cfg.chrootBase);
  await assertRootOwnedDir(base);
  const execDir = join(base, basename(req.binary));
  await mkdir(execDir, { recursive: true, mode: 0o755 });
  await assertRootOwnedDir(execDir);
  const jailDir = join(execDir, fcId);
  try {
    await mkdir(jailDir, { mode: 0o755 }); // not recursive: an id already jailed is refused, never overwritten
  } catch (e) {
    if (errno(e) === 'EEXIST') throw new BangerError('conflict', `refused to jail ${fcId}: it is already jailed (${jailDir})`, 'stop the VM (its jail is removed then) or use another id');
    throw e;
  }
  let pid: number | undefined;
  try {
    await writeFile(join(jailDir, JAIL_OWNER_FILE), `${JSON.stringify(opts.owner ?? { uid: req.uid, tag: '' })}\n`, { mode: 0o644, flag: 'wx' });
    const launched = await populateAndSpawn(req, jailer, base, join(jailDir, 'root'), fcId, opts.signal, (p) => (pid = p));
    aborted(opts.signal, `jailing ${fcId}`);
    return launched;
  } catch (e) {
    if (pid) killQuietly(pid);
    await rm(jailDir, { recursive: true, force: true });
    throw e;
  }
}

function killQuietly(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    /* gone */
  }
}

async function populateAndSpawn(req: JailRequest, jailer: string, base: string, chrootDir: string, fcId: string, signal: AbortSignal | undefined, onPid: (pid: number) => void): Promise<JailResult> {
  await mkdir(chrootDir, { mode: 0o755 });
  const placed: Array<[string, string]> = [
    [req.kernel, JAIL_FILES.kernel],
    ...(req.initrd ? ([[req.initrd, JAIL_FILES.initrd]] as Array<[string, string]>) : []),
    [req.rootDisk, JAIL_FILES.rootDisk],
    [req.workDisk, JAIL_FILES.workDisk],
  ];
  for (const [src, inJail] of placed) {
    aborted(signal, `jailing ${fcId}`);
    await linkOwned(src, join(chrootDir, inJail), req.uid);
  }
  const runDir = join(chrootDir, 'run');
  await mkdir(runDir, { mode: 0o755 });
  await lchown(runDir, req.uid, req.gid);

  const logs = { serial: join(chrootDir, JAIL_FILES.serialLog), vmm: join(chrootDir, JAIL_FILES.vmmLog) };
  createOwnedLog(logs.serial, req.uid, req.gid);
  createOwnedLog(logs.vmm, req.uid, req.gid);
  aborted(signal, `jailing ${fcId}`);
  const args = ['--id', fcId, '--exec-file', req.binary, '--uid', String(req.uid), '--gid', String(req.gid), '--chroot-base-dir', base, '--', '--api-sock', JAIL_API_SOCKET];
  const { pid, started } = spawnVmm(jailer, args, { stdout: logs.serial, stderr: logs.vmm }, chrootDir);
  onPid(pid);
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
export async function removeJail(id: string, cfg: Pick<JailerConfig, 'chrootBase'>, opts: JailOpOptions = {}): Promise<{ removed: string[] }> {
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
  const found: string[] = [];
  for (const d of execDirs) {
    const dir = join(base, d, fcId);
    try {
      if ((await lstat(dir)).isDirectory()) found.push(dir);
    } catch {
      /* not this one */
    }
  }
  // Every jail of this id must be the owner's before any is touched.
  if (opts.owner) for (const dir of found) await assertJailOwner(dir, opts.owner);
  const removed: string[] = [];
  for (const dir of found) {
    aborted(opts.signal, `removing the jail of ${fcId}`);
    const sock = join(dir, 'root', JAIL_API_SOCKET);
    const probe = await probeApiSocket(sock, 2000);
    if (probe.serving) throw new BangerError('conflict', `refused to remove the jail ${dir}: its Firecracker is still running (${probe.detail})`, 'stop the VM first');
    aborted(opts.signal, `removing the jail of ${fcId}`);
    await rm(dir, { recursive: true, force: true });
    removed.push(dir);
  }
  return { removed };
}

/** The jail at `dir` was recorded for `owner` (uid and tag); a jail without a record belongs to nobody who asks. */
async function assertJailOwner(dir: string, owner: JailOwner): Promise<void> {
  let recorded: Partial<JailOwner> | undefined;
  try {
    recorded = JSON.parse(await readFile(join(dir, JAIL_OWNER_FILE), 'utf8')) as Partial<JailOwner>;
  } catch {
    recorded = undefined;
  }
  if (!recorded || recorded.uid !== owner.uid || recorded.tag !== owner.tag) {
    throw new BangerError('invalid_params', `refused to remove the jail ${dir}: it is not recorded as this owner's (uid ${owner.uid})`);
  }
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
