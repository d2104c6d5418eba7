/**
 * A release's offline checks, run by the release itself (`banger update --check-release`) while it is staged:
 * nothing here needs a daemon or the network. A FAIL stops the update before anything is swapped.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { readRelease, runningRoot } from './layout.js';

export interface OfflineCheck {
  name: string;
  status: 'ok' | 'fail';
  detail: string;
  fix?: string;
}

/** Entry points a release runs: the CLI, the daemon and the root helper. */
const ENTRY_POINTS = ['bin/banger.js', 'dist/cli/main.js', 'dist/daemon/daemon.js', 'dist/roothelper/main.js'];

function atLeast(have: string, want: string): boolean {
  const [a, b] = [have, want].map((v) => v.split('.').map((n) => Number.parseInt(n, 10) || 0));
  for (let i = 0; i < 3; i++) if ((a[i] ?? 0) !== (b[i] ?? 0)) return (a[i] ?? 0) > (b[i] ?? 0);
  return true;
}

function nodeCheck(root: string): OfflineCheck {
  const engines = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { engines?: { node?: string } }).engines?.node ?? '';
  const want = /^>=\s*([\d.]+)$/.exec(engines.trim())?.[1];
  if (!want || atLeast(process.versions.node, want)) return { name: 'node', status: 'ok', detail: `node ${process.versions.node} (wants ${engines || 'any'})` };
  return { name: 'node', status: 'fail', detail: `node ${process.versions.node} is older than this release needs (${engines})`, fix: `install node ${want} or newer` };
}

function filesCheck(root: string): OfflineCheck {
  const missing = ENTRY_POINTS.filter((f) => !existsSync(join(root, f)));
  return missing.length ? { name: 'files', status: 'fail', detail: `missing ${missing.join(', ')}`, fix: 'make the release again with npm pack' } : { name: 'files', status: 'ok', detail: `${ENTRY_POINTS.length} entry points present` };
}

function buildCheck(root: string): OfflineCheck {
  const info = readRelease(root);
  const stamp = join(root, 'dist', 'build-info.json');
  if (!info || !existsSync(stamp)) return { name: 'build', status: 'fail', detail: 'no dist/build-info.json: not a built release', fix: 'make the release with npm pack (it runs the build)' };
  const built = (JSON.parse(readFileSync(stamp, 'utf8')) as { version?: string }).version;
  return built === info.version ? { name: 'build', status: 'ok', detail: `${info.version} (${info.commit}), store schema ${info.schemaVersion ?? '?'}` } : { name: 'build', status: 'fail', detail: `dist/ was built as ${built}, package.json says ${info.version}`, fix: 'build again after changing the version' };
}

/** The native SQLite module loads, and the owner's store (if any) is not newer than this release understands. */
function storeCheck(root: string, dbPath: string): OfflineCheck[] {
  let Database: typeof import('better-sqlite3');
  try {
    Database = createRequire(join(root, 'package.json'))('better-sqlite3') as typeof import('better-sqlite3');
    new Database(':memory:').close();
  } catch (e) {
    return [{ name: 'sqlite', status: 'fail', detail: `better-sqlite3 does not load: ${(e as Error).message.split('\n')[0]}`, fix: 'npm rebuild in the release directory' }];
  }
  const checks: OfflineCheck[] = [{ name: 'sqlite', status: 'ok', detail: 'the native module loads' }];
  const understands = readRelease(root)?.schemaVersion;
  if (!existsSync(dbPath) || understands === undefined) return checks;
  const db = new Database(dbPath, { readonly: true, fileMustExist: true });
  const has = db.pragma('user_version', { simple: true }) as number;
  db.close();
  checks.push(has <= understands ? { name: 'store', status: 'ok', detail: `${dbPath} at schema ${has}, this release understands ${understands}` } : { name: 'store', status: 'fail', detail: `${dbPath} is at schema ${has}, newer than this release understands (${understands})`, fix: 'install a release at least as new as the one that wrote the store' });
  return checks;
}

export function offlineChecks(dbPath: string, root = runningRoot()): OfflineCheck[] {
  return [nodeCheck(root), filesCheck(root), buildCheck(root), ...storeCheck(root, dbPath)];
}
