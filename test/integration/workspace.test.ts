/**
 * Workspace prepare/export against real git, with a "guest" that is this host: GuestExec runs `sh -c command`
 * locally with stdin piped, and the guest path is a temp directory. The /root rule is validateGuestPath's
 * (tested on its own); prepareWorkspace itself only needs an absolute path.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmod, lstat, mkdir, readdir, readFile, readlink, rm, stat, symlink, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { exportWorkspace } from '../../src/host/guest/workspace-export.js';
import {
  prepareWorkspace,
  validateBranchName,
  validateGuestPath,
  validateRefName,
  validateRevision,
  type GuestExec,
  type PrepareOptions,
} from '../../src/host/guest/workspace.js';
import { inspectRepo, unquoteGitPath } from '../../src/host/guest/host-repo.js';
import { run, type Runner } from '../../src/host/exec/runner.js';
import { shellQuote } from '../../src/host/exec/shell.js';
import { commitAll, git, gitBuffer, gitdir, isolateGitConfig, tempDir } from '../support/git.js';

// ---------------------------------------------------------------------------------------------------------
// A local "guest"

interface LocalGuest extends GuestExec {
  calls: string[];
}

function localGuest(hooks: { onStdinData?: (command: string) => void } = {}): LocalGuest {
  const calls: string[] = [];
  const exec = ((command, opts = {}) =>
    new Promise((resolve, reject) => {
      calls.push(command);
      const { signal } = opts;
      if (signal?.aborted) return reject(new Error('aborted before start'));
      const child = spawn('sh', ['-c', command], { detached: true, stdio: ['pipe', 'pipe', 'pipe'] });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      child.stdout.on('data', (b: Buffer) => out.push(b));
      child.stderr.on('data', (b: Buffer) => err.push(b));
      child.stdin.on('error', () => {});
      const stdin = opts.stdin;
      let piped: Readable | undefined;
      if (stdin === undefined) child.stdin.end();
      else if (typeof stdin === 'string' || Buffer.isBuffer(stdin)) child.stdin.end(stdin);
      else {
        piped = stdin as Readable;
        if (hooks.onStdinData) piped.once('data', () => hooks.onStdinData!(command));
        piped.pipe(child.stdin);
      }
      const onAbort = () => {
        try {
          process.kill(-child.pid!, 'SIGKILL');
        } catch {
          /* gone */
        }
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      child.on('error', reject);
      child.on('close', (code, sig) => {
        signal?.removeEventListener('abort', onAbort);
        piped?.unpipe(child.stdin);
        if (signal?.aborted) return reject(new Error('guest command aborted'));
        resolve({ exitCode: code ?? (sig ? 128 : 1), stdout: Buffer.concat(out), stderr: Buffer.concat(err) });
      });
    })) as LocalGuest;
  exec.calls = calls;
  return exec;
}

