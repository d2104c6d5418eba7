/**
 * banger's version and commit, from one place: package.json for the version; for the commit, the stamp
 * `npm run build` writes next to the compiled code, or else the checkout's .git (read as files: no process).
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface BuildInfo {
  version: string;
  commit: string;
}

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');

function read(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

function checkoutCommit(): string {
  const head = read(join(root, '.git', 'HEAD'))?.trim();
  if (!head) return 'unknown';
  if (!head.startsWith('ref: ')) return head.slice(0, 12);
  const ref = head.slice(5);
  const loose = read(join(root, '.git', ref))?.trim();
  const packed = read(join(root, '.git', 'packed-refs'))
    ?.split('\n')
    .find((l) => l.endsWith(` ${ref}`))
    ?.split(' ')[0];
  return (loose ?? packed)?.slice(0, 12) ?? 'unknown';
}

let cached: BuildInfo | undefined;

export function buildInfo(): BuildInfo {
  if (cached) return cached;
  const stamp = read(join(here, 'build-info.json'));
  const version = (JSON.parse(read(join(root, 'package.json')) ?? '{}') as { version?: string }).version ?? 'unknown';
  cached = { version, commit: stamp ? (JSON.parse(stamp) as BuildInfo).commit : checkoutCommit() };
  return cached;
}

export const versionLine = (): string => `banger ${buildInfo().version} (${buildInfo().commit})`;
