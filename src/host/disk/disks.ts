import { createHash, randomBytes } from 'node:crypto';
import { isIP } from 'node:net';
import { copyFile, link, lstat, mkdir, mkdtemp, readFile, readdir, readlink, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, posix } from 'node:path';
import { BangerError } from '../../errors.js';
import { run, which, type Runner } from '../exec/runner.js';
import {
  DebugfsScript,
  S_IFDIR,
  S_IFREG,
  debugfsQuote,
  debugfsRequest,
  isDebugfsSafe,
  rdumpDir,
  runDebugfs,
} from './debugfs.js';

interface Ctx {
  runner?: Runner;
  signal?: AbortSignal;
}

const exists = (p: string) =>
  lstat(p).then(
    () => true,
    () => false,
  );

// ---------------------------------------------------------------------------------------------------------------
// Sizes

const UNITS: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

/**
 * Parse a size: plain bytes ("1048576") or a number with a binary unit K/M/G/T (optionally "iB"/"B": "512M",
 * "8G", "1.5G", "2GiB"). Fractions are rounded down to whole bytes.
 */
export function parseSize(s: string): number {
  const m = typeof s === 'string' ? /^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$/i.exec(s) : null;
  const unit = m ? m[2].toUpperCase() : '';
  // "512b" (bytes) is fine, "1ib" is not
  if (!m || (m[3] && m[3].toLowerCase() === 'ib' && unit === '')) {
    throw new BangerError('usage', `invalid size ${JSON.stringify(s)}`, 'write a size like 512M, 8G, 1.5G or a number of bytes');
  }
  const n = Math.floor(Number(m[1]) * UNITS[unit]);
  if (!Number.isSafeInteger(n)) throw new BangerError('usage', `size ${JSON.stringify(s)} is too large`, 'write a smaller size');
  return n;
}

export function formatSize(n: number): string {
  for (const [u, v] of [['T', 2 ** 40], ['G', 2 ** 30], ['M', 2 ** 20], ['K', 2 ** 10]] as const) {
    if (n >= v && n % (v / 16) === 0) return `${+(n / v).toFixed(4)}${u}`;
  }
  return `${n}B`;
}

// ---------------------------------------------------------------------------------------------------------------
// Copy-on-write clones

export type CowStrategy = 'reflink' | 'sparse-copy';

/** Sidecar next to a cloned disk recording how it was made: `<dst>.cow` holds "reflink" or "sparse-copy". */
export const cowRecordPath = (dst: string) => `${dst}.cow`;

/** Filesystems (st_dev) where `cp --reflink=always` failed in this process: clones there go straight to a sparse copy. */
const noReflink = new Set<number>();

/**
 * Copy-on-write clone of a disk image: `cp --reflink=always` (FICLONE) where the filesystem supports it, else
 * `cp --sparse=always`. The copy is made at `dst.partial` and renamed into place, so `dst` is never half-written.
 *
 * Idempotent: if `dst` already exists it is left untouched and the strategy recorded in the `dst.cow` sidecar
 * (written just before the rename) is returned. A `dst` without a sidecar was not made by cloneDisk: that is a
 * conflict error rather than a guess. The caller deletes `dst` and `dst.cow` together (both live in the VM dir).
 */
export async function cloneDisk(src: string, dst: string, opts: Ctx = {}): Promise<CowStrategy> {
  const runner = opts.runner ?? run;
  const record = cowRecordPath(dst);
  if (await exists(dst)) {
    const recorded = (await readFile(record, 'utf8').catch(() => '')).trim();
    if (recorded === 'reflink' || recorded === 'sparse-copy') return recorded;
    throw new BangerError('conflict', `${dst} already exists and was not made by cloneDisk`, `remove ${dst} and try again`);
  }
  const st = await stat(src).catch(() => undefined);
  if (!st?.isFile()) throw new BangerError('not_found', `disk image ${src} does not exist`, 'pull or import the image again');
  const partial = `${dst}.partial`;
  await rm(partial, { force: true });
  try {
    let strategy: CowStrategy = 'reflink';
    const dev = (await stat(dirname(dst))).dev;
    const r = noReflink.has(dev) ? undefined : await runner('cp', ['--reflink=always', '--', src, partial], { signal: opts.signal, reject: false });
    if (r?.exitCode !== 0) {
      if (r) noReflink.add(dev);
      await rm(partial, { force: true });
      strategy = 'sparse-copy';
      await runner('cp', ['--sparse=always', '--', src, partial], { signal: opts.signal });
    }
    await writeFile(`${record}.partial`, strategy + '\n');
    await rename(`${record}.partial`, record);
    await rename(partial, dst);
    return strategy;
  } catch (e) {
    await rm(partial, { force: true });
    await rm(`${record}.partial`, { force: true });
    throw e;
  }
}

