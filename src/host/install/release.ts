/**
 * Staging a release: unpack a tarball from `npm pack` (or copy a built directory) under PREFIX/lib/banger/staging,
 * install its production dependencies (native modules are built there, or reused from the release it replaces
 * when that one was built by the same Node), make it root-owned and read-only to others, verify it (its
 * --version runs, its offline checks pass), and only then rename it whole into releases/<version>. A process
 * killed at any step leaves at most a staging directory, which the next run removes.
 */
import { existsSync } from 'node:fs';
import { cp, mkdir, mkdtemp, readdir, readlink, rename, rm } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { BangerError } from '../../errors.js';
import { run } from '../exec/runner.js';
import { readRelease, type InstallLayout, type ReleaseInfo } from './layout.js';

/** What a release directory holds (package.json "files" plus package.json itself). */
const RELEASE_FILES = ['package.json', 'README.md', 'bin', 'dist'];
const NATIVE_MODULE = join('node_modules', 'better-sqlite3', 'build', 'Release', 'better_sqlite3.node');

export interface StagedRelease extends ReleaseInfo {
  dir: string;
}

export interface StageOptions {
  /** A release whose node_modules may seed this one's (same Node: the native builds are reused). */
  seed?: string;
  env: NodeJS.ProcessEnv;
  log: (line: string) => void;
  /** Install: a release of the version `current` already names is kept as it is (update refuses it). */
  keepCurrent?: boolean;
}

/** Unpack or copy `from` into a fresh staging directory; returns the release root inside it. */
async function unpack(from: string, stagingDir: string): Promise<string> {
  const src = resolve(from);
  if (!existsSync(src)) throw new BangerError('usage', `${from} does not exist`, 'pass a tarball made by npm pack, or a built banger directory');
  const root = join(stagingDir, 'package');
  if (existsSync(join(src, 'package.json'))) {
    if (!existsSync(join(src, 'dist', 'build-info.json'))) throw new BangerError('usage', `${from} has no compiled dist/ (dist/build-info.json is missing)`, 'run npm run build there, or pass the tarball npm pack makes');
    await mkdir(root);
    for (const f of RELEASE_FILES) if (existsSync(join(src, f))) await cp(join(src, f), join(root, f), { recursive: true });
    return root;
  }
  const r = await run('tar', ['-xzf', src, '-C', stagingDir, '--no-same-owner', '--no-same-permissions'], { reject: false });
  if (r.exitCode !== 0) throw new BangerError('usage', `${from} does not unpack whole: ${r.stderr.trim().split('\n').pop()}`, 'make the tarball again with npm pack');
  if (!existsSync(join(root, 'package.json'))) throw new BangerError('usage', `${from} is not a tarball from npm pack (no package/package.json in it)`, 'make it with npm pack in a banger checkout');
  return root;
}

/** node_modules with production dependencies only; native modules reused from the seed when it has them. */
async function installDependencies(root: string, o: StageOptions): Promise<void> {
  if (o.seed && existsSync(join(o.seed, NATIVE_MODULE))) {
    await run('cp', ['-a', '--reflink=auto', join(o.seed, 'node_modules'), join(root, 'node_modules')]);
    o.log(`reusing the dependencies of ${o.seed}`);
  }
  const npm = join(dirname(process.execPath), 'npm');
  o.log('npm install --omit=dev (native modules are built if missing)');
  const r = await run(existsSync(npm) ? npm : 'npm', ['install', '--omit=dev', '--no-audit', '--no-fund', '--prefer-offline'], { cwd: root, env: o.env, reject: false, timeoutMs: 20 * 60_000 });
  if (r.exitCode !== 0) throw new BangerError('host', `npm install in the staged release failed: ${r.stderr.trim().split('\n').slice(-3).join(' ')}`, 'is the npm cache or the registry reachable? the installed release is unchanged');
}

/** Run the staged release itself: its --version, then its offline checks; throws naming what failed. */
async function verify(root: string, info: ReleaseInfo, env: NodeJS.ProcessEnv): Promise<void> {
  const bin = join(root, 'bin', 'banger.js');
  const v = await run(process.execPath, [bin, '--version'], { env, reject: false, timeoutMs: 60_000 });
  if (v.exitCode !== 0 || !v.stdout.startsWith(`banger ${info.version} `)) {
    throw new BangerError('host', `the staged release's --version does not run as ${info.version}: ${(v.stdout + v.stderr).trim().slice(0, 300)}`, 'the release is broken; nothing was changed');
  }
  const c = await run(process.execPath, [bin, '--json', 'update', '--check-release'], { env, reject: false, timeoutMs: 60_000 });
  let checks: Array<{ name: string; status: string; detail: string }>;
  try {
    checks = (JSON.parse(c.stdout) as { checks: typeof checks }).checks;
  } catch {
    throw new BangerError('host', `the staged release's offline checks did not run: ${(c.stdout + c.stderr).trim().slice(0, 300)}`, 'the release is broken; nothing was changed');
  }
  const failed = checks.filter((ch) => ch.status === 'fail');
  if (failed.length) throw new BangerError('host', `the staged release ${info.version} fails its offline checks: ${failed.map((f) => `${f.name} (${f.detail})`).join('; ')}`, 'nothing was changed');
}

/** Remove what killed runs left in staging; an entry still being written (an orphaned npm) is left for the next run. */
async function clearStaging(staging: string, log: (line: string) => void): Promise<void> {
  for (const e of await readdir(staging)) {
    await rm(join(staging, e), { recursive: true, force: true }).catch((err) => log(`left ${e} in staging for now: ${(err as Error).message}`));
  }
}

/** Stage, verify and move `from` into releases/<version>. Refuses the version `current` points at. */
export async function stageRelease(from: string, L: InstallLayout, o: StageOptions): Promise<StagedRelease> {
  await mkdir(L.staging, { recursive: true, mode: 0o755 });
  await clearStaging(L.staging, o.log);
  await mkdir(L.releases, { recursive: true, mode: 0o755 });
  const stagingDir = await mkdtemp(join(L.staging, 'stage-'));
  try {
    const root = await unpack(from, stagingDir);
    const info = readRelease(root);
    if (!info) throw new BangerError('usage', `${from} is not a banger release (package.json does not name banger with a version)`, 'pass a tarball made by npm pack in a banger checkout');
    const dest = L.release(info.version);
    const current = await readlink(L.current).catch(() => undefined);
    if (current && resolve(L.lib, current) === dest && o.keepCurrent) return { ...(readRelease(dest) ?? info), dir: dest };
    if (current && resolve(L.lib, current) === dest) throw new BangerError('usage', `banger ${info.version} is already the installed release`, 'bump the version to update, or banger update --rollback');
    o.log(`staging banger ${info.version} (${info.commit}) in ${stagingDir}`);
    await installDependencies(root, o);
    await run('chown', ['-R', '0:0', root]);
    await run('chmod', ['-R', 'go-w', root]);
    await verify(root, info, o.env);
    await rm(dest, { recursive: true, force: true }); // a release of this version not in use (an update rolled back)
    await rename(root, dest);
    return { ...info, dir: dest };
  } finally {
    await rm(stagingDir, { recursive: true, force: true });
  }
}