/** Run a shell command "in the guest" (a plain local shell) and return stdout. */
async function sh(command: string, cwd?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', command], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (b) => (out += b));
    child.stderr.on('data', (b) => (err += b));
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${command}: exit ${code}: ${err}`))));
  });
}

// ---------------------------------------------------------------------------------------------------------
// Trees and statuses

interface Entry {
  kind: 'file' | 'symlink';
  exec: boolean;
  hash: string;
}

/** Files and symlinks under `dir` (not .git, not dirs): kind, executable bit, content hash / link target. */
async function snapshotTree(dir: string, skip: (rel: string) => boolean = () => false): Promise<Map<string, Entry>> {
  const out = new Map<string, Entry>();
  async function walk(rel: string) {
    for (const name of await readdir(join(dir, rel))) {
      const r = rel ? `${rel}/${name}` : name;
      if (r === '.git' || skip(r)) continue;
      const st = await lstat(join(dir, r));
      if (st.isDirectory()) await walk(r);
      else if (st.isSymbolicLink()) out.set(r, { kind: 'symlink', exec: false, hash: await readlink(join(dir, r)) });
      else {
        const hash = createHash('sha256').update(await readFile(join(dir, r))).digest('hex');
        out.set(r, { kind: 'file', exec: (st.mode & 0o100) !== 0, hash });
      }
    }
  }
  await walk('');
  return out;
}

/** `git status` reduced to path → new | deleted | modified (staged or not: the guest has no staged changes). */
async function statusOf(dir: string): Promise<Record<string, string>> {
  const raw = await gitBuffer(dir, 'status', '--porcelain=v1', '-z', '--untracked-files=all');
  const out: Record<string, string> = {};
  for (const rec of raw.toString('utf8').split('\0').filter(Boolean)) {
    const xy = rec.slice(0, 2);
    const path = rec.slice(3);
    out[path] = xy === '??' || xy.includes('A') ? 'new' : xy.includes('D') ? 'deleted' : 'modified';
  }
  return out;
}

async function exists(p: string): Promise<boolean> {
  return lstat(p).then(
    () => true,
    () => false,
  );
}

async function expectBanger(p: Promise<unknown>, kind: string, message?: RegExp): Promise<BangerError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e, 'expected a rejection').toBeInstanceOf(BangerError);
  const be = e as BangerError;
  expect(be.kind, be.message).toBe(kind);
  if (message) expect(be.message).toMatch(message);
  return be;
}

/** Whether a read-only bind mount works here (root with CAP_SYS_ADMIN): then prepare must have made one. */
async function canBindMount(): Promise<boolean> {
  const d = await tempDir('banger-mount-probe-');
  const q = JSON.stringify(d);
  const out = await sh(`mount --bind ${q} ${q} 2>/dev/null && mount -o remount,bind,ro ${q} 2>/dev/null && echo yes; umount ${q} 2>/dev/null; true`);
  await rm(d, { recursive: true, force: true });
  return out.trim() === 'yes';
}

/** Our read-only bind mounts must not outlive the test. */
async function unmountUnder(root: string): Promise<void> {
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  const points = info
    .split('\n')
    .map((l) => l.split(' ')[4])
    .filter((p): p is string => !!p && p.startsWith(root))
    .sort((a, b) => b.length - a.length);
  for (const p of points) await sh(`umount ${JSON.stringify(p)} 2>/dev/null || true`);
}

// ---------------------------------------------------------------------------------------------------------
// The fixture: a repo with history, a tag, a side branch, and every kind of uncommitted change

let restoreGit: () => Promise<void>;
const cleanups: (() => Promise<unknown>)[] = [];
let scratch: string;
let host: string;
let c1: string;
let c2: string;
let head: string;
const BINARY = randomBytes(4096);

async function makeHostRepo(): Promise<string> {
  const dir = await gitdir('banger-repo-', scratch);
  await writeFile(join(dir, 'README.md'), '# demo\n');
  await mkdir(join(dir, 'src'));
  await writeFile(join(dir, 'src/a.txt'), 'a1\n');
  await writeFile(join(dir, 'src/b.txt'), 'line one\nline two\nline three\n');
  await writeFile(join(dir, 'del.txt'), 'to be deleted\n');
  await mkdir(join(dir, 'bin'));
  await writeFile(join(dir, 'bin/run.sh'), '#!/bin/sh\necho run\n');
  await chmod(join(dir, 'bin/run.sh'), 0o755);
  await writeFile(join(dir, 'img.bin'), BINARY);
  await writeFile(join(dir, '.gitignore'), '*.log\nbuild/\n');
  await writeFile(join(dir, '-dash.txt'), 'leading dash\n');
  await writeFile(join(dir, 'weird name ü.txt'), 'unicode\n');
  await symlink('src/a.txt', join(dir, 'link-to-a'));
  c1 = await commitAll(dir, 'first');
  await writeFile(join(dir, 'src/a.txt'), 'a2\n');
  await writeFile(join(dir, 'src/c.txt'), 'c\n');
  c2 = await commitAll(dir, 'second');
  await git(dir, 'tag', '-a', 'v1', '-m', 'version 1', c2);
  // a side branch that changes src/b.txt's middle line (conflicts with the host's uncommitted edit below)
  await git(dir, 'checkout', '-q', '-b', 'feature', c1);
  await writeFile(join(dir, 'src/b.txt'), 'line one\nfeature two\nline three\n');
  await commitAll(dir, 'feature work');
  await git(dir, 'checkout', '-q', 'main');
  await writeFile(join(dir, 'src/a.txt'), 'a3\n');
  head = await commitAll(dir, 'third');
  // uncommitted state
  await writeFile(join(dir, 'src/b.txt'), 'line one\nhost edit two\nline three\n'); // modified
  await unlink(join(dir, 'del.txt')); // deleted
  await writeFile(join(dir, 'new.txt'), 'untracked\n'); // untracked
  await writeFile(join(dir, 'staged-new.txt'), 'staged\n'); // staged, new
  await git(dir, 'add', 'staged-new.txt');
  await writeFile(join(dir, 'README.md'), '# demo\nstaged edit\n'); // staged edit
  await git(dir, 'add', 'README.md');
  await chmod(join(dir, 'src/c.txt'), 0o755); // mode change
  await writeFile(join(dir, 'debug.log'), 'ignored\n'); // ignored
  await mkdir(join(dir, 'build'));
  await writeFile(join(dir, 'build/out.o'), 'ignored too\n'); // ignored dir
  return dir;
}

/** Decided once, before the tests are collected, so a test that needs it can skip visibly with the reason. */
const mountWorks = await canBindMount();

const ignored = (rel: string) => rel === 'debug.log' || rel === 'build' || rel.startsWith('build/');

beforeAll(async () => {
  restoreGit = await isolateGitConfig();
  scratch = await tempDir('banger-ws-');
  host = await makeHostRepo();
});

afterAll(async () => {
  for (const c of cleanups) await c();
  await unmountUnder(scratch);
  await rm(scratch, { recursive: true, force: true });
  await restoreGit();
});

let n = 0;
const guestPath = () => join(scratch, `guest-${++n}`, 'repo');

function prep(exec: GuestExec, over: Partial<PrepareOptions> = {}) {
  return prepareWorkspace(exec, { source: host, guestPath: guestPath(), mode: 'shallow', readOnly: false, ...over });
}

// ---------------------------------------------------------------------------------------------------------

describe('inspectRepo', { timeout: 30_000 }, () => {
  it('reports root, name, HEAD, branch, git dir, object format and submodules', async () => {
    const info = await inspectRepo(join(host, 'src'));
    expect(info).toEqual({
      repoRoot: host,
      repoName: host.split('/').pop(),
      headCommit: head,
      currentBranch: 'main',
      gitDir: join(host, '.git'),
      objectFormat: 'sha1',
      shallowFile: '../.git/shallow',
      submodules: [],
    });
  });

  it('asks git once for the head, and step by step gets the same where that one cannot answer', async () => {
    const calls: string[][] = [];
    const counting: Runner = (file, args, opts) => (calls.push([...args]), run(file, args, opts));
    const once = await inspectRepo(join(host, 'src'), { runner: counting });
    expect(calls.map((a) => a[2])).toEqual(['rev-parse', '-c']); // the head, then ls-files --stage
    const refusing: Runner = (file, args, opts) => (args.includes('--symbolic-full-name') ? Promise.resolve({ exitCode: 128, stdout: '', stderr: 'unknown option' }) : run(file, args, opts));
    expect(await inspectRepo(join(host, 'src'), { runner: refusing })).toEqual(once);
    // a newline in the path: the one answer's lines cannot be told apart, so it goes step by step
    const odd = await gitdir('banger-repo-\nline-', scratch);
    await writeFile(join(odd, 'f'), 'x');
    const sha = await commitAll(odd, 'one');
    expect(await inspectRepo(odd)).toMatchObject({ repoRoot: odd, headCommit: sha, currentBranch: 'main', gitDir: join(odd, '.git') });
  });

  it('does not touch the host index', async () => {
    const before = await readFile(join(host, '.git/index'));
    await inspectRepo(host);
    expect((await readFile(join(host, '.git/index'))).equals(before)).toBe(true);
  });

  it('reports a detached HEAD as currentBranch null', async () => {
    const dir = await gitdir('banger-repo-', scratch);
    await writeFile(join(dir, 'f'), 'x');
    const sha = await commitAll(dir, 'one');
    await git(dir, 'checkout', '-q', '--detach');
    expect(await inspectRepo(dir)).toMatchObject({ currentBranch: null, headCommit: sha });
  });

  it('refuses a directory that is not a repository, and an empty repository', async () => {
    const plain = await tempDir('banger-plain-', scratch);
    const e = await expectBanger(inspectRepo(plain), 'usage', /is not a git repository/);
    expect(e.hint).toBeTruthy();
    await expectBanger(inspectRepo(join(plain, 'nope')), 'not_found', /does not exist/);
    const empty = await gitdir('banger-repo-', scratch);
    await expectBanger(inspectRepo(empty), 'usage', /has no commits yet/);
    await expectBanger(prep(localGuest(), { source: empty }), 'usage', /has no commits yet/);
  });
});

describe('validation', { timeout: 30_000 }, () => {
  it('validateGuestPath', () => {
    expect(validateGuestPath('/root/repo')).toBe('/root/repo');
    expect(validateGuestPath('/root//work/./repo/')).toBe('/root/work/repo');
    for (const bad of ['', 'root/repo', '/etc/repo', '/root', '/root/', '/root/../etc', '/root/a/../b', '/root/a\nb', '/root/a\0b', '/rootx/a']) {
      expect(() => validateGuestPath(bad), JSON.stringify(bad)).toThrow(BangerError);
    }
  });

  it('validateRefName follows git check-ref-format', async () => {
    for (const good of ['main', 'feature/x', 'v1.2.3', 'a-b_c']) expect(validateRefName(good)).toBe(good);
    for (const bad of ['', '-x', 'a..b', 'a b', 'a~1', 'a^', 'a:b', 'a?', 'a*', 'a[b', 'a\\b', 'a@{b', '@', '/a', 'a/', 'a//b', 'a.', '.a', 'a/.b', 'a.lock', 'a/b.lock/c', 'a\tb']) {
      expect(() => validateRefName(bad), JSON.stringify(bad)).toThrow(BangerError);
      // git agrees
      const r = await sh(`git check-ref-format --allow-onelevel ${`'${bad.replace(/'/g, `'\\''`)}'`} && echo ok || echo refused`);
      if (bad !== '-x') expect(r.trim(), bad).toBe('refused');
    }
  });

  it('shellQuote makes every value one literal word; unquoteGitPath undoes git quoting', async () => {
    const values = ['plain', '', "it's", 'a b', '$(touch x)', '`x`', 'a\nb', '"q"', '\\', '*', '~', 'a=b', '-n', 'ü'];
    const out = await sh(`${shellQuote(['printf', '%s\\0', ...values])}`);
    expect(out.split('\0').slice(0, -1)).toEqual(values);
    expect(() => shellQuote(['a\0b'])).toThrow();
    expect(unquoteGitPath('plain name.txt').toString()).toBe('plain name.txt');
    expect(unquoteGitPath('"tab\\there \\"q\\".txt"').toString()).toBe('tab\there "q".txt');
    expect(unquoteGitPath('"\\303\\274\\377\\n"')).toEqual(Buffer.from([0xc3, 0xbc, 0xff, 0x0a]));
  });

  it('validateBranchName refuses shell metacharacters; validateRevision allows revision syntax', () => {
    expect(validateBranchName('agent/fix-1')).toBe('agent/fix-1');
    for (const bad of ['a;b', '$(x)', '`x`', 'a|b', 'a&b', "a'b", 'a"b', 'HEAD', '-b', 'a b', 'a>b']) {
      expect(() => validateBranchName(bad), bad).toThrow(BangerError);
    }
    expect(validateRevision('HEAD~2')).toBe('HEAD~2');
    expect(validateRevision('v1^{commit}')).toBe('v1^{commit}');
    for (const bad of ['', '-x', '--all', 'a\nb']) expect(() => validateRevision(bad), bad).toThrow(BangerError);
  });
});

