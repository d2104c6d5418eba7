// Whether dist/ was built from the sources as they are now: no file under src/ is newer than the build stamp.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** The newest mtime (ms) of any file under dir; 0 when dir does not exist. */
export function newestMtime(dir) {
  let newest = 0;
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return 0;
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    newest = Math.max(newest, e.isDirectory() ? newestMtime(p) : statSync(p).mtimeMs);
  }
  return newest;
}

/** 'fresh' (run dist/), 'stale' (src/ changed since the build), or 'absent' (never built). */
export function distState(root) {
  let info;
  try {
    info = JSON.parse(readFileSync(join(root, 'dist', 'build-info.json'), 'utf8'));
  } catch {
    return 'absent';
  }
  return newestMtime(join(root, 'src')) <= info.sourceMtimeMs ? 'fresh' : 'stale';
}
