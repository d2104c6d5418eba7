/**
 * The host's repository, read only: what a prepare and the workspace cache's key need to know of it (its root,
 * HEAD, branch, git dir, object format, submodules) and how its working tree differs from HEAD. Every host git
 * here runs without optional locks.
 */
import { stat } from 'node:fs/promises';
import { basename, resolve } from 'node:path';
import { BangerError } from '../../errors.js';
import { run, type Runner } from '../exec/runner.js';

/** Environment for every host git: never take optional locks (status would otherwise rewrite the index). */
export const HOST_GIT_ENV = { GIT_OPTIONAL_LOCKS: '0', LC_ALL: 'C' };

export async function hostGit(
  runner: Runner,
  cwd: string,
  args: string[],
  opts: { signal?: AbortSignal; reject?: boolean; input?: string } = {},
) {
  return runner('git', ['-C', cwd, ...args], {
    signal: opts.signal,
    env: HOST_GIT_ENV,
    reject: opts.reject,
    input: opts.input,
  });
}

/**
 * Paths from git, byte-exact whatever the runner's encoding: with core.quotePath=true, git prints every path
 * that is not plain printable ASCII as a C-style quoted string ("\303\274", "\n"), so each line is ASCII.
 */
export async function hostGitPaths(runner: Runner, cwd: string, args: string[], signal?: AbortSignal): Promise<string[]> {
  const r = await hostGit(runner, cwd, ['-c', 'core.quotePath=true', ...args], { signal });
  return r.stdout.split('\n').filter((l) => l !== '');
}

const C_ESCAPES: Record<string, number> = { a: 7, b: 8, t: 9, n: 10, v: 11, f: 12, r: 13, '"': 34, '\\': 92 };

/** Undo git's C-style path quoting (quote_c_style) into the path's bytes. */
export function unquoteGitPath(s: string): Buffer {
  if (!(s.length >= 2 && s.startsWith('"') && s.endsWith('"'))) return Buffer.from(s, 'utf8');
  const out: number[] = [];
  for (let i = 1; i < s.length - 1; i++) {
    const ch = s[i];
    if (ch !== '\\') {
      for (const b of Buffer.from(ch, 'utf8')) out.push(b);
      continue;
    }
    const next = s[++i];
    if (next >= '0' && next <= '7') {
      out.push(parseInt(s.slice(i, i + 3), 8) & 0xff);
      i += 2;
    } else {
      out.push(C_ESCAPES[next] ?? next.charCodeAt(0));
    }
  }
  return Buffer.from(out);
}

/** Where a working tree's repository stands. */
export interface RepoHead {
  /** Absolute, symlinks resolved (git's --show-toplevel). */
  repoRoot: string;
  gitDir: string;
  objectFormat: 'sha1' | 'sha256';
  /** The shallow file's path (it need not exist), as git gives it: relative to the directory asked about. */
  shallowFile: string;
  headCommit: string;
  /** null when HEAD is detached. */
  currentBranch: string | null;
}

/**
 * The repository that `source` (a directory) is in, and its HEAD. One git process when all goes well (a hit's
 * prepare asks this twice, once for the cache key, while the guest competes for the same two cores); step by step
 * where that one cannot answer (not a repository, no commit yet, an older git, a newline in a path), so a failure
 * names its cause.
 */
export async function readRepoHead(source: string, runner: Runner = run, signal?: AbortSignal): Promise<RepoHead> {
  const abs = resolve(source);
  const st = await stat(abs).catch(() => undefined);
  if (!st) throw new BangerError('not_found', `${abs} does not exist`, 'pass --source a directory inside a git repository');
  if (!st.isDirectory()) throw new BangerError('usage', `${abs} is not a directory`, 'pass --source a directory inside a git repository');
  const all = await hostGit(runner, abs, ['rev-parse', '--show-toplevel', '--absolute-git-dir', '--show-object-format', '--git-path', 'shallow', 'HEAD', '--symbolic-full-name', 'HEAD'], { signal, reject: false });
  const lines = all.stdout.split('\n');
  if (all.exitCode === 0 && lines.length === 7 && lines[6] === '' && /^[0-9a-f]{40,64}$/.test(lines[4])) {
    const [repoRoot, gitDir, format, shallowFile, headCommit, ref] = lines;
    return { repoRoot, gitDir, objectFormat: format === 'sha256' ? 'sha256' : 'sha1', shallowFile, headCommit, currentBranch: branchOf(ref) };
  }
  return readRepoHeadStepwise(abs, runner, signal);
}

const branchOf = (ref: string) => (ref.startsWith('refs/heads/') && ref.length > 'refs/heads/'.length ? ref.slice('refs/heads/'.length) : null);

