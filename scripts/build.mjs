#!/usr/bin/env node
// Compiles src/ to dist/ (plain JavaScript: the CLI, the daemon and the root helper run without tsx) and
// stamps dist/build-info.json with the version, the commit, the newest source mtime it was built from and the
// store schema version. `npm pack` runs it (prepack), so a packed release carries dist/ and needs no tsx.
// bin/banger.js runs dist/ only while that stamp is at least as new as every file under src/.
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { newestMtime } from '../bin/freshness.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const sourceMtimeMs = newestMtime(join(root, 'src'));
rmSync(join(root, 'dist'), { recursive: true, force: true });
execFileSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(root, 'tsconfig.build.json')], { stdio: 'inherit' });
const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
let commit = process.env.BANGER_COMMIT ?? 'unknown';
try {
  commit = execFileSync('git', ['-C', root, 'rev-parse', '--short=12', 'HEAD'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
} catch {
  /* not a git checkout (a release tarball): keep what was given */
}
// The store schema this build understands: an update's rollback compares it with the store (src/host/install).
const { SCHEMA_VERSION: schemaVersion } = await import(pathToFileURL(join(root, 'dist', 'store', 'db.js')).href);
writeFileSync(join(root, 'dist', 'build-info.json'), JSON.stringify({ version, commit, sourceMtimeMs, schemaVersion }, null, 2) + '\n');
