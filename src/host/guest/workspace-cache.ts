/**
 * The workspace cache: the work disk of a VM right after a workspace was prepared into it, kept on the host so a
 * later VM created for the same workspace starts from a copy-on-write clone of it and only the host's uncommitted
 * files cross the link (the guest finds its workspace in place and re-prepares incrementally).
 *
 * An entry is `<dir>/<key>/` with `disk.img` (raw ext4, checked with e2fsck when stored) and `entry.json`. The key
 * is a digest of everything that changes what the disk holds: the repository (source path, root, git dir), its
 * HEAD, current branch and refs, the mode and guest path, the image (manifest and work seed), and the contents
 * of a work disk that do not vary between VMs (size, network mode, authorized key, file_sync). What does vary: the
 * VM's git identity is written into the clone (host/disk/work-disk-clone.ts), the rest is on its identity disk. full_copy is never cached (it copies ignored files and .git as they are: no key covers them).
 * Entries are evicted least recently used under a byte budget (config workspaceCacheBytes; 0 turns it off).
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { BangerError, errorMessage } from '../../errors.js';
import { run, type Runner } from '../exec/runner.js';
import { shellQuote } from '../exec/shell.js';
import { hostGit, readRepoHead } from './host-repo.js';
import { stripGitIdentity } from '../disk/work-disk-clone.js';
import type { GuestExec, ResumePoint, WorkspaceMode } from './workspace.js';

/** 2: an entry's disk carries no git identity (each VM made from it gets its own; entries of format 1 do not match). */
export const CACHE_FORMAT = 2;
const KEY_RE = /^[0-9a-f]{64}$/;

export interface CacheKeyInput {
  source: string;
  mode: WorkspaceMode;
  guestPath: string;
  image: { name: string; dir: string; workSeed: string };
  diskBytes: number;
  net: string;
  userPublicKey: string;
  gitIdentity: unknown;
  fileSync: unknown;
}

export interface CacheKeyParts {
  format: number;
  sourcePath: string;
  repoRoot: string;
  gitDir: string;
  headCommit: string;
  currentBranch: string | null;
  refs: string;
  mode: WorkspaceMode;
  guestPath: string;
  image: { name: string; manifest: string; workSeed: string };
  workDisk: { diskBytes: number; net: string; userKey: string; gitIdentity: string; fileSync: string };
}

export type CacheKey = { key: string; parts: CacheKeyParts } | { key: null; why: string };

const sha = (s: string | Buffer) => createHash('sha256').update(s).digest('hex');

/** The cache key of a workspace, or why it has none (full_copy, not a repository, no commits). Read-only. */
export async function workspaceCacheKey(input: CacheKeyInput, opts: { runner?: Runner; signal?: AbortSignal } = {}): Promise<CacheKey> {
  if (input.mode === 'full_copy') return { key: null, why: 'full_copy is not cached (it copies ignored files and .git as they are)' };
  const runner = opts.runner ?? run;
  const sourcePath = resolve(input.source);
  const read = await Promise.all([
    readRepoHead(sourcePath, runner, opts.signal),
    hostGit(runner, sourcePath, ['for-each-ref', '--format=%(objectname) %(refname)', 'refs/heads', 'refs/tags', 'refs/remotes'], { signal: opts.signal, reject: false }),
  ]).catch((e: unknown) => {
    if (opts.signal?.aborted) throw e;
    return errorMessage(e); // not a repository, no commit yet: nothing to key
  });
  if (typeof read === 'string') return { key: null, why: read };
  const [head, refs] = read;
  if (refs.exitCode !== 0) return { key: null, why: `git for-each-ref failed in ${sourcePath}: ${refs.stderr.trim()}` };
  const shallowText = await readFile(resolve(sourcePath, head.shallowFile), 'utf8').catch(() => '');
  const manifest = await readFile(join(input.image.dir, 'manifest.json')).catch(() => undefined);
  const seed = await stat(join(input.image.dir, input.image.workSeed)).catch(() => undefined);
  if (!manifest || !seed) return { key: null, why: `image ${input.image.name} is incomplete` };
  const parts: CacheKeyParts = {
    format: CACHE_FORMAT,
    sourcePath,
    repoRoot: head.repoRoot,
    gitDir: head.gitDir,
    headCommit: head.headCommit,
    currentBranch: head.currentBranch,
    refs: sha(`${refs.stdout}\n--shallow--\n${shallowText}`),
    mode: input.mode,
    guestPath: input.guestPath,
    image: { name: input.image.name, manifest: sha(manifest), workSeed: `${seed.ino}:${seed.size}:${seed.mtimeMs}` },
    workDisk: {
      diskBytes: input.diskBytes,
      net: input.net,
      userKey: sha(input.userPublicKey.trim()),
      gitIdentity: sha(JSON.stringify(input.gitIdentity ?? null)),
      fileSync: sha(JSON.stringify(input.fileSync ?? [])),
    },
  };
  return { key: sha(JSON.stringify(parts)), parts };
}

