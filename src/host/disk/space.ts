/**
 * Free disk space: how much there is where banger is about to write, and a refusal (before anything is written)
 * when there is not enough. A build or a copy that runs out midway leaves gigabytes of partial files and an
 * error from deep inside a tool; checking first gives the user the numbers and the fix instead.
 */
import { statfs } from 'node:fs/promises';
import { dirname } from 'node:path';
import { BangerError, errorMessage } from '../../errors.js';
import { errnoCode as errno } from '../exec/errno.js';

/**
 * Bytes an unprivileged process may still write on the filesystem holding `path` (f_bavail: the blocks
 * reserved for root are not counted). A path that does not exist yet is measured at its nearest existing parent.
 */
export async function freeBytes(path: string): Promise<number> {
  let p = path;
  for (;;) {
    try {
      const s = await statfs(p);
      return s.bavail * s.bsize;
    } catch (e) {
      const up = dirname(p);
      if (errno(e) !== 'ENOENT' || up === p) throw new BangerError('host', `cannot read the free space at ${path}: ${errorMessage(e)}`, undefined, { cause: e });
      p = up;
    }
  }
}

/** 1536 → "1.5 KiB"; binary units, one decimal under 10. */
export function humanBytes(n: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = Math.max(0, n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  if (i === 0) return `${Math.round(v)} bytes`;
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/**
 * Refuses (BangerError kind 'host') when the filesystem holding `path` has less than `neededBytes` free.
 * `what` names the work, e.g. "building image debian-bookworm". Returns the free bytes otherwise.
 */
export async function ensureFreeSpace(path: string, neededBytes: number, what: string): Promise<number> {
  const free = await freeBytes(path);
  if (free >= neededBytes) return free;
  throw new BangerError(
    'host',
    `not enough free disk space for ${what}: it needs about ${humanBytes(neededBytes)} at ${path}, and only ${humanBytes(free)} is free there`,
    'free space on that filesystem, or set BANGER_HOME to a directory on a filesystem with more room',
  );
}
