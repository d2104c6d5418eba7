/**
 * Workspace export never writes the repository's real index: it stages into a temporary index (GIT_INDEX_FILE).
 * Real git in temp directories; the "guest" is a local `sh -c`, as in workspace.test.ts. Every git this file
 * starts (its own and the export's) gets an empty HOME, no system config and a fixed identity from its env.
 * (scripts/mutations.ts runs this file against an export that uses the real index and expects it to fail.)
 */
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GuestExec } from '../../src/host/guest/workspace.js';
import { exportWorkspace } from '../../src/host/guest/workspace-export.js';

let scratch: string;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'banger-export-index-'));
  const home = await mkdtemp(join(scratch, 'home-'));
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('GIT_')));
  env = {
    ...inherited,
    HOME: home,
    XDG_CONFIG_HOME: join(home, '.config'),
    GIT_CONFIG_NOSYSTEM: '1',
    GIT_AUTHOR_NAME: 'Banger Test',
    GIT_AUTHOR_EMAIL: 'test@banger.invalid',
    GIT_COMMITTER_NAME: 'Banger Test',
    GIT_COMMITTER_EMAIL: 'test@banger.invalid',
    LC_ALL: 'C',
  };
});

afterAll(async () => {
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

function git(cwd: string, ...args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('git', ['-C', cwd, ...args], { env }, (err, stdout, stderr) =>
      err ? reject(new Error(`git ${args.join(' ')}: ${err.message}\n${stderr}`)) : resolve(stdout),
    );
  });
}

/** A "guest" that is this host: `sh -c command` with the isolated env. */
const localGuest: GuestExec = (command) =>
  new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', command], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code) => resolve({ exitCode: code ?? 1, stdout: Buffer.concat(out), stderr: Buffer.concat(err) }));
  });

/** A repository with a base commit, one commit past it, and staged, unstaged, untracked and ignored changes. */
async function workRepo(): Promise<{ repo: string; base: string }> {
  const repo = await mkdtemp(join(scratch, 'repo-'));
  await git(repo, 'init', '-q', '-b', 'main');
  for (const f of ['committed.txt', 'unstaged.txt', 'staged.txt']) await writeFile(join(repo, f), `${f} at base\n`);
  await writeFile(join(repo, '.gitignore'), '*.log\n');
  await git(repo, 'add', '-A');
  await git(repo, 'commit', '-q', '-m', 'base');
  const base = (await git(repo, 'rev-parse', 'HEAD')).trim();
  await writeFile(join(repo, 'committed.txt'), 'a committed change\n');
  await git(repo, 'commit', '-q', '-am', 'past the base');
  await writeFile(join(repo, 'staged.txt'), 'a staged change\n');
  await git(repo, 'add', 'staged.txt');
  await writeFile(join(repo, 'unstaged.txt'), 'an uncommitted change\n');
  await writeFile(join(repo, 'untracked.txt'), 'an untracked file\n');
  await writeFile(join(repo, 'debug.log'), 'ignored\n');
  return { repo, base };
}

describe('workspace export and the real index', { timeout: 30_000 }, () => {
  it('leaves .git/index byte-identical with its mtime, and the patch has committed, uncommitted and untracked work', async () => {
    const { repo, base } = await workRepo();
    const indexPath = join(repo, '.git', 'index');
    const indexBefore = await readFile(indexPath);
    const mtimeBefore = (await stat(indexPath, { bigint: true })).mtimeNs;
    // any rewrite of the index from here on gets a later mtime than the one recorded
    await new Promise((r) => setTimeout(r, 50));

    const x = await exportWorkspace(localGuest, { guestPath: repo, baseCommit: base });

    expect((await readFile(indexPath)).equals(indexBefore)).toBe(true);
    expect((await stat(indexPath, { bigint: true })).mtimeNs).toBe(mtimeBefore);
    await expect(stat(join(repo, '.git', 'index.lock'))).rejects.toMatchObject({ code: 'ENOENT' });

    expect(x.baseCommit).toBe(base);
    expect(x.hasChanges).toBe(true);
    expect([...x.changedFiles].sort()).toEqual(['committed.txt', 'staged.txt', 'unstaged.txt', 'untracked.txt']);
    const patch = x.patch.toString('utf8');
    for (const line of ['+a committed change', '+a staged change', '+an uncommitted change', '+an untracked file']) {
      expect(patch).toContain(line);
    }
    expect(patch).not.toContain('debug.log');
    // and the real index still stages exactly what it did: staged.txt only
    expect(await git(repo, 'diff', '--cached', '--name-only')).toBe('staged.txt\n');
  });

  it('the patch applied to a checkout of the base gives the working tree', async () => {
    const { repo, base } = await workRepo();
    const x = await exportWorkspace(localGuest, { guestPath: repo, baseCommit: base });
    const check = await mkdtemp(join(scratch, 'apply-'));
    await git(check, 'clone', '-q', repo, 'r');
    const co = join(check, 'r');
    await git(co, 'checkout', '-q', '--detach', base);
    await writeFile(join(check, 'work.patch'), x.patch);
    await git(co, 'apply', '--binary', join(check, 'work.patch'));
    for (const f of ['committed.txt', 'staged.txt', 'unstaged.txt', 'untracked.txt']) {
      expect(await readFile(join(co, f), 'utf8')).toBe(await readFile(join(repo, f), 'utf8'));
    }
  });
});
