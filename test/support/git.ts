/**
 * Real git in temp directories with a fixed identity and config (after changesets' gitdir()).
 * `isolateGitConfig()` points every git this process starts (the code under test included) at a config of
 * our own, so the machine's ~/.gitconfig and /etc/gitconfig cannot change what a test sees.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from '../../src/host/exec/runner.js';

/**
 * The identity of the tests' own git commands, given in their environment (never in the machine's files): a fresh
 * HOME has no ~/.gitconfig, and the machine's /etc/gitconfig is not read.
 */
export const GIT_TEST_IDENTITY = {
  GIT_AUTHOR_NAME: 'Banger Test',
  GIT_AUTHOR_EMAIL: 'test@banger.invalid',
  GIT_COMMITTER_NAME: 'Banger Test',
  GIT_COMMITTER_EMAIL: 'test@banger.invalid',
  GIT_CONFIG_NOSYSTEM: '1',
} as const;

const IDENTITY = {
  ...GIT_TEST_IDENTITY,
  GIT_AUTHOR_DATE: '2024-01-01T00:00:00Z',
  GIT_COMMITTER_DATE: '2024-01-01T00:00:00Z',
};

/** `process.env` plus the test identity: for a test's own git processes (execa/spawn). */
export function gitTestEnv(extra: Record<string, string> = {}): Record<string, string> {
  return { ...(process.env as Record<string, string>), ...GIT_TEST_IDENTITY, ...extra };
}

const GLOBAL_CONFIG = `[user]
\tname = Banger Test
\temail = test@banger.invalid
[init]
\tdefaultBranch = main
[commit]
\tgpgsign = false
[tag]
\tgpgsign = false
[core]
\tautocrlf = false
[advice]
\tdetachedHead = false
[protocol "file"]
\tallow = always
`;

/** A new temp directory (under `base`, default the OS temp dir). */
export async function tempDir(prefix = 'banger-test-', base = tmpdir()): Promise<string> {
  return mkdtemp(join(base, prefix));
}

/**
 * Point GIT_CONFIG_GLOBAL at a config of our own and ignore the system config, for this process and its
 * children. Returns a function that restores the previous environment and removes the config.
 */
export async function isolateGitConfig(): Promise<() => Promise<void>> {
  const dir = await tempDir('banger-gitconfig-');
  const file = join(dir, 'gitconfig');
  await writeFile(file, GLOBAL_CONFIG);
  const saved = { GIT_CONFIG_GLOBAL: process.env.GIT_CONFIG_GLOBAL, GIT_CONFIG_NOSYSTEM: process.env.GIT_CONFIG_NOSYSTEM };
  process.env.GIT_CONFIG_GLOBAL = file;
  process.env.GIT_CONFIG_NOSYSTEM = '1';
  return async () => {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    await rm(dir, { recursive: true, force: true });
  };
}

/** Run git in `cwd` with the fixed identity; returns stdout (throws with git's stderr on failure). */
export async function git(cwd: string, ...args: string[]): Promise<string> {
  const r = await run('git', ['-C', cwd, ...args], { env: IDENTITY });
  return r.stdout;
}

/** Like git() but returns stdout as bytes. */
export function gitBuffer(cwd: string, ...args: string[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    execFile(
      'git',
      ['-C', cwd, ...args],
      { encoding: 'buffer', maxBuffer: 1 << 30, env: { ...process.env, ...IDENTITY } },
      (err, stdout, stderr) => (err ? reject(new Error(`git ${args.join(' ')}: ${err.message}\n${stderr.toString()}`)) : resolve(stdout)),
    );
  });
}

/** A new repository (branch main, fixed identity, no signing, no autocrlf) in a temp directory. */
export async function gitdir(prefix = 'banger-repo-', base?: string): Promise<string> {
  const dir = await tempDir(prefix, base);
  await git(dir, 'init', '-q', '-b', 'main');
  await git(dir, 'config', 'user.name', 'Banger Test');
  await git(dir, 'config', 'user.email', 'test@banger.invalid');
  await git(dir, 'config', 'commit.gpgsign', 'false');
  await git(dir, 'config', 'core.autocrlf', 'false');
  return dir;
}

/** Stage everything and commit. Returns the new commit's sha. */
export async function commitAll(dir: string, message: string): Promise<string> {
  await git(dir, 'add', '-A');
  await git(dir, 'commit', '-q', '--allow-empty', '-m', message);
  return (await git(dir, 'rev-parse', 'HEAD')).trim();
}