export interface CacheEntry {
  key: string;
  parts: CacheKeyParts;
  /** Path of the cached work disk (raw ext4). */
  disk: string;
  /** Its apparent size and the bytes it occupies on the host. */
  sizeBytes: number;
  bytes: number;
  createdAt: string;
  lastUsedAt: string;
  hits: number;
  /** What the prepare left in the disk's workspace, so a hit sends only the difference (absent: a full re-prepare). */
  resume?: ResumePoint;
}

/** entry.json: the entry without its disk's path and size, the resume point's path lists in base64. */
type StoredEntry = Omit<CacheEntry, 'disk' | 'bytes' | 'resume'> & { resume?: { marker: string; send: string; deleted: string } };

/** A resume point is kept only while its path lists are small (a huge untracked tree is re-prepared instead). */
const MAX_RESUME_BYTES = 1 << 20;

export class WorkspaceCache {
  constructor(
    readonly dir: string,
    private readonly budgetBytes: () => number,
    private readonly runner: Runner = run,
  ) {}

  get enabled(): boolean {
    return this.budgetBytes() > 0;
  }

  private entryDir(key: string): string {
    if (!KEY_RE.test(key)) throw new BangerError('usage', `invalid workspace cache key ${JSON.stringify(key)}`, 'keys are 64 hex digits (banger cache list)');
    return join(this.dir, key);
  }

  /** Every complete entry, most recently used first. Broken or half-written entries are skipped. */
  async list(): Promise<CacheEntry[]> {
    const names = await readdir(this.dir).catch(() => [] as string[]);
    const out: CacheEntry[] = [];
    for (const name of names) {
      if (!KEY_RE.test(name)) continue;
      const e = await this.read(name);
      if (e) out.push(e);
    }
    return out.sort((a, b) => b.lastUsedAt.localeCompare(a.lastUsedAt));
  }

  private async read(key: string): Promise<CacheEntry | undefined> {
    const d = this.entryDir(key);
    try {
      const stored = JSON.parse(await readFile(join(d, 'entry.json'), 'utf8')) as StoredEntry;
      const st = await stat(join(d, 'disk.img'));
      // A hit is checked: the entry names its own key, the key is its parts' digest, the disk is whole.
      if (stored.key !== key || sha(JSON.stringify(stored.parts)) !== key || st.size !== stored.sizeBytes) return undefined;
      const { resume, ...rest } = stored;
      const delta = resume && { send: Buffer.from(resume.send, 'base64'), deleted: Buffer.from(resume.deleted, 'base64') };
      return { ...rest, disk: join(d, 'disk.img'), bytes: st.blocks * 512, ...(resume && delta ? { resume: { marker: resume.marker, delta } } : {}) };
    } catch {
      return undefined;
    }
  }

  /** The entry for `key` when there is a sound one, untouched. */
  async peek(key: string): Promise<CacheEntry | undefined> {
    return this.enabled ? this.read(key) : undefined;
  }

  /** The entry for `key` when there is a sound one; marks it used. */
  async lookup(key: string): Promise<CacheEntry | undefined> {
    const e = await this.peek(key);
    if (!e) return undefined;
    const touched = { ...e, lastUsedAt: new Date().toISOString(), hits: e.hits + 1 };
    await this.writeEntry(join(this.dir, key), touched);
    return touched;
  }

  private async writeEntry(d: string, e: CacheEntry): Promise<void> {
    const { disk: _d, bytes: _b, resume, ...rest } = e;
    const stored: StoredEntry = { ...rest, ...(resume ? { resume: { marker: resume.marker, send: resume.delta.send.toString('base64'), deleted: resume.delta.deleted.toString('base64') } } : {}) };
    const tmp = join(d, `.entry.${randomBytes(4).toString('hex')}.json`);
    await writeFile(tmp, JSON.stringify(stored, null, 2) + '\n', { mode: 0o600 });
    await rename(tmp, join(d, 'entry.json'));
  }