/** Filesystem type of a directory, as `stat -f -c %T` names it (ext2/ext3, xfs, btrfs, tmpfs, ...). */
export async function filesystemType(dir: string, opts: Ctx = {}): Promise<string> {
  const runner = opts.runner ?? run;
  const r = await runner('stat', ['-f', '-c', '%T', dir], { signal: opts.signal, reject: false });
  return r.exitCode === 0 ? r.stdout.trim() : 'unknown';
}

/** Which copy-on-write strategies work for disks kept in `dir`, and why not (for `banger doctor`). */
export async function probeCowStrategies(
  dir: string,
  opts: Ctx = {},
): Promise<Array<{ strategy: CowStrategy | 'qcow2-overlay'; ok: boolean; why: string }>> {
  const runner = opts.runner ?? run;
  const fsType = await filesystemType(dir, opts);
  const probe = await mkdtemp(join(dir, '.banger-cow-probe-'));
  const out: Array<{ strategy: CowStrategy | 'qcow2-overlay'; ok: boolean; why: string }> = [];
  try {
    const src = join(probe, 'src');
    await writeFile(src, randomBytes(64 * 1024));
    const r = await runner('cp', ['--reflink=always', '--', src, join(probe, 'reflink')], { signal: opts.signal, reject: false });
    if (r.exitCode === 0) {
      out.push({ strategy: 'reflink', ok: true, why: `${fsType} supports reflink (FICLONE): clones are instant and share blocks` });
    } else {
      const msg = r.stderr.trim().split('\n').pop() ?? '';
      out.push({
        strategy: 'reflink',
        ok: false,
        why: `${fsType} at ${dir} does not support reflink (FICLONE)${msg ? `: ${msg.replace(/^cp: /, '')}` : ''}; btrfs or xfs (reflink=1) do`,
      });
    }
    const s = await runner('cp', ['--sparse=always', '--', src, join(probe, 'sparse')], { signal: opts.signal, reject: false });
    out.push(
      s.exitCode === 0
        ? { strategy: 'sparse-copy', ok: true, why: 'works everywhere; copies every allocated block, so its cost grows with the image' }
        : { strategy: 'sparse-copy', ok: false, why: `cp --sparse=always failed in ${dir}: ${s.stderr.trim()}` },
    );
  } finally {
    await rm(probe, { recursive: true, force: true });
  }
  const qemuImg = await which('qemu-img', runner);
  const overlayUse = 'QEMU VMs get a qcow2 overlay on the image (constant time, any filesystem) when the image applies its identity from an identity disk (built by banger ≥ 4), and one on a hard link of the cached work disk when they are made for a cached workspace; Firecracker and other images use reflink, else a sparse copy';
  out.push(
    qemuImg
      ? { strategy: 'qcow2-overlay', ok: true, why: `qemu-img found (${qemuImg}): ${overlayUse}` }
      : { strategy: 'qcow2-overlay', ok: false, why: `qemu-img not found (package qemu-utils): every root disk is a reflink or a sparse copy, whose cost grows with the image` },
  );
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// qcow2 overlays (QEMU only)

/** How a VM's root disk was made: a qcow2 overlay on the image's rootfs, or a raw clone (reflink / sparse copy). */
export type RootDiskStrategy = 'qcow2-overlay' | CowStrategy;

/**
 * A qcow2 overlay whose backing file is `backing` (raw, opened read-only by QEMU and never written): its cost does
 * not depend on the image's size. `qemu-img` (given an argv, never a shell string) makes one template per backing
 * file in `templateDir` (the image's directory, so it goes with the image; named by the backing file's path, inode,
 * size and mtime, so a rebuilt image never gets a stale one); each VM's overlay is a copy of it (about 200 KB), which saves the ~40-100 ms qemu-img takes to start.
 * Built at `dst.partial` and renamed, so `dst` is never half-made. Idempotent: an existing `dst` is kept.
 */
export async function overlayDisk(backing: string, dst: string, opts: Ctx & { templateDir: string }): Promise<'qcow2-overlay'> {
  if (await exists(dst)) return 'qcow2-overlay';
  if (!isAbsolute(backing)) throw new BangerError('invalid_params', `backing file ${backing} must be an absolute path`);
  const st = await stat(backing).catch(() => undefined);
  if (!st?.isFile()) throw new BangerError('not_found', `disk image ${backing} does not exist`, 'pull or import the image again');
  const key = createHash('sha256').update(`${backing}\0${st.ino}\0${st.size}\0${st.mtimeMs}`).digest('hex').slice(0, 24);
  await copyOf(await overlayTemplate(backing, st.size, join(opts.templateDir, `.root-overlay-${key}.qcow2`), opts), dst);
  return 'qcow2-overlay';
}

/** The name a cached work disk's link has beside its overlay (the overlay names it relative, see overlayOnCachedDisk). */
export const CACHED_BASE_NAME = 'work.base.img';

/**
 * A QEMU VM's work disk from the workspace cache in constant time: a hard link of the cached disk `cached` in the
 * overlay's directory (so evicting the entry frees nothing the VM still reads, and nothing is copied) and a qcow2
 * overlay `dst` on it. The overlay names its backing file relative (CACHED_BASE_NAME), so a snapshot that takes
 * both files into its own directory needs no rebase. Its template lives in `templateDir`, one per disk size.
 * Throws where no hard link can be made (another filesystem): the caller copies instead.
 */
export async function overlayOnCachedDisk(cached: string, dst: string, opts: Ctx & { templateDir: string }): Promise<'qcow2-overlay'> {
  const base = join(dirname(dst), CACHED_BASE_NAME);
  await rm(base, { force: true });
  await link(cached, base);
  const { size } = await stat(base);
  await rm(dst, { force: true });
  await copyOf(await overlayTemplate(CACHED_BASE_NAME, size, join(opts.templateDir, `.work-overlay-${size}.qcow2`), opts), dst);
  return 'qcow2-overlay';
}

/** `template`, made once by qemu-img: a qcow2 of `size` bytes over the raw `backing` (a path, or a name relative to the overlay). */
async function overlayTemplate(backing: string, size: number, template: string, opts: Ctx): Promise<string> {
  if (await exists(template)) return template;
  await mkdir(dirname(template), { recursive: true, mode: 0o700 });
  const partial = `${template}.${process.pid}.${randomBytes(4).toString('hex')}.partial`;
  try {
    // -u: qemu-img does not open the backing file; its size is given instead.
    await (opts.runner ?? run)('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', backing, '-u', partial, String(size)], { signal: opts.signal });
    await rename(partial, template);
    return template;
  } catch (e) {
    await rm(partial, { force: true });
    throw e;
  }
}

