/**
 * AtomicReplace and Rollback for a symlink (the release's `current` link): a new link is made beside the old one
 * and renamed over it, so at every instant the path names either the old target or the new one, never nothing.
 * The old target is kept first as `<link><suffix>` (e.g. `previous`), made the same way, so a rollback is one
 * rename. A SIGKILL between any two steps leaves `link` pointing at a whole release.
 */
import { readlink, rename, rm, symlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { BangerError } from '../../errors.js';

async function linkTarget(path: string): Promise<string | undefined> {
  try {
    return await readlink(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    if ((e as NodeJS.ErrnoException).code === 'EINVAL') throw new BangerError('host', `${path} exists and is not a symlink`, 'move it away; banger manages that path as a link');
    throw e;
  }
}

/** Point `path` at `target` through a temporary link renamed over it (atomic on one filesystem). */
export async function renameLinkInto(path: string, target: string): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
  await rm(tmp, { force: true });
  await symlink(target, tmp);
  await rename(tmp, path);
}

export function backupPath(link: string, suffix: string): string {
  if (suffix === '') {
    throw new BangerError('invalid_params', `refused to replace ${link} with an empty backup suffix: the backup would be the link itself, so the old target would be lost and a rollback impossible`, 'pass a suffix such as ".previous"');
  }
  return `${link}${suffix}`;
}

export interface ReplaceResult {
  /** The target `link` had before, now kept at `link + suffix`; undefined on a fresh install. */
  previous?: string;
}

/**
 * Point `link` at `target`, keeping its old target at `link + suffix`. A backup left by an earlier run is
 * replaced (it is only ever a link). With no old link (a fresh install) nothing is backed up, and a stale
 * backup is left alone: it still names the release before.
 */
export async function atomicReplace(link: string, target: string, suffix: string): Promise<ReplaceResult> {
  const backup = backupPath(link, suffix);
  const previous = await linkTarget(link);
  if (previous !== undefined) await renameLinkInto(backup, previous);
  await renameLinkInto(link, target);
  return { previous };
}

export interface RollbackResult {
  restored: boolean;
  /** What `link` points at now. */
  target?: string;
  /** The target rolled back from. */
  from?: string;
}

/** Put the backup (`link + suffix`) back in place of `link`, by one rename. No backup: nothing to do, said so. */
export async function rollback(link: string, suffix: string): Promise<RollbackResult> {
  const backup = backupPath(link, suffix);
  const target = await linkTarget(backup);
  if (target === undefined) return { restored: false, target: await linkTarget(link) };
  const from = await linkTarget(link);
  await rename(backup, link);
  return { restored: true, target, from };
}
