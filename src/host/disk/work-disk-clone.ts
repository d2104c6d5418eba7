/**
 * A VM's work disk made from a cached one (the workspace cache) or from a template (work-disk-template.ts): a
 * copy-on-write clone of that disk (cloneDisk: reflink, else a sparse full copy), then, when a git identity is
 * given, the new VM's /root/.gitconfig written over the old one with debugfs (a cached disk carries none:
 * stripGitIdentity takes it out when it is stored). What else a work disk carries
 * (authorized_keys, file_sync, the seed) is part of the cache key, so it is already what a fresh one would hold;
 * the VM's identity (hostname, SSH host key, network) is on its identity disk (identity-disk.ts).
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run, type Runner } from '../exec/runner.js';
import { DebugfsScript, runDebugfs } from './debugfs.js';
import { cloneDisk, cowRecordPath, gitconfigWithIdentity, readDiskFile, withoutGitIdentity, type CowStrategy, type WorkDiskOptions } from './disks.js';

export interface CloneWorkDiskOptions {
  /** Written as the [user] of the clone's /root/.gitconfig (none: the clone keeps the one it has). */
  gitIdentity?: WorkDiskOptions['gitIdentity'];
  /** The image's work seed (its /root/.gitconfig is the base of the git identity's). */
  seedImage: string;
  /** What `cached` is known to hold (a work disk template): saves reading the seed. */
  known?: TemplateFacts;
  runner?: Runner;
  signal?: AbortSignal;
}

/** What a work disk template holds that a clone's writes depend on. */
export interface TemplateFacts {
  /** Its /root/.gitconfig ('' when none): the base of the git identity's. */
  gitconfig: string;
}

export async function cloneWorkDisk(cached: string, dst: string, opts: CloneWorkDiskOptions): Promise<CowStrategy> {
  const runner = opts.runner ?? run;
  const strategy = await cloneDisk(cached, dst, { runner, signal: opts.signal });
  const gi = opts.gitIdentity;
  if (!gi || !(gi.name || gi.email)) return strategy;
  try {
    const prev = opts.known ? opts.known.gitconfig : ((await readDiskFile(opts.seedImage, '/.gitconfig', { runner, signal: opts.signal })) ?? '');
    await writeGitconfig(dst, gitconfigWithIdentity(prev, gi), { runner, signal: opts.signal });
  } catch (e) {
    await rm(dst, { force: true });
    await rm(cowRecordPath(dst), { force: true });
    throw e;
  }
  return strategy;
}

/** A work disk's /root/.gitconfig without its git identity (withoutGitIdentity), in place: for the workspace cache. */
export async function stripGitIdentity(disk: string, opts: { runner?: Runner; signal?: AbortSignal } = {}): Promise<void> {
  const text = await readDiskFile(disk, '/.gitconfig', opts);
  if (text === undefined) return;
  const stripped = withoutGitIdentity(text);
  if (stripped !== text) await writeGitconfig(disk, stripped, opts);
}

/** `text` as the disk's /.gitconfig (the guest's /root/.gitconfig), written with debugfs. */
async function writeGitconfig(disk: string, text: string, opts: { runner?: Runner; signal?: AbortSignal }): Promise<void> {
  const tmp = await mkdtemp(join(tmpdir(), 'banger-gitconfig-'));
  try {
    const gc = join(tmp, 'gitconfig');
    await writeFile(gc, text, { mode: 0o644 });
    await runDebugfs(disk, new DebugfsScript().replaceFile(gc, '/.gitconfig', 0o644), { runner: opts.runner ?? run, signal: opts.signal });
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