/** A copy of `template` at `dst`, made at `dst.partial` and renamed, so `dst` is never half-made. */
async function copyOf(template: string, dst: string): Promise<void> {
  const partial = `${dst}.partial`;
  try {
    await copyFile(template, partial);
    await rename(partial, dst);
  } catch (e) {
    await rm(partial, { force: true });
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-VM identity (customizeRootDisk writes it into a cloned root disk; identity-disk.ts puts it on a disk of its own)

export interface Identity {
  hostname: string;
  hostKey: { privateKey: string; publicKey: string };
  network: NetworkConfig;
}

export function validateIdentity(id: Identity): void {
  if (!HOSTNAME_RE.test(id.hostname)) {
    throw new BangerError('usage', `invalid hostname ${JSON.stringify(id.hostname)}`, 'a hostname is letters, digits and hyphens, in dot-separated labels');
  }
  if (!id.hostKey.privateKey.includes('PRIVATE KEY') || !id.hostKey.publicKey.trim()) {
    throw new BangerError('invalid_params', 'a VM identity needs an OpenSSH private host key and its public key');
  }
  validateNetwork(id.network);
}

export const resolvConf = (dns: string[]) => ['# written by banger', ...dns.map((d) => `nameserver ${d}`)].join('\n') + '\n';

// ---------------------------------------------------------------------------------------------------------------
// Root disk customisation

/** A static network's `mac`: the NIC's address, set by the guest when it applies its identity on a refresh (a fork). */
export type NetworkConfig = { mode: 'dhcp' } | { mode: 'static'; address: string; gateway: string; dns: string[]; mac?: string };

const HOSTNAME_RE = /^(?=.{1,253}$)[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$/;

function validateNetwork(net: NetworkConfig): void {
  if (net.mode === 'dhcp') return;
  const bad = (what: string, v: unknown) =>
    new BangerError('usage', `invalid ${what} ${JSON.stringify(v)}`, 'static networks need an address in CIDR form (10.0.0.2/24), a gateway IP and DNS server IPs');
  const [ip, len, extra] = String(net.address).split('/');
  const fam = isIP(ip ?? '');
  const max = fam === 6 ? 128 : 32;
  if (!fam || extra !== undefined || !/^\d{1,3}$/.test(len ?? '') || Number(len) > max) throw bad('address', net.address);
  if (!isIP(net.gateway)) throw bad('gateway', net.gateway);
  for (const d of net.dns) if (!isIP(d)) throw bad('DNS server', d);
  if (net.mac !== undefined && !/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/.test(net.mac)) throw bad('MAC address', net.mac);
}

/** The systemd-networkd file banger writes into every guest. */
export function networkdUnit(net: NetworkConfig): string {
  const lines = ['# written by banger', '[Match]', 'Name=e* en*', '', '[Network]'];
  if (net.mode === 'dhcp') lines.push('DHCP=ipv4');
  else {
    lines.push(`Address=${net.address}`, `Gateway=${net.gateway}`);
    for (const d of net.dns) lines.push(`DNS=${d}`);
    lines.push('LinkLocalAddressing=no', 'IPv6AcceptRA=no');
  }
  return lines.join('\n') + '\n';
}

export const withNewline = (s: string) => (s.endsWith('\n') ? s : s + '\n');


// ---------------------------------------------------------------------------------------------------------------
// Work disk

type Entry =
  | { kind: 'dir'; mode: number }
  | { kind: 'file'; host: string; mode: number }
  | { kind: 'symlink'; target: string };

/** Guest paths (relative to the work disk's root, i.e. to /root in the guest) → what to put there. */
class Plan {
  readonly entries = new Map<string, Entry>();

  private ensureParents(rel: string, origin: string): void {
    const parts = rel.split('/');
    for (let i = 1; i < parts.length; i++) {
      const p = parts.slice(0, i).join('/');
      const e = this.entries.get(p);
      if (!e) this.entries.set(p, { kind: 'dir', mode: 0o755 });
      else if (e.kind !== 'dir') {
        throw new BangerError('conflict', `${origin}: /root/${p} is a ${e.kind === 'file' ? 'file' : 'symlink'}, not a directory`, 'fix the file_sync entries');
      }
    }
  }

  set(rel: string, entry: Entry, origin: string): void {
    this.ensureParents(rel, origin);
    const old = this.entries.get(rel);
    if (old && old.kind === 'dir' && entry.kind === 'dir') {
      old.mode = entry.mode;
      return;
    }
    if (old && old.kind === 'dir') {
      // a file replaces a directory: drop the directory's subtree
      for (const k of [...this.entries.keys()]) if (k.startsWith(rel + '/')) this.entries.delete(k);
    }
    this.entries.set(rel, entry);
  }

  /** Add a host tree (a directory's contents, recursively) under guest dir `rel` ('' = disk root). */
  async addTree(hostDir: string, rel: string, origin: string, skip: (name: string, rel: string) => boolean = () => false): Promise<void> {
    const names = (await readdir(hostDir)).sort();
    for (const name of names) {
      const childRel = rel ? `${rel}/${name}` : name;
      if (skip(name, childRel)) continue;
      await this.addPath(join(hostDir, name), childRel, origin, false);
    }
  }

  async addPath(host: string, rel: string, origin: string, followTop: boolean): Promise<void> {
    const st = followTop ? await stat(host) : await lstat(host);
    if (st.isSymbolicLink()) this.set(rel, { kind: 'symlink', target: await readlink(host) }, origin);
    else if (st.isDirectory()) {
      this.set(rel, { kind: 'dir', mode: st.mode & 0o7777 }, origin);
      await this.addTree(host, rel, origin);
    } else if (st.isFile()) this.set(rel, { kind: 'file', host, mode: st.mode & 0o7777 }, origin);
    // sockets, fifos and devices are skipped
  }
}

function validateGuestRel(guest: string): string {
  const bad = (why: string) =>
    new BangerError('usage', `file_sync guest path ${JSON.stringify(guest)} ${why}`, 'guest paths are relative to /root, e.g. ".config/gh/hosts.yml"');
  if (typeof guest !== 'string' || guest.trim() === '') throw bad('is empty');
  if (guest.startsWith('/') || guest.startsWith('~')) throw bad('must be relative to /root, not absolute');
  const parts = guest.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.some((p) => p === '..')) throw bad("must not contain '..'");
  if (parts.length === 0) throw bad('names /root itself');
  if (parts[0] === 'lost+found') throw bad('is inside lost+found');
  const rel = parts.join('/');
  if (!isDebugfsSafe(rel)) throw bad('contains a double quote or a newline');
  return rel;
}

/** The comment above a default identity in the guest's .gitconfig. */
export const DEFAULT_IDENTITY_NOTE =
  '# Set by banger because the host has no git identity (git config --global user.name / user.email): replace it with yours.';

/**
 * `text` (a .gitconfig) without its [user] section and the default identity's note: what a workspace cache entry
 * keeps, so that each VM made from it gets its own identity (the guest appends it at boot from its identity disk).
 */
export function withoutGitIdentity(text: string): string {
  const out: string[] = [];
  let inUser = false;
  for (const line of text.split(/(?<=\n)/)) {
    if (/^\s*\[/.test(line)) inUser = /^\s*\[user\]\s*$/i.test(line);
    if (!inUser && line.trimEnd() !== DEFAULT_IDENTITY_NOTE) out.push(line);
  }
  return out.join('');
}

/** A git config value, quoted when needed. */
/** The work disk's /root/.gitconfig: the seed's (`prev`) with the git identity appended as [user]. */
export function gitconfigWithIdentity(prev: string, gi: NonNullable<WorkDiskOptions['gitIdentity']>): string {
  let text = prev && !prev.endsWith('\n') ? prev + '\n' : prev;
  if (gi.source === 'default') text += `${DEFAULT_IDENTITY_NOTE}\n`;
  text += '[user]\n';
  if (gi.name) text += `\tname = ${gitValue(gi.name)}\n`;
  if (gi.email) text += `\temail = ${gitValue(gi.email)}\n`;
  return text;
}

function gitValue(v: string): string {
  if (/[\n\r\0]/.test(v)) throw new BangerError('usage', `git identity ${JSON.stringify(v)} contains a newline`);
  return /^\s|\s$|["\\;#]/.test(v) ? `"${v.replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"` : v;
}

export interface WorkDiskOptions {
  sizeBytes: number;
  /** An ext4 image whose contents become the work disk's initial contents (the image's work-seed.ext4). */
  seedImage: string;
  /** Filesystem label (default banger-work; the guest's fstab mounts LABEL=banger-work at /root). */
  label?: string;
  /** Contents of /root/.ssh/authorized_keys (replaces the seed's). */
  authorizedKeys: string;
  /** Written as the [user] of /root/.gitconfig; source 'default' adds a comment saying the host had none. */
  gitIdentity?: { name?: string; email?: string; source?: 'host' | 'default' };
  /** Host file or directory → path relative to /root. */
  fileSync?: Array<{ host: string; guest: string }>;
  runner?: Runner;
  signal?: AbortSignal;
}

/**
 * Make a VM's work disk (mounted at /root in the guest): a sparse file of the final size with a lazily
 * initialised ext4, then the seed's contents, authorized_keys, git identity and file_sync entries written in with
 * a single debugfs script, all root:root with modes kept. Nothing is mounted, nothing needs root, and the cost
 * depends on the contents, not on sizeBytes. Built at `path.partial`, renamed to `path` at the end.
 * Refuses to overwrite an existing `path` (it may hold the user's work).
 */
export async function createWorkDisk(path: string, opts: WorkDiskOptions): Promise<{ ms: number }> {
  const t0 = performance.now();
  const runner = opts.runner ?? run;
  const signal = opts.signal;
  const { label, sync } = await checkWorkDiskOptions(path, opts);
  const partial = `${path}.partial`;
  const tmp = await mkdtemp(join(tmpdir(), 'banger-work-'));
  await rm(partial, { force: true });
  try {
    await runner('truncate', ['-s', String(opts.sizeBytes), partial], { signal });
    await runner(
      'mkfs.ext4',
      ['-F', '-q', '-L', label, '-E', 'lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0', partial],
      { signal },
    );
    const plan = await planWorkDisk(tmp, opts, sync, runner);
    await runDebugfs(partial, await debugfsScriptOf(plan, tmp), { runner, signal });
    await rename(partial, path);
  } catch (e) {
    await rm(partial, { force: true });
    throw e;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return { ms: performance.now() - t0 };
}

/** The size, the label, a free path, the seed and every file_sync source: checked before anything is made. */
async function checkWorkDiskOptions(path: string, opts: WorkDiskOptions) {
  const label = opts.label ?? 'banger-work';
  if (!Number.isSafeInteger(opts.sizeBytes) || opts.sizeBytes < 16 * 2 ** 20) {
    throw new BangerError('usage', `work disk size ${opts.sizeBytes} is too small`, 'give at least 16M');
  }
  if (!/^[\w.-]{1,16}$/.test(label)) throw new BangerError('usage', `invalid filesystem label ${JSON.stringify(label)}`, 'at most 16 letters, digits, ".", "_" or "-"');
  if (await exists(path)) throw new BangerError('conflict', `work disk ${path} already exists`, 'delete it first if you really want a fresh one');
  if (!(await stat(opts.seedImage).then((s) => s.isFile(), () => false))) {
    throw new BangerError('not_found', `work seed ${opts.seedImage} does not exist`, 'pull or import the image again');
  }
  const sync = (opts.fileSync ?? []).map((e) => ({ host: e.host, rel: validateGuestRel(e.guest) }));
  for (const e of sync) {
    if (!(await stat(e.host).then(() => true, () => false))) {
      throw new BangerError('not_found', `file_sync source ${e.host} does not exist`, `create ${e.host} or remove it from file_sync in the config`);
    }
  }
  return { label, sync };
}

/** What goes on the disk: the seed's contents (dumped into `tmp`), authorized_keys, the git identity, file_sync. */
async function planWorkDisk(tmp: string, opts: WorkDiskOptions, sync: Array<{ host: string; rel: string }>, runner: Runner): Promise<Plan> {
  const seedDir = join(tmp, 'seed');
  await rdumpDir(opts.seedImage, '/', seedDir, { runner, signal: opts.signal });
  const plan = new Plan();
  await plan.addTree(seedDir, '', 'work seed', (_name, rel) => rel === 'lost+found');

  const ssh = plan.entries.get('.ssh');
  if (ssh && ssh.kind !== 'dir') throw new BangerError('invalid_state', 'the work seed has a /root/.ssh that is not a directory');
  plan.set('.ssh', { kind: 'dir', mode: 0o700 }, 'authorized_keys');
  const ak = join(tmp, 'authorized_keys');
  await writeFile(ak, withNewline(opts.authorizedKeys.trim()), { mode: 0o600 });
  plan.set('.ssh/authorized_keys', { kind: 'file', host: ak, mode: 0o600 }, 'authorized_keys');

  // the git identity, appended to the seed's .gitconfig if it has one
  const gi = opts.gitIdentity;
  if (gi && (gi.name || gi.email)) {
    const old = plan.entries.get('.gitconfig');
    const text = gitconfigWithIdentity(old?.kind === 'file' ? await readFile(old.host, 'utf8') : '', gi);
    const gc = join(tmp, 'gitconfig');
    await writeFile(gc, text, { mode: 0o644 });
    plan.set('.gitconfig', { kind: 'file', host: gc, mode: old?.kind === 'file' ? old.mode : 0o644 }, 'git identity');
  }

  for (const e of sync) await plan.addPath(e.host, e.rel, `file_sync ${e.host}`, true);
  return plan;
}

/** One debugfs script for the whole plan, all root:root with modes kept. Sorted paths put every directory before its contents. */
async function debugfsScriptOf(plan: Plan, tmp: string): Promise<DebugfsScript> {
  let refs = 0;
  const hostRef = async (p: string): Promise<string> => {
    if (isDebugfsSafe(p)) return p;
    const ref = join(tmp, `ref-${refs++}`);
    await symlink(p, ref); // debugfs `write` follows it
    return ref;
  };
  const s = new DebugfsScript();
  // The disk's root is the guest's /root: 0700 as on Debian (mkfs -d always makes the seed's root 0755, so the
  // seed cannot carry this).
  s.setAttrs('/', S_IFDIR | 0o700);
  for (const rel of [...plan.entries.keys()].sort()) {
    const e = plan.entries.get(rel)!;
    const g = '/' + rel;
    if (!isDebugfsSafe(g)) throw new BangerError('usage', `cannot write ${JSON.stringify(g)} into the work disk: debugfs cannot express names with a double quote or a newline`, 'rename the file');
    if (e.kind === 'dir') s.mkdir(g).setAttrs(g, S_IFDIR | e.mode);
    else if (e.kind === 'file') s.write(await hostRef(e.host), g).setAttrs(g, S_IFREG | e.mode);
    else s.symlink(g, e.target).sif(g, 'uid', 0).sif(g, 'gid', 0);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Grow, read

/** Grow an ext4 image file (the VM must be stopped): truncate, e2fsck -fy, resize2fs. Refuses to shrink. */
export async function growDisk(path: string, newSizeBytes: number, opts: Ctx = {}): Promise<{ from: number; to: number }> {
  const runner = opts.runner ?? run;
  const st = await stat(path).catch(() => undefined);
  if (!st?.isFile()) throw new BangerError('not_found', `disk ${path} does not exist`);
  if (!Number.isSafeInteger(newSizeBytes) || newSizeBytes <= 0) throw new BangerError('usage', `invalid disk size ${newSizeBytes}`);
  if (newSizeBytes < st.size) {
    throw new BangerError(
      'usage',
      `cannot shrink ${path} from ${formatSize(st.size)} (${st.size} bytes) to ${formatSize(newSizeBytes)} (${newSizeBytes} bytes)`,
      `give a size of at least ${formatSize(st.size)}`,
    );
  }
  if (newSizeBytes === st.size) return { from: st.size, to: st.size };
  await runner('truncate', ['-s', String(newSizeBytes), path], { signal: opts.signal });
  const fsck = await runner('e2fsck', ['-fy', path], { signal: opts.signal, reject: false });
  if (fsck.exitCode !== 0 && fsck.exitCode !== 1) {
    throw new BangerError('host', `e2fsck -fy ${path} failed (exit ${fsck.exitCode}): ${(fsck.stderr + fsck.stdout).trim().split('\n').slice(-6).join('\n')}`, 'the filesystem needs manual repair');
  }
  await runner('resize2fs', [path], { signal: opts.signal });
  return { from: st.size, to: newSizeBytes };
}

/** The contents of a file inside an ext2/3/4 image (`debugfs -R 'cat PATH'`), or undefined if it does not exist. */
export async function readDiskFile(disk: string, guestPath: string, opts: Ctx = {}): Promise<string | undefined> {
  const p = posix.normalize('/' + guestPath);
  const { stdout, errors } = await debugfsRequest(disk, `cat ${debugfsQuote(p)}`, opts);
  if (errors.some((l) => /File not found by ext2_lookup/.test(l))) return undefined;
  if (errors.length > 0) throw new BangerError('host', `debugfs cat ${p} on ${disk} failed: ${errors.join('\n')}`);
  return stdout;
}