describe('prepare', { timeout: 30_000 }, () => {
  it('shallow: HEAD, branch, the host working tree and its uncommitted changes; ignored files stay behind', async () => {
    const exec = localGuest();
    const progress: { stage: string; bytes?: number }[] = [];
    const dest = guestPath();
    const r = await prepareWorkspace(exec, { source: host, guestPath: dest, mode: 'shallow', readOnly: false }, { onProgress: (p) => progress.push(p) });
    expect(r).toMatchObject({
      sourcePath: host,
      repoRoot: host,
      guestPath: dest,
      mode: 'shallow',
      readOnly: false,
      readOnlyMount: false,
      headCommit: head,
      baseCommit: head,
      currentBranch: 'main',
      branchName: 'main',
    });
    expect(Date.parse(r.preparedAt)).not.toBeNaN();
    expect(exec.calls.length).toBe(1); // history, tree and finish in one guest command
    expect((await git(dest, 'rev-parse', 'HEAD')).trim()).toBe(head);
    expect((await git(dest, 'symbolic-ref', '--short', 'HEAD')).trim()).toBe('main');
    expect((await git(dest, 'rev-parse', '--is-shallow-repository')).trim()).toBe('true');
    expect((await git(dest, 'rev-list', '--count', 'HEAD')).trim()).toBe('1');
    expect(await exists(join(dest, '.git/shallow'))).toBe(true);
    await git(dest, 'fsck', '--no-progress', '--connectivity-only');
    // same files, contents, exec bits and symlinks as the host's working tree, minus ignored files
    expect(await snapshotTree(dest)).toEqual(await snapshotTree(host, ignored));
    expect(await exists(join(dest, 'debug.log'))).toBe(false);
    expect(await exists(join(dest, 'build'))).toBe(false);
    // git status shows the host's uncommitted changes
    const want = await statusOf(host);
    expect(want).toMatchObject({ 'src/b.txt': 'modified', 'del.txt': 'deleted', 'new.txt': 'new', 'staged-new.txt': 'new', 'README.md': 'modified', 'src/c.txt': 'modified' });
    expect(await statusOf(dest)).toEqual(want);
    // progress: stages and streamed bytes
    expect(progress.map((p) => p.stage)).toEqual(expect.arrayContaining(['inspect', 'history', 'tree', 'finish']));
    const streamed = progress.filter((p) => p.bytes !== undefined);
    expect(streamed.length).toBeGreaterThan(0);
    expect(r.bytesStreamed).toBeGreaterThan(4096);
    // no staging directory left behind
    expect((await readdir(join(dest, '..'))).sort()).toEqual(['repo']);
  });

  it('full_history: all commits, branches and tags, not shallow', async () => {
    const dest = guestPath();
    const r = await prep(localGuest(), { guestPath: dest, mode: 'full_history' });
    expect(r.headCommit).toBe(head);
    expect((await git(dest, 'rev-parse', '--is-shallow-repository')).trim()).toBe('false');
    expect((await git(dest, 'rev-list', '--count', 'HEAD')).trim()).toBe((await git(host, 'rev-list', '--count', 'HEAD')).trim());
    expect((await git(dest, 'rev-parse', 'v1')).trim()).toBe((await git(host, 'rev-parse', 'v1')).trim());
    expect((await git(dest, 'cat-file', '-t', 'v1')).trim()).toBe('tag');
    expect((await git(dest, 'rev-parse', 'feature')).trim()).toBe((await git(host, 'rev-parse', 'feature')).trim());
    expect((await git(dest, 'symbolic-ref', '--short', 'HEAD')).trim()).toBe('main');
    await git(dest, 'fsck', '--no-progress');
    expect(await statusOf(dest)).toEqual(await statusOf(host));
  });

  it('full_copy: the directory as it is, ignored files and the index included', async () => {
    const dest = guestPath();
    await prep(localGuest(), { guestPath: dest, mode: 'full_copy' });
    expect((await git(dest, 'rev-parse', 'HEAD')).trim()).toBe(head);
    expect(await readFile(join(dest, 'debug.log'), 'utf8')).toBe('ignored\n');
    expect(await snapshotTree(dest)).toEqual(await snapshotTree(host));
    // staged stays staged
    expect((await git(dest, 'status', '--porcelain=v1')).trim().split('\n').sort()).toEqual(
      (await git(host, 'status', '--porcelain=v1')).trim().split('\n').sort(),
    );
  });

  it('full_copy with zstd on the link: the same tree, fewer bytes sent', async () => {
    const plain = guestPath();
    const packed = guestPath();
    const r0 = await prep(localGuest(), { guestPath: plain, mode: 'full_copy' });
    const r1 = await prep(localGuest(), { guestPath: packed, mode: 'full_copy', compression: 'zstd' });
    expect(await snapshotTree(packed)).toEqual(await snapshotTree(plain));
    expect(await snapshotTree(packed)).toEqual(await snapshotTree(host));
    expect(r1.bytesSent).toBeLessThan(r0.bytesSent / 2);
  });

  it('--from another commit: detached there, with the host changes on top', async () => {
    const dest = guestPath();
    const r = await prep(localGuest(), { guestPath: dest, from: 'HEAD~1' });
    expect(r).toMatchObject({ headCommit: head, baseCommit: c2, branchName: null, currentBranch: 'main' });
    expect((await git(dest, 'rev-parse', 'HEAD')).trim()).toBe(c2);
    expect(await sh('git symbolic-ref -q HEAD || echo detached', dest)).toBe('detached\n');
    // the host's uncommitted edits are on top of c2; a.txt is c2's (the host's HEAD change is not carried)
    expect(await readFile(join(dest, 'src/a.txt'), 'utf8')).toBe('a2\n');
    expect(await readFile(join(dest, 'src/b.txt'), 'utf8')).toBe('line one\nhost edit two\nline three\n');
    expect(await readFile(join(dest, 'new.txt'), 'utf8')).toBe('untracked\n');
    expect(await exists(join(dest, 'del.txt'))).toBe(false);
    expect(await statusOf(dest)).toMatchObject({ 'src/b.txt': 'modified', 'del.txt': 'deleted', 'new.txt': 'new' });
  });

  it('--from a branch checks that branch out; a conflicting --from is refused with the file named', async () => {
    // the host's b.txt edit touches the same line as feature's commit
    const e = await expectBanger(prep(localGuest(), { from: 'feature' }), 'conflict', /src\/b\.txt/);
    expect(e.hint).toMatch(/commit or stash/);
    // on a clean clone it works and lands on the branch
    const clean = await tempDir('banger-clean-', scratch);
    await git(clean, 'clone', '-q', host, 'r');
    const src = join(clean, 'r');
    await git(src, 'branch', '-q', 'feature', 'origin/feature');
    const dest = guestPath();
    const r = await prep(localGuest(), { source: src, guestPath: dest, from: 'feature', mode: 'full_history' });
    expect(r.branchName).toBe('feature');
    expect((await git(dest, 'symbolic-ref', '--short', 'HEAD')).trim()).toBe('feature');
    expect(await statusOf(dest)).toEqual({});
  });

  it('refuses a --from that does not resolve, before touching the guest', async () => {
    const exec = localGuest();
    const marker = join(scratch, 'pwned-from');
    await expectBanger(prep(exec, { from: 'no-such-branch' }), 'usage', /does not name a commit/);
    await expectBanger(prep(exec, { from: `$(touch ${marker})` }), 'usage', /does not name a commit/);
    expect(exec.calls).toEqual([]);
    expect(await exists(marker)).toBe(false);
  });

  it('--branch: a new branch at the base; metacharacters refused; an existing name is a conflict', async () => {
    const dest = guestPath();
    const r = await prep(localGuest(), { guestPath: dest, branch: 'agent/work' });
    expect(r.branchName).toBe('agent/work');
    expect((await git(dest, 'symbolic-ref', '--short', 'HEAD')).trim()).toBe('agent/work');
    expect((await git(dest, 'rev-parse', 'HEAD')).trim()).toBe(head);
    expect(await statusOf(dest)).toEqual(await statusOf(host));
    const exec = localGuest();
    for (const bad of ['a;b', '$(x)', '-b']) await expectBanger(prep(exec, { branch: bad }), 'usage', /invalid branch name/);
    expect(exec.calls).toEqual([]);
    await expectBanger(prep(localGuest(), { branch: 'main' }), 'conflict', /already exists/);
  });

  it('file names that are not plain text (tab, quote, newline, non-UTF-8 bytes) arrive byte-exact', async () => {
    const dir = await gitdir('banger-names-', scratch);
    const odd = [Buffer.from('tab\there "q".txt'), Buffer.from([0x66, 0xff, 0x0a, 0x67]), Buffer.from('-n')];
    for (const name of odd) await writeFile(Buffer.concat([Buffer.from(dir + '/'), name]), name);
    await commitAll(dir, 'odd names');
    const untracked = Buffer.from([0x75, 0xfe, 0x5c, 0x22]); // u\xfe\"
    await writeFile(Buffer.concat([Buffer.from(dir + '/'), untracked]), 'u');
    const dest = guestPath();
    await prep(localGuest(), { source: dir, guestPath: dest });
    const names = (await readdir(Buffer.from(dest) as unknown as string, { encoding: 'buffer' })).filter((b) => b.toString() !== '.git');
    expect(names.map((b) => b.toString('hex')).sort()).toEqual([...odd, untracked].map((b) => b.toString('hex')).sort());
    for (const name of odd) expect(await readFile(Buffer.concat([Buffer.from(dest + '/'), name]))).toEqual(name);
    expect((await gitBuffer(dest, 'status', '--porcelain', '-z')).toString('hex')).toBe(Buffer.concat([Buffer.from('?? '), untracked, Buffer.from([0])]).toString('hex'));
  });

  it('quotes guest paths: spaces, quotes and $(...) stay literal', async () => {
    const marker = join(scratch, 'pwned-path');
    const dest = join(scratch, `odd-${++n}`, `it's a "dir" $(touch ${marker}) ;x`);
    const r = await prep(localGuest(), { guestPath: dest });
    expect(r.guestPath).toBe(dest);
    expect((await git(dest, 'rev-parse', 'HEAD')).trim()).toBe(head);
    expect(await exists(marker)).toBe(false);
    const x = await exportWorkspace(localGuest(), { guestPath: dest, baseCommit: head });
    expect(x.hasChanges).toBe(true);
  });

  it('refuses submodules outside full_copy, naming them; full_copy copies them', async () => {
    const sub = await gitdir('banger-sub-', scratch);
    await writeFile(join(sub, 'lib.txt'), 'lib\n');
    await commitAll(sub, 'lib');
    const top = await gitdir('banger-super-', scratch);
    await writeFile(join(top, 'main.txt'), 'main\n');
    await git(top, 'submodule', 'add', '-q', sub, 'vendor/lib');
    await commitAll(top, 'with submodule');
    expect((await inspectRepo(top)).submodules).toEqual(['vendor/lib']);
    for (const mode of ['shallow', 'full_history'] as const) {
      const e = await expectBanger(prep(localGuest(), { source: top, mode }), 'usage', /vendor\/lib/);
      expect(e.hint).toMatch(/full_copy/);
    }
    const dest = guestPath();
    await prep(localGuest(), { source: top, guestPath: dest, mode: 'full_copy' });
    expect(await readFile(join(dest, 'vendor/lib/lib.txt'), 'utf8')).toBe('lib\n');
    expect((await git(join(dest, 'vendor/lib'), 'rev-parse', 'HEAD')).trim()).toBe((await git(sub, 'rev-parse', 'HEAD')).trim());
    expect(await statusOf(dest)).toEqual({});
  });

  it('refuses a guest path that holds another repository or files, unless replace; an empty dir is fine', async () => {
    const other = await gitdir('banger-repo-', scratch);
    await writeFile(join(other, 'x'), 'x');
    await commitAll(other, 'other');
    const dest = guestPath();
    await mkdir(join(dest, '..'), { recursive: true });
    await git(join(dest, '..'), 'clone', '-q', other, 'repo');
    await expectBanger(prep(localGuest(), { guestPath: dest }), 'conflict', /already holds a git repository/);
    expect(await readFile(join(dest, 'x'), 'utf8')).toBe('x'); // untouched
    const r = await prep(localGuest(), { guestPath: dest, replace: true });
    expect((await git(dest, 'rev-parse', 'HEAD')).trim()).toBe(r.headCommit);
    expect(await exists(join(dest, 'x'))).toBe(false);
    // the same path again: the same source and mode update it in place (incremental); another mode is a
    // conflict without replace, fine with it
    expect((await prep(localGuest(), { guestPath: dest })).incremental).toBe(true);
    await expectBanger(prep(localGuest(), { guestPath: dest, mode: 'full_history' }), 'conflict', /already holds/);
    await prep(localGuest(), { guestPath: dest, replace: true, mode: 'full_history' });
    expect((await git(dest, 'rev-parse', '--is-shallow-repository')).trim()).toBe('false');
    // files that are not a repository
    const files = guestPath();
    await mkdir(files, { recursive: true });
    await writeFile(join(files, 'notes'), 'n');
    await expectBanger(prep(localGuest(), { guestPath: files }), 'conflict', /not an empty directory/);
    // an empty directory is taken over
    const empty = guestPath();
    await mkdir(empty, { recursive: true });
    await prep(localGuest(), { guestPath: empty });
    expect((await git(empty, 'rev-parse', 'HEAD')).trim()).toBe(head);
  });

  it('readOnly: no write bits outside .git, a bind mount exactly where mount works, git still works, replace undoes it', async () => {
    const dest = guestPath();
    const r = await prep(localGuest(), { guestPath: dest, readOnly: true });
    expect(r.readOnly).toBe(true);
    expect(r.readOnlyMount).toBe(mountWorks);
    for (const f of ['src/a.txt', 'bin/run.sh', 'src', '.']) {
      expect((await stat(join(dest, f))).mode & 0o222, f).toBe(0);
    }
    expect((await stat(join(dest, '.git/index'))).mode & 0o200).not.toBe(0);
    expect(await statusOf(dest)).toEqual(await statusOf(host));
    const x = await exportWorkspace(localGuest(), { guestPath: dest, baseCommit: r.baseCommit });
    expect(x.changedFiles.sort()).toEqual(Object.keys(await statusOf(host)).sort());
    // replacing a read-only workspace unmounts it first
    const again = await prep(localGuest(), { guestPath: dest, replace: true });
    expect(again.readOnlyMount).toBe(false);
    await writeFile(join(dest, 'src/a.txt'), 'writable again\n');
    const mounts = await readFile('/proc/self/mountinfo', 'utf8');
    expect(mounts.includes(` ${dest} `)).toBe(false);
  });

  it.skipIf(!mountWorks)('readOnly where bind mounts work (root with CAP_SYS_ADMIN): even root cannot write into the tree', async () => {
    const dest = guestPath();
    const r = await prep(localGuest(), { guestPath: dest, readOnly: true });
    expect(r.readOnlyMount).toBe(true);
    await expect(writeFile(join(dest, 'src/a.txt'), 'x')).rejects.toMatchObject({ code: 'EROFS' });
    expect(await readFile(join(dest, 'src/a.txt'), 'utf8')).toBe('a3\n');
  });
});