async function readRepoHeadStepwise(abs: string, runner: Runner, signal?: AbortSignal): Promise<RepoHead> {
  const top = await hostGit(runner, abs, ['rev-parse', '--show-toplevel'], { signal, reject: false });
  if (top.exitCode !== 0 || top.stdout.trim() === '') {
    const why = top.stderr.trim();
    if (/not a git repository/i.test(why) || why === '') {
      throw new BangerError('usage', `${abs} is not a git repository`, 'run it inside a git checkout, or pass --source a directory inside one (git init makes one)');
    }
    throw new BangerError('usage', `${abs} is not a usable git working tree: ${why.split('\n').pop()}`, 'banger copies a git working tree (not a bare repository)');
  }
  const repoRoot = top.stdout.replace(/\n$/, '');
  const head = await hostGit(runner, repoRoot, ['rev-parse', '-q', '--verify', 'HEAD^{commit}'], { signal, reject: false });
  if (head.exitCode !== 0) {
    throw new BangerError('usage', `${repoRoot} has no commits yet`, 'commit something first: the guest gets the repository at a commit');
  }
  const [ref, gitDir, format, shallow] = await Promise.all([
    hostGit(runner, repoRoot, ['symbolic-ref', '-q', 'HEAD'], { signal, reject: false }),
    hostGit(runner, repoRoot, ['rev-parse', '--absolute-git-dir'], { signal }),
    hostGit(runner, repoRoot, ['rev-parse', '--show-object-format'], { signal, reject: false }),
    hostGit(runner, abs, ['rev-parse', '--git-path', 'shallow'], { signal }),
  ]);
  return {
    repoRoot,
    gitDir: gitDir.stdout.replace(/\n$/, ''),
    objectFormat: format.stdout.trim() === 'sha256' ? 'sha256' : 'sha1',
    shallowFile: shallow.stdout.replace(/\n$/, ''),
    headCommit: head.stdout.trim(),
    currentBranch: ref.exitCode === 0 ? branchOf(ref.stdout.trim()) : null,
  };
}

/** What a prepare needs to know of the host's repository. */
export interface RepoInfo extends RepoHead {
  repoName: string;
  /** Paths of gitlinks (mode 160000) in the index. */
  submodules: string[];
}

/** Inspect the host repository that `source` is in: its head, name and submodules. */
export async function inspectRepo(source: string, opts: { runner?: Runner; signal?: AbortSignal } = {}): Promise<RepoInfo> {
  const runner = opts.runner ?? run;
  const head = await readRepoHead(source, runner, opts.signal);
  const stage = await hostGitPaths(runner, head.repoRoot, ['ls-files', '--stage'], opts.signal);
  const submodules: string[] = [];
  for (const line of stage) {
    // "<mode> <sha> <stage>\t<path>"
    if (!line.startsWith('160000 ')) continue;
    const p = unquoteGitPath(line.slice(line.indexOf('\t') + 1)).toString('utf8');
    if (!submodules.includes(p)) submodules.push(p);
  }
  return { ...head, repoName: basename(head.repoRoot), submodules };
}

/**
 * How the host's working tree differs from HEAD, as NUL-terminated path lists: `send` (changed, added, type- or
 * mode-changed, and untracked non-ignored files) and `deleted` (gone from the working tree, or no longer a file:
 * a file that became a directory is deleted here and its new contents are untracked, so they are sent).
 */
export interface WorktreeDelta {
  /** Changed and untracked files, NUL-terminated. */
  send: Buffer;
  /** Files deleted (or replaced by a directory), NUL-terminated. */
  deleted: Buffer;
}

export async function worktreeDelta(runner: Runner, root: string, signal?: AbortSignal): Promise<WorktreeDelta> {
  const [changed, untracked] = await Promise.all([
    hostGitPaths(runner, root, ['diff', '--name-status', '--no-renames', '--no-ext-diff', '--ignore-submodules=none', 'HEAD', '--'], signal),
    hostGitPaths(runner, root, ['ls-files', '--others', '--exclude-standard'], signal),
  ]);
  const send: Buffer[] = [];
  const deleted: Buffer[] = [];
  const seen = { send: new Set<string>(), deleted: new Set<string>() };
  const nul = Buffer.from([0]);
  const add = (to: 'send' | 'deleted', path: string) => {
    if (seen[to].has(path)) return; // unmerged entries can be listed once per stage
    seen[to].add(path);
    (to === 'send' ? send : deleted).push(unquoteGitPath(path), nul);
  };
  for (const line of changed) {
    const tab = line.indexOf('\t');
    add(line.slice(0, tab) === 'D' ? 'deleted' : 'send', line.slice(tab + 1));
  }
  // A path removed from the index but still present is both: deleted first, then sent.
  for (const path of untracked) add('send', path);
  return { send: Buffer.concat(send), deleted: Buffer.concat(deleted) };
}
