/**
 * Where an installed banger lives under its prefix (default /usr/local):
 *   PREFIX/lib/banger/releases/<version>/   one whole release each (bin/, dist/, node_modules/, package.json)
 *   PREFIX/lib/banger/current -> releases/<version>    the one that runs (units and bin/banger go through it)
 *   PREFIX/lib/banger/previous -> releases/<version>   the one before, for a rollback
 *   PREFIX/lib/banger/staging/                         updates being unpacked and verified
 *   PREFIX/bin/banger -> ../lib/banger/current/bin/banger.js
 */
import { existsSync, readFileSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const DEFAULT_PREFIX = '/usr/local';
/** The backup suffix of `current`: `current` + '.previous' is never used; the kept link is `previous`. */
export const PREVIOUS_SUFFIX = '.previous';

export interface InstallLayout {
  prefix: string;
  lib: string;
  releases: string;
  current: string;
  /** `current` + PREVIOUS_SUFFIX: the link AtomicReplace keeps and Rollback restores. */
  previous: string;
  staging: string;
  bin: string;
  /** Where the helper's config (its owner) is written. */
  helperConfig: string;
  release(version: string): string;
}

export function installLayout(prefix: string): InstallLayout {
  const p = resolve(prefix);
  const lib = join(p, 'lib', 'banger');
  return {
    prefix: p,
    lib,
    releases: join(lib, 'releases'),
    current: join(lib, 'current'),
    previous: join(lib, 'current' + PREVIOUS_SUFFIX),
    staging: join(lib, 'staging'),
    bin: join(p, 'bin', 'banger'),
    helperConfig: join(lib, 'roothelper.json'),
    release: (v) => join(lib, 'releases', v),
  };
}

/** The package root of the code running now (a checkout or a release). */
export const runningRoot = (): string => resolve(fileURLToPath(new URL('../../..', import.meta.url)));

/** The prefix the running code is installed under, if it runs from PREFIX/lib/banger/releases/<version>. */
export function runningPrefix(root = runningRoot()): string | undefined {
  const releases = dirname(root);
  if (basename(releases) !== 'releases' || basename(dirname(releases)) !== 'banger') return undefined;
  return dirname(dirname(dirname(releases)));
}

export interface ReleaseInfo {
  version: string;
  commit: string;
  schemaVersion?: number;
}

/** A release's version (package.json) and build stamp (dist/build-info.json); undefined if it is not a release. */
export function readRelease(dir: string): ReleaseInfo | undefined {
  try {
    const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
    if (pkg.name !== 'banger' || !pkg.version) return undefined;
    const stampPath = join(dir, 'dist', 'build-info.json');
    const stamp = existsSync(stampPath) ? (JSON.parse(readFileSync(stampPath, 'utf8')) as Partial<ReleaseInfo>) : {};
    return { version: pkg.version, commit: stamp.commit ?? 'unknown', schemaVersion: stamp.schemaVersion };
  } catch {
    return undefined;
  }
}