describe('export', { timeout: 30_000 }, () => {
  it('round trip: the patch on a checkout of the base gives exactly the guest tree; the guest is untouched', async () => {
    const dest = guestPath();
    const prepared = await prep(localGuest(), { guestPath: dest });
    // the agent's work: edit, delete, add a binary, chmod, commit once, then leave uncommitted changes
    await writeFile(join(dest, 'src/a.txt'), 'agent edit\n');
    await unlink(join(dest, 'README.md'));
    await writeFile(join(dest, 'agent.bin'), randomBytes(3000));
    await chmod(join(dest, 'src/b.txt'), 0o755);
    await git(dest, 'add', '-A');
    await git(dest, 'commit', '-q', '-m', 'agent commit');
    await writeFile(join(dest, 'src/a.txt'), 'agent edit, uncommitted\n');
    await writeFile(join(dest, 'img.bin'), Buffer.concat([BINARY, Buffer.from([0, 1, 2, 255])]));
    await writeFile(join(dest, 'later.txt'), 'untracked in the guest\n');
    await writeFile(join(dest, 'agent.log'), 'ignored in the guest\n');
    await chmod(join(dest, 'bin/run.sh'), 0o644);

    const before = {
      index: await readFile(join(dest, '.git/index')),
      refs: await git(dest, 'for-each-ref'),
      head: await git(dest, 'rev-parse', 'HEAD'),
      status: await git(dest, 'status', '--porcelain=v1'),
      objects: (await sh('find .git/objects -type f | sort', dest)),
      tree: await snapshotTree(dest),
      // this file's own TMPDIR (test/support/tmpdir.ts), which the local guest's mktemp uses too
      tmp: (await readdir(tmpdir())).filter((f) => f.startsWith('banger-export.')).length,
    };
    const x = await exportWorkspace(localGuest(), { guestPath: dest, baseCommit: prepared.headCommit });
    expect(x.baseCommit).toBe(prepared.headCommit);
    expect(x.guestPath).toBe(dest);
    expect(x.hasChanges).toBe(true);
    expect(x.patch.includes(Buffer.from('GIT binary patch'))).toBe(true);
    expect(x.changedFiles.sort()).toEqual(
      ['README.md', 'agent.bin', 'bin/run.sh', 'del.txt', 'img.bin', 'later.txt', 'new.txt', 'src/a.txt', 'src/b.txt', 'src/c.txt', 'staged-new.txt'].sort(),
    );
    // non-mutating
    expect((await readFile(join(dest, '.git/index'))).equals(before.index)).toBe(true);
    expect(await git(dest, 'for-each-ref')).toBe(before.refs);
    expect(await git(dest, 'rev-parse', 'HEAD')).toBe(before.head);
    expect(await sh('find .git/objects -type f | sort', dest)).toBe(before.objects);
    expect(await exists(join(dest, '.git/index.lock'))).toBe(false);
    expect(await snapshotTree(dest)).toEqual(before.tree);
    expect(await git(dest, 'status', '--porcelain=v1')).toBe(before.status);
    expect((await readdir(tmpdir())).filter((f) => f.startsWith('banger-export.')).length).toBe(before.tmp);

    // apply on a fresh checkout of the base
    const check = await tempDir('banger-apply-', scratch);
    await git(check, 'clone', '-q', '--no-checkout', host, 'r');
    const co = join(check, 'r');
    await git(co, 'checkout', '-q', '--detach', prepared.headCommit);
    const patchFile = join(check, 'work.patch');
    await writeFile(patchFile, x.patch);
    await git(co, 'apply', '--binary', patchFile);
    const skipGuestIgnored = (rel: string) => rel === 'agent.log';
    expect(await snapshotTree(co)).toEqual(await snapshotTree(dest, skipGuestIgnored));
    // and exporting the guest's own HEAD as base only carries the uncommitted part
    const y = await exportWorkspace(localGuest(), { guestPath: dest });
    expect(y.baseCommit).toBe(before.head.trim());
    expect(y.changedFiles.sort()).toEqual(['bin/run.sh', 'img.bin', 'later.txt', 'src/a.txt']);
  });

  it('no changes: an empty patch', async () => {
    const clean = await tempDir('banger-clean-', scratch);
    await git(clean, 'clone', '-q', host, 'r');
    const dest = guestPath();
    const r = await prep(localGuest(), { source: join(clean, 'r'), guestPath: dest });
    const x = await exportWorkspace(localGuest(), { guestPath: dest, baseCommit: r.baseCommit });
    expect(x).toMatchObject({ hasChanges: false, changedFiles: [], baseCommit: r.baseCommit });
    expect(x.patch.length).toBe(0);
  });

  it('an unresolvable base or a path without a repository is a clear error, never an empty patch', async () => {
    const dest = guestPath();
    await prep(localGuest(), { guestPath: dest });
    await expectBanger(exportWorkspace(localGuest(), { guestPath: dest, baseCommit: 'no-such-ref' }), 'usage', /does not name a commit/);
    await expectBanger(exportWorkspace(localGuest(), { guestPath: dest, baseCommit: '0'.repeat(40) }), 'usage', /does not name a commit/);
    await expectBanger(exportWorkspace(localGuest(), { guestPath: dest, baseCommit: '--all' }), 'usage');
    await expectBanger(exportWorkspace(localGuest(), { guestPath: join(scratch, 'nowhere') }), 'not_found', /does not exist/);
    // a directory inside a repository is not taken for the repository
    await expectBanger(exportWorkspace(localGuest(), { guestPath: join(dest, 'src') }), 'not_found', /not a git repository/);
  });
});

