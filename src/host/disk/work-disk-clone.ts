/**
 * A VM's work disk made from a cached one (the workspace cache) or from a template (work-disk-template.ts): a
 * copy-on-write clone of that disk
 * (cloneDisk: reflink, else a sparse full copy), then the new VM's own files written over the cached VM's with
 * debugfs: its identity (hostname, SSH host key, network) and its git identity. What else a work disk carries
 * (authorized_keys, file_sync, the seed) is part of the cache key, so it is already what a fresh one would hold.
 */
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { run, type Runner } from '../exec/runner.js';
import { DebugfsScript, existingPaths, runDebugfs, S_IFDIR, S_IFREG } from './debugfs.js';
import { cloneDisk, cowRecordPath, gitconfigWithIdentity, IDENTITY_GUEST_DIR, readDiskFile, type CowStrategy, type WorkDiskOptions } from './disks.js';

export interface CloneWorkDiskOptions {
  /** The VM's identity directory (writeIdentityDir), when its root disk is an overlay. */
  identityDir?: string;
  gitIdentity?: WorkDiskOptions['gitIdentity'];
  /** The image's work seed (its /root/.gitconfig is the base of the git identity's). */
  seedImage: string;
  /** What `cached` is known to hold (a work disk template): saves reading the seed and probing the disk. */
  known?: TemplateFacts;
  runner?: Runner;
  signal?: AbortSignal;
}

/** What a work disk template holds that a clone's writes depend on. */
export interface TemplateFacts {
  /** Which of {@link identityParents} exist on it. */
  dirs: string[];
  /** Its /root/.gitconfig ('' when none): the base of the git identity's. */
  gitconfig: string;
}

/** The directories the VM's own files go into (the identity's parents). */
export const identityParents = (): string[] => ancestors(`/${IDENTITY_GUEST_DIR}/x`);

export async function cloneWorkDisk(cached: string, dst: string, opts: CloneWorkDiskOptions): Promise<CowStrategy> {
  const runner = opts.runner ?? run;
  const strategy = await cloneDisk(cached, dst, { runner, signal: opts.signal });
  const tmp = await mkdtemp(join(tmpdir(), 'banger-clone-'));
  try {
    const files: Array<{ guest: string; host: string; mode: number }> = [];
    if (opts.identityDir) {
      for (const name of (await readdir(opts.identityDir)).sort()) {
        files.push({ guest: `/${IDENTITY_GUEST_DIR}/${name}`, host: join(opts.identityDir, name), mode: name.endsWith('_key') ? 0o600 : 0o644 });
      }
    }
    const gi = opts.gitIdentity;
    if (gi && (gi.name || gi.email)) {
      const prev = opts.known ? opts.known.gitconfig : ((await readDiskFile(opts.seedImage, '/.gitconfig', { runner, signal: opts.signal })) ?? '');
      const gc = join(tmp, 'gitconfig');
      await writeFile(gc, gitconfigWithIdentity(prev, gi), { mode: 0o644 });
      files.push({ guest: '/.gitconfig', host: gc, mode: 0o644 });
    }
    await overwriteFiles(dst, files, { runner, signal: opts.signal, existing: opts.known && new Set(opts.known.dirs) });
  } catch (e) {
    await rm(dst, { force: true });
    await rm(cowRecordPath(dst), { force: true });
    throw e;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return strategy;
}

/**
 * Write each file onto `disk` in place of whatever is there (missing parent directories made 0700). `existing`:
 * the parents known to exist (else debugfs is asked); a parent it does not list must be missing.
 */
async function overwriteFiles(
  disk: string,
  files: Array<{ guest: string; host: string; mode: number }>,
  { runner, signal, existing }: { runner: Runner; signal?: AbortSignal; existing?: Set<string> },
): Promise<void> {
  if (files.length === 0) return;
  const parents = [...new Set(files.flatMap((f) => ancestors(f.guest)))].sort();
  if (existing && parents.some((p) => !identityParents().includes(p))) existing = undefined; // not all known: ask
  const have = existing ?? (await existingPaths(disk, parents, { runner, signal }));
  const s = new DebugfsScript();
  for (const d of parents) if (!have.has(d)) s.mkdir(d).setAttrs(d, S_IFDIR | 0o700);
  for (const f of files) s.rm(f.guest, { ifExists: true }).write(f.host, f.guest).setAttrs(f.guest, S_IFREG | f.mode);
  await runDebugfs(disk, s, { runner, signal });
}

function ancestors(p: string): string[] {
  const out: string[] = [];
  for (let d = posix.dirname(p); d !== '/'; d = posix.dirname(d)) out.unshift(d);
  return out;
}