  /**
   * Store a work disk under `key`: `copy(path)` writes it, e2fsck checks it (and replays the journal of a frozen
   * snapshot), then the entry appears whole (a rename) and older entries are evicted to the budget. Replaces an
   * entry of the same key. `resume` is what the prepare left in the disk's workspace.
   */
  async store(key: string, parts: CacheKeyParts, copy: (path: string) => Promise<void>, opts: { signal?: AbortSignal; resume?: ResumePoint } = {}): Promise<CacheEntry> {
    const { signal } = opts;
    const resume = opts.resume && opts.resume.delta.send.length + opts.resume.delta.deleted.length <= MAX_RESUME_BYTES ? opts.resume : undefined;
    const final = this.entryDir(key);
    if (sha(JSON.stringify(parts)) !== key) throw new BangerError('internal', 'workspace cache: the key does not match its parts');
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const partial = join(this.dir, `.partial-${key.slice(0, 16)}-${randomBytes(4).toString('hex')}`);
    await mkdir(partial, { mode: 0o700 });
    try {
      const disk = join(partial, 'disk.img');
      await copy(disk);
      const fsck = await this.runner('e2fsck', ['-fy', disk], { signal, reject: false });
      if (fsck.exitCode !== 0 && fsck.exitCode !== 1) {
        throw new BangerError('host', `workspace cache: the snapshot failed its check (e2fsck exit ${fsck.exitCode}): ${(fsck.stdout + fsck.stderr).trim().split('\n').slice(-4).join('\n')}`);
      }
      const st = await stat(disk);
      const now = new Date().toISOString();
      const entry: CacheEntry = { key, parts, disk: join(final, 'disk.img'), sizeBytes: st.size, bytes: st.blocks * 512, createdAt: now, lastUsedAt: now, hits: 0, ...(resume ? { resume } : {}) };
      await this.writeEntry(partial, entry);
      await rm(final, { recursive: true, force: true });
      await rename(partial, final);
      await this.evict(key);
      return entry;
    } finally {
      await rm(partial, { recursive: true, force: true });
    }
  }

  /** Remove least recently used entries until the total is within the budget (`keep` goes last). */
  async evict(keep?: string): Promise<string[]> {
    const budget = this.budgetBytes();
    const entries = await this.list();
    let total = entries.reduce((n, e) => n + e.bytes, 0);
    const order = [...entries].reverse().sort((a, b) => Number(a.key === keep) - Number(b.key === keep));
    const removed: string[] = [];
    for (const e of order) {
      if (total <= budget) break;
      await rm(join(this.dir, e.key), { recursive: true, force: true });
      total -= e.bytes;
      removed.push(e.key);
    }
    return removed;
  }

  /** Remove one entry (by key or a unique prefix of at least 8 digits), or all of them; also stray partials. */
  async prune(which: { key?: string } = {}): Promise<string[]> {
    const entries = await this.list();
    let doomed = entries;
    if (which.key !== undefined) {
      const k = which.key;
      if (!/^[0-9a-f]{8,64}$/.test(k)) throw new BangerError('usage', `invalid cache key ${JSON.stringify(k)}`, 'give at least 8 hex digits of a key from banger cache list');
      doomed = entries.filter((e) => e.key.startsWith(k));
      if (doomed.length === 0) throw new BangerError('not_found', `no workspace cache entry ${k}`, 'see banger cache list');
      if (doomed.length > 1) throw new BangerError('usage', `${k} matches ${doomed.length} entries`, 'give more digits of the key');
    } else {
      for (const name of await readdir(this.dir).catch(() => [] as string[])) {
        if (name.startsWith('.partial-') || (KEY_RE.test(name) && !entries.some((e) => e.key === name))) await rm(join(this.dir, name), { recursive: true, force: true });
      }
    }
    for (const e of doomed) await rm(join(this.dir, e.key), { recursive: true, force: true });
    return doomed.map((e) => e.key);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Snapshotting a running VM's work disk

/**
 * Freeze the guest's /root (the work disk) so its image on the host is consistent, with a watchdog that thaws it
 * after 120 s whatever happens to the host side.
 */
const FREEZE_SCRIPT = `set -eu
sync
fsfreeze -f /root
setsid sh -c 'sleep 120; fsfreeze -u /root' >/dev/null 2>&1 </dev/null &
echo frozen
`;
const THAW_SCRIPT = 'fsfreeze -u /root 2>/dev/null || :';

/**
 * Copy a running VM's work disk to `dst` while the guest holds /root frozen (reflink where it can, else sparse),
 * then take the VM's git identity out of the copy's /root/.gitconfig (stripGitIdentity).
 */
export async function snapshotWorkDisk(
  guest: GuestExec,
  workDisk: string,
  dst: string,
  opts: { runner?: Runner; signal?: AbortSignal } = {},
): Promise<void> {
  const runner = opts.runner ?? run;
  const freeze = await guest(shellQuote(['sh', '-c', FREEZE_SCRIPT]), { signal: opts.signal });
  if (freeze.exitCode !== 0) {
    throw new BangerError('host', `workspace cache: could not freeze the guest's /root: ${freeze.stderr.toString('utf8').trim() || `exit ${freeze.exitCode}`}`);
  }
  try {
    await runner('cp', ['--reflink=auto', '--sparse=always', '--', workDisk, dst], { signal: opts.signal });
  } finally {
    await guest(shellQuote(['sh', '-c', THAW_SCRIPT])).catch((e) => {
      throw new BangerError('host', `workspace cache: could not thaw the guest's /root (it thaws itself within 120 s): ${errorMessage(e)}`);
    });
  }
  await stripGitIdentity(dst, { runner, signal: opts.signal });
}