describe('abort', { timeout: 30_000 }, () => {
  async function hostChildren(): Promise<string[]> {
    const out = await sh(`ps -o pid=,comm= --ppid ${process.pid} || true`);
    return out
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => /\b(git|tar)\b/.test(l));
  }

  it('mid-stream: rejects with aborted and leaves no host processes', async () => {
    // a repo big enough that the pack is still streaming when the first chunk arrives
    const big = await gitdir('banger-big-', scratch);
    for (let i = 0; i < 4; i++) await writeFile(join(big, `blob-${i}.bin`), randomBytes(2 * 1024 * 1024));
    await commitAll(big, 'big');
    const ac = new AbortController();
    const exec = localGuest({ onStdinData: () => ac.abort() });
    const dest = guestPath();
    await expectBanger(
      prepareWorkspace(exec, { source: big, guestPath: dest, mode: 'shallow', readOnly: false }, { signal: ac.signal }),
      'aborted',
    );
    expect(await hostChildren()).toEqual([]);
    expect(await exists(dest)).toBe(false);
    // the next prepare of that path clears the stale staging directory and succeeds
    await prepareWorkspace(localGuest(), { source: big, guestPath: dest, mode: 'shallow', readOnly: false });
    expect((await readdir(join(dest, '..'))).sort()).toEqual(['repo']);
  });

  it('an already aborted signal rejects at once', async () => {
    const ac = new AbortController();
    ac.abort(new BangerError('invalid_state', 'vm stopped'));
    const exec = localGuest();
    await expectBanger(
      prepareWorkspace(exec, { source: host, guestPath: guestPath(), mode: 'shallow', readOnly: false }, { signal: ac.signal }),
      'aborted',
      /vm stopped/,
    );
    await expectBanger(exportWorkspace(exec, { guestPath: guestPath() }, { signal: ac.signal }), 'aborted');
    expect(exec.calls).toEqual([]);
  });
});
