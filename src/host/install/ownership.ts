/**
 * An installed release runs as root (the helper): every directory on the path to it must be root-owned and
 * writable by nobody else, or whoever can write one of them can swap the code root runs. A root-owned sticky
 * directory (/tmp) is safe: others may add entries but not rename or replace ours.
 */
import { stat } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { BangerError } from '../../errors.js';

export interface PathStat {
  uid: number;
  gid: number;
  mode: number;
}

/** Why `st` makes a directory unsafe to hold root's code, or undefined when it is safe. */
export function unsafeBecause(st: PathStat): string | undefined {
  if (st.uid !== 0) return `it is owned by uid ${st.uid}, not root`;
  const sticky = (st.mode & 0o1000) !== 0;
  if (st.mode & 0o002 && !sticky) return `it is writable by every user (mode ${(st.mode & 0o7777).toString(8)})`;
  if (st.mode & 0o020 && st.gid !== 0 && !sticky) return `it is writable by group ${st.gid} (mode ${(st.mode & 0o7777).toString(8)})`;
  return undefined;
}

/** The directories from / down to `path` that exist (the rest install creates, root-owned). */
export function ancestors(path: string): string[] {
  const out: string[] = [];
  for (let p = resolve(path); ; p = dirname(p)) {
    out.unshift(p);
    if (p === dirname(p)) return out;
  }
}

/** Refuse, naming the offending directory, unless every existing directory on the path to `path` is safe. */
export async function assertRootOwnedPath(path: string, stat: (p: string) => Promise<PathStat | undefined> = statOrUndefined): Promise<void> {
  for (const dir of ancestors(path)) {
    const st = await stat(dir);
    if (!st) continue;
    const why = unsafeBecause(st);
    if (why) {
      throw new BangerError('usage', `refused to install under ${path}: ${dir} is not safe for code that runs as root (${why})`, `choose a prefix whose every directory is root-owned and not writable by others (e.g. /usr/local), or chown root ${dir} && chmod go-w ${dir}`);
    }
  }
}

async function statOrUndefined(p: string): Promise<PathStat | undefined> {
  try {
    return await stat(p); // a link on the path is judged by its parent (checked too) and its target
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}
