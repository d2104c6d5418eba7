import { readFile, stat } from 'node:fs/promises';
import type { PrepareResult } from '../../rpc/types.js';
import { posix, resolve } from 'node:path';
import { PassThrough, Readable, Transform, Writable } from 'node:stream';
import { execa } from 'execa';
import { BangerError, errorMessage } from '../../errors.js';
import { run, type Runner } from '../exec/runner.js';
import { HOST_GIT_ENV, hostGit, hostGitPaths, inspectRepo, unquoteGitPath, worktreeDelta, type RepoInfo, type WorktreeDelta } from './host-repo.js';
import { appendPack, appendTo, checkoutPlan, packObjects, removeHostPack, restOfHistory, type HostPack } from './workspace-pack.js';
import {
  CLEANUP_SCRIPT,
  FULL_COPY_SCRIPT,
  guestCommand,
  INCREMENTAL_SCRIPT,
  INTERRUPTED,
  PACKED_SCRIPT,
  RESUME_SCRIPT,
} from './workspace-scripts.js';

/**
 * Workspaces: copy a host git repository into a guest and get the guest's work back as a patch.
 *
 * prepare streams everything through the guest's stdin (git pack-objects for history, tar for the working
 * tree) — never a whole-repo file on the host. It builds the repository in a staging directory next to the
 * guest path and moves it into place at the end, so an interrupted prepare never leaves a half-made workspace
 * at the guest path (the next prepare of the same path removes the stale staging directory).
 *
 * export (workspace-export.ts) runs one guest script that never writes to the repository.
 *
 * Every guest command is `sh -c <constant script> banger <values...>`, built with shellQuote: the scripts
 * (workspace-scripts.ts) are fixed text and every value reaches them only as a quoted positional parameter.
 */

// ---------------------------------------------------------------------------------------------------------
// The guest

export interface GuestExecResult {
  exitCode: number;
  stdout: Buffer;
  stderr: Buffer;
}

/** Run a command in the guest (through a POSIX shell, as root). The lead wires it to ssh2. */
export interface GuestExec {
  (
    command: string,
    opts?: {
      stdin?: NodeJS.ReadableStream | Buffer | string;
      signal?: AbortSignal;
      /** Where stdout goes (piped with backpressure, not ended); the result's stdout is then empty. */
      stdout?: NodeJS.WritableStream;
      /** Where stderr goes, likewise. */
      stderr?: NodeJS.WritableStream;
    },
  ): Promise<GuestExecResult>;
}

export const WORKSPACE_MODES = ['shallow', 'full_history', 'full_copy'] as const;
export type WorkspaceMode = (typeof WORKSPACE_MODES)[number];

export interface PrepareOptions {
  /** Host directory inside the repository; resolved against the process's cwd when relative. */
  source: string;
  /** Absolute guest path. prepare only requires it absolute; the /root rule is validateGuestPath's. */
  guestPath: string;
  /** A new branch the guest checks out at the base. */
  branch?: string;
  /** A revision (branch, tag, sha, HEAD~2, ...) to base the guest on instead of HEAD. */
  from?: string;
  mode: WorkspaceMode;
  readOnly: boolean;
  /** Replace whatever is at guestPath. */
  replace?: boolean;
  /**
   * How full_copy's tar crosses the link: zstd needs zstd on both ends (the host's tar runs `zstd -1`, the guest's
   * tar `zstd -d`); absent: none. See LinkCompression.
   */
  compression?: LinkCompression;
  /**
   * Where a plain prepare of this same source, HEAD and mode left the guest path, when the caller knows the path
   * holds exactly that (the workspace cache's hit: a work disk cloned from one stored right after that prepare).
   * The guest checks the marker; on a match only the difference between the two deltas crosses, in one guest
   * command that starts no git process unless files must come back from HEAD. Otherwise a normal prepare runs.
   * That command starts at once, while the host inspects the repository; with `resumeWhen` it changes nothing
   * until the caller's own check (run alongside) resolves true.
   */
  resume?: ResumePoint;
  resumeWhen?: Promise<boolean>;
  /**
   * The marker this path's last prepare wrote, as the caller remembers it (the daemon, per VM and path). When it
   * names a plain workspace of this source and mode, the in-place update runs at once, in one guest command that
   * first checks the guest still holds that marker at that HEAD; otherwise (or when it does not) as usual.
   */
  lastMarker?: string;
}

/**
 * A plain prepare: HEAD as the base, no new branch, not read-only. Only a plain prepare's workspace is updated in
 * place by the next prepare, resumed from a cached work disk, or stored in the workspace cache.
 */
export function isPlainPrepare(o: { from?: string; branch?: string; readOnly?: boolean }): boolean {
  return o.from === undefined && o.branch === undefined && !o.readOnly;
}

/** What a plain prepare left at the guest path: HEAD's tree with the host's delta over it, and its marker. */
export interface ResumePoint {
  /** The content of the workspace's .git/banger-workspace (one line of JSON, preparedAt included). */
  marker: string;
  delta: WorktreeDelta;
}

/**
 * Compression on the link, chosen by end-to-end measurement under TCG (npm run bench -- --only prepare: `git
 * archive | C | ssh 'C -d | tar -x'`, one guest, side by side). zstd -1 against none: 1.58x and 1.77x the
 * throughput on a generated 10,000-file repository and on this project's; lz4 1.20x and 1.75x; gzip -1 1.06x and
 * 2.05x (its inflate and CRC cost the guest's emulated CPU). zstd is used for full_copy's tar. The packs of
 * shallow and full_history are zlib-compressed object by object already, and their delta is usually small.
 */
export type LinkCompression = 'zstd' | 'none';

export interface WorkspaceProgress {
  /** inspect | check | history | refs | tree | finish */
  stage: string;
  /** Bytes pushed into the guest's stdin so far in this stage (streaming stages only). */
  bytes?: number;
}

export interface PrepareContext {
  signal?: AbortSignal;
  onProgress?: (p: WorkspaceProgress) => void;
  runner?: Runner;
}

/** The wire's prepare result (src/rpc/types.ts); the VM id is filled in by the caller that knows the VM. */
export type WorkspacePrepareResult = Omit<PrepareResult, 'vmId'> & {
  vmId?: string;
  /** An incremental re-prepare: the guest workspace's HEAD before it (the workspace cache checks a hit with it). */
  previousHead?: string;
  /** A plain prepare's resume point (stored with a cached work disk). */
  resumePoint?: ResumePoint;
  /** The prepare went from `resume` (one guest command), not a full or incremental one. */
  resumed?: boolean;
};

// ---------------------------------------------------------------------------------------------------------
// Validation (the RPC layer calls these; prepare/export call the ones that do not depend on /root)

export const CONTROL_RE = /[\x00-\x1f\x7f]/;

/** A guest path: absolute, under /root, no `..`, no control characters. Returns it normalised. */
export function validateGuestPath(p: unknown): string {
  const hint = 'a guest path is an absolute path under /root, e.g. /root/repo';
  if (typeof p !== 'string' || p === '') throw new BangerError('usage', 'the guest path is empty', hint);
  if (CONTROL_RE.test(p)) throw new BangerError('usage', `guest path ${JSON.stringify(p)} contains control characters`, hint);
  if (!p.startsWith('/')) throw new BangerError('usage', `guest path ${JSON.stringify(p)} is not absolute`, hint);
  if (p.split('/').includes('..')) throw new BangerError('usage', `guest path ${JSON.stringify(p)} contains '..'`, hint);
  const norm = normalizeAbsolute(p);
  if (!norm.startsWith('/root/')) throw new BangerError('usage', `guest path ${JSON.stringify(p)} is not under /root`, hint);
  return norm;
}

export function normalizeAbsolute(p: string): string {
  let norm = posix.normalize(p);
  while (norm.length > 1 && norm.endsWith('/')) norm = norm.slice(0, -1);
  return norm;
}

/** git check-ref-format's rules, plus no leading '-'. Returns the name. */
export function validateRefName(r: unknown, what = 'ref name'): string {
  const fail = (why: string): never => {
    throw new BangerError(
      'usage',
      `invalid ${what} ${JSON.stringify(r)}: ${why}`,
      'git ref names may not contain spaces, control characters, ~ ^ : ? * [ \\, "..", "@{", "//", may not start with "-", ' +
        '"/" or ".", and may not end with "/", "." or ".lock"',
    );
  };
  if (typeof r !== 'string' || r === '') return fail('empty');
  if (r.length > 255) fail('longer than 255 characters');
  if (r.startsWith('-')) fail("starts with '-'");
  if (/[\x00-\x20\x7f~^:?*[\\]/.test(r)) fail('contains a space, a control character or one of ~ ^ : ? * [ \\');
  if (r.includes('..')) fail("contains '..'");
  if (r.includes('@{')) fail("contains '@{'");
  if (r === '@') fail("is '@'");
  if (r.startsWith('/') || r.endsWith('/') || r.includes('//')) fail("has an empty '/' component");
  if (r.endsWith('.')) fail("ends with '.'");
  for (const c of r.split('/')) {
    if (c.startsWith('.')) fail("has a component starting with '.'");
    if (c.endsWith('.lock')) fail("has a component ending with '.lock'");
  }
  return r;
}

/**
 * A new branch name: git's ref-name rules, not "HEAD", and only letters, digits and . _ / + , = @ % -
 * (no shell metacharacters: values are always quoted, but a branch called `$(x)` only ever means trouble).
 */
export function validateBranchName(b: unknown): string {
  const name = validateRefName(b, 'branch name');
  if (name === 'HEAD') throw new BangerError('usage', 'invalid branch name "HEAD"', 'pick another branch name');
  if (!/^[\p{L}\p{N}._/+,=@%-]+$/u.test(name)) {
    throw new BangerError(
      'usage',
      `invalid branch name ${JSON.stringify(name)}: only letters, digits and . _ / + , = @ % - are allowed`,
      'pick a branch name without shell metacharacters, e.g. agent/fix-123',
    );
  }
  return name;
}

/**
 * A revision expression (`main`, `v1.2`, a sha, `HEAD~2`, `origin/main^{commit}`): no leading '-' (it would be
 * an option), no control characters, at most 255 characters. Whether it names a commit is checked by git.
 */
export function validateRevision(r: unknown, what = 'revision'): string {
  const hint = 'give a branch, a tag or a commit sha';
  if (typeof r !== 'string' || r === '') throw new BangerError('usage', `the ${what} is empty`, hint);
  if (r.length > 255) throw new BangerError('usage', `the ${what} is longer than 255 characters`, hint);
  if (r.startsWith('-')) throw new BangerError('usage', `invalid ${what} ${JSON.stringify(r)}: starts with '-'`, hint);
  if (CONTROL_RE.test(r)) throw new BangerError('usage', `invalid ${what} ${JSON.stringify(r)}: contains control characters`, hint);
  return r;
}

export function splitNul(buf: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let start = 0;
  for (;;) {
    const i = buf.indexOf(0, start);
    if (i < 0) {
      if (start < buf.length) out.push(buf.subarray(start));
      return out;
    }
    if (i > start) out.push(buf.subarray(start, i));
    start = i + 1;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Running guest steps and host streams

export function abortError(signal: AbortSignal | undefined, what: string): BangerError {
  const reason = signal?.reason;
  const detail =
    reason instanceof Error && reason.name !== 'AbortError' ? `: ${reason.message}` : typeof reason === 'string' ? `: ${reason}` : '';
  return new BangerError('aborted', `${what} aborted${detail}`, undefined, { cause: reason });
}

export function tail(s: string | Buffer, lines = 12, maxChars = 2000): string {
  const t = (Buffer.isBuffer(s) ? s.toString('utf8') : s).trim().split('\n').slice(-lines).join('\n');
  return t.length > maxChars ? `…${t.slice(-maxChars)}` : t;
}

/** Await `p`, but reject as soon as `signal` aborts (an exec that ignores its signal cannot hang us). */
function raceAbort<T>(p: Promise<T>, signal: AbortSignal | undefined, what: string): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((res, rej) => {
    const onAbort = () => rej(abortError(signal, what));
    if (signal.aborted) return onAbort();
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => (signal.removeEventListener('abort', onAbort), res(v)),
      (e) => (signal.removeEventListener('abort', onAbort), rej(e)),
    );
  });
}

export async function execGuest(
  exec: GuestExec,
  what: string,
  command: string,
  opts: Parameters<GuestExec>[1] & { signal?: AbortSignal },
): Promise<GuestExecResult> {
  if (opts.signal?.aborted) throw abortError(opts.signal, what);
  const p = exec(command, opts);
  p.catch(() => {});
  try {
    return await raceAbort(p, opts.signal, what);
  } catch (e) {
    if (opts.signal?.aborted) throw abortError(opts.signal, what);
    if (e instanceof BangerError) throw e;
    throw new BangerError('host', `${what}: the guest command failed: ${errorMessage(e)}`, undefined, { cause: e });
  }
}

export function guestStepError(what: string, r: GuestExecResult): BangerError {
  const err = tail(r.stderr);
  if (r.exitCode === 127) {
    return new BangerError('host', `${what}: ${err || 'a command is missing in the guest'}`, 'the guest image needs git and tar');
  }
  return new BangerError('host', `${what} failed in the guest (exit ${r.exitCode})${err ? `: ${err}` : ''}`);
}

interface HostStream {
  label: string;
  stdout: Readable;
  stdin?: Writable;
  done: Promise<{ ok: boolean; description: string }>;
  running(): boolean;
  kill(): void;
}

/** Start a host process whose stdout is streamed (the host layer's one use of execa outside the runner). */
function startHostStream(
  label: string,
  file: string,
  args: string[],
  opts: { signal?: AbortSignal; input?: Buffer; pipeStdin?: boolean },
): HostStream {
  const child = execa(file, args, {
    cancelSignal: opts.signal,
    env: HOST_GIT_ENV,
    extendEnv: true,
    reject: false,
    ...(opts.input !== undefined ? { input: opts.input } : { stdin: opts.pipeStdin ? 'pipe' : 'ignore' }),
    stdout: 'pipe',
    stderr: 'pipe',
    buffer: { stdout: false, stderr: true },
    encoding: 'buffer',
  });
  let finished = false;
  const done = child.then((r) => {
    finished = true;
    const stderr = tail(Buffer.from(r.stderr as Uint8Array));
    const ok = !r.failed && r.exitCode === 0;
    const how = r.exitCode !== undefined ? `exit ${r.exitCode}` : r.signal ? `killed by ${r.signal}` : r.shortMessage;
    return { ok, description: `${label} failed (${how})${stderr ? `: ${stderr}` : ''}` };
  });
  child.stdin?.on('error', () => {});
  child.stdout!.on('error', () => {});
  return {
    label,
    stdout: child.stdout!,
    stdin: child.stdin ?? undefined,
    done,
    running: () => !finished,
    kill: () => void child.kill(),
  };
}

/**
 * Stream `source` into a guest command's stdin, counting bytes. Host processes that feed it are killed when the
 * guest command fails or the signal aborts, and always awaited: nothing is left running on the host.
 * A host process's failure wins over the guest's (the guest's is then only its consequence); the guest's exit
 * status is the caller's to judge.
 */
async function streamToGuest(
  exec: GuestExec,
  what: string,
  stageName: string | (() => string),
  command: string,
  procs: HostStream[],
  source: Readable,
  ctx: PrepareContext,
): Promise<{ bytes: number; result: GuestExecResult }> {
  const { signal, onProgress } = ctx;
  const stage = typeof stageName === 'string' ? () => stageName : stageName;
  let bytes = 0;
  let last = 0;
  const counter = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      bytes += chunk.length;
      const now = Date.now();
      if (onProgress && now - last >= 100) {
        last = now;
        onProgress({ stage: stage(), bytes });
      }
      cb(null, chunk);
    },
  });
  counter.on('error', () => {});
  source.pipe(counter);
  let result: GuestExecResult | undefined;
  let failure: unknown;
  try {
    result = await execGuest(exec, what, command, { stdin: counter, signal });
  } catch (e) {
    failure = e;
  }
  source.unpipe(counter);
  counter.destroy();
  const killed = new Set<HostStream>();
  if (failure !== undefined || result?.exitCode !== 0) {
    for (const p of procs) {
      if (p.running()) {
        killed.add(p);
        p.kill();
      }
    }
  }
  // Whatever the guest left unread is drained so a host process never blocks on a full pipe.
  source.resume();
  const outcomes = await Promise.all(procs.map((p) => p.done));
  if (signal?.aborted) throw abortError(signal, what);
  procs.forEach((p, i) => {
    if (!killed.has(p) && !outcomes[i].ok) throw new BangerError('host', `${what}: ${outcomes[i].description}`);
  });
  if (failure !== undefined) throw failure;
  if (result!.exitCode === 0) onProgress?.({ stage: stage(), bytes });
  return { bytes, result: result! };
}

// ---------------------------------------------------------------------------------------------------------
// prepare

/**
 * Copy a host repository into the guest at `guestPath`.
 *
 * shallow / full_history: the commits (HEAD's, plus `from`'s, as shallow commits; or everything under refs/heads,
 * refs/tags and refs/remotes) go over as packs made on the host with their indexes: HEAD's tree in slices, each
 * checked out in the guest (`checkout-index -u` after a `read-tree` of HEAD) while the next arrives, then the
 * rest of the history; then the host's changed and untracked non-ignored files as one tar over the checkout;
 * then refs and HEAD are set (the host's current branch name, or detached); the index, with every file's stat
 * data from the checkout, equals HEAD, so the host's uncommitted edits, deletions, mode changes and untracked files show in the guest as
 * uncommitted changes. Ignored files stay behind. Staged-but-uncommitted changes on the host arrive unstaged; an
 * untracked nested repository arrives as an empty directory. One guest command in all, full_copy's too.
 *
 * full_copy: the repository directory as it is (.git, ignored files and submodules included) as one tar,
 * zstd-compressed when `compression` says so.
 *
 * from: resolved on the host (never silently HEAD). When it differs from HEAD, the guest stashes the host's
 * uncommitted state (`git stash -u`), checks out `from` (its branch when `from` names a local branch, else
 * detached) and pops the stash: a three-way merge, so the host's changes land on top of `from`; if they do not
 * apply cleanly the prepare fails with a conflict naming the files.
 * branch: a new branch of that name at the base, checked out (an existing branch of that name is a conflict).
 *
 * readOnly: everything outside .git loses its write bits (`chmod a-w`; non-root users cannot write). root
 * ignores mode bits, so where `mount` works the path is also bind-mounted read-only with .git bind-mounted
 * read-write on top (git status/commit and export keep working): root's writes then fail with EROFS until it
 * runs `umount` or `mount -o remount,rw` (it can), and a guest reboot drops the mount (the mode bits stay).
 * readOnlyMount in the result says whether the mount is in place.
 *
 * A guestPath that exists and is not an empty directory is a conflict unless `replace` (which removes it,
 * unmounting a previous read-only workspace first). Abort via ctx.signal kills the host's git/tar and
 * rejects with kind 'aborted'; a staging directory `.<name>.banger-staging` may then remain next to the
 * guest path and is removed by the next prepare of that path.
 */
export async function prepareWorkspace(
  exec: GuestExec,
  opts: PrepareOptions,
  ctx: PrepareContext = {},
): Promise<WorkspacePrepareResult> {
  const { signal } = ctx;
  const runner = ctx.runner ?? run;
  const where = checkPrepareOptions(opts);
  if (signal?.aborted) throw abortError(signal, PREPARE);
  try {
    ctx.onProgress?.({ stage: 'inspect' });
    const prepared = preparation(exec, opts, ctx, runner, where);
    const plainNow = !opts.replace && opts.mode !== 'full_copy' && isPlainPrepare(opts);
    const resumed = opts.resume && plainNow ? resumeWorkspace(exec, where.dest, opts.resume, prepared, opts.resumeWhen ?? Promise.resolve(true), ctx) : undefined;
    const r = await resumed; // settles after `prepared` (it waits for it)
    if (r) return r;
    const p = await prepared;
    try {
      return opts.mode === 'full_copy' ? await prepareFullCopy(p) : await preparePacked(p);
    } catch (e) {
      // Best effort: the staging dir goes away, unless we were aborted (the connection may be gone; the next
      // prepare of this path removes it anyway) or the path was taken (then we never made one).
      const taken = e instanceof BangerError && e.kind === 'conflict' && /^guest path /.test(e.message);
      if (!taken && !signal?.aborted) {
        await exec(guestCommand(CLEANUP_SCRIPT, [p.stagePath]), { signal }).catch(() => {});
      }
      throw e;
    }
  } catch (e) {
    if (signal?.aborted) throw abortError(signal, PREPARE);
    throw e;
  }
}

const PREPARE = 'workspace prepare';

/** The repository inspected, the mode checked against it and the base resolved: all a prepare needs from the host first. */
async function preparation(exec: GuestExec, opts: PrepareOptions, ctx: PrepareContext, runner: Runner, where: ReturnType<typeof checkPrepareOptions>): Promise<Prepare> {
  const repo = await inspectRepo(opts.source, { runner, signal: ctx.signal });
  await checkModeFits(opts.mode, repo);
  const base = await resolveBase(runner, repo, where.from, ctx.signal);
  return { exec, opts, ctx, runner, repo, ...where, ...base, preparedAt: new Date().toISOString(), sourcePath: resolve(opts.source) };
}

/** One prepare, its options checked and its repository inspected. */
interface Prepare {
  exec: GuestExec;
  opts: PrepareOptions;
  ctx: PrepareContext;
  runner: Runner;
  repo: RepoInfo;
  dest: string;
  stagePath: string;
  newBranch?: string;
  from?: string;
  baseCommit: string;
  fromBranch: string | null;
  preparedAt: string;
  sourcePath: string;
}

/** The mode, the guest path (normalized, and the staging dir beside it), the new branch and the base revision. */
function checkPrepareOptions(opts: PrepareOptions) {
  if (!(WORKSPACE_MODES as readonly string[]).includes(opts.mode)) {
    throw new BangerError('usage', `unknown workspace mode ${JSON.stringify(opts.mode)}`, `use one of ${WORKSPACE_MODES.join(', ')}`);
  }
  if (typeof opts.guestPath !== 'string' || !opts.guestPath.startsWith('/') || CONTROL_RE.test(opts.guestPath)) {
    throw new BangerError('usage', `guest path ${JSON.stringify(opts.guestPath)} is not an absolute path`);
  }
  const dest = normalizeAbsolute(opts.guestPath);
  if (dest === '/') throw new BangerError('usage', 'the guest path cannot be /');
  return {
    dest,
    stagePath: posix.join(posix.dirname(dest), `.${posix.basename(dest)}.banger-staging`),
    newBranch: opts.branch === undefined ? undefined : validateBranchName(opts.branch),
    from: opts.from === undefined ? undefined : validateRevision(opts.from, '--from revision'),
  };
}

/** Submodules go only with full_copy, which needs a plain .git directory. */
async function checkModeFits(mode: WorkspaceMode, repo: RepoInfo): Promise<void> {
  if (mode !== 'full_copy' && repo.submodules.length > 0) {
    throw new BangerError(
      'usage',
      `${repo.repoRoot} has submodules (${repo.submodules.join(', ')}); mode ${mode} does not copy them`,
      'use --mode full_copy, which copies the repository directory as it is, .git and submodules included',
    );
  }
  if (mode === 'full_copy') await checkFullCopyable(repo.repoRoot, repo.gitDir);
}

/** The base: `from` resolved on the host, never silently HEAD; and its local branch, when it names one. */
async function resolveBase(runner: Runner, repo: RepoInfo, from: string | undefined, signal?: AbortSignal) {
  if (from === undefined) return { baseCommit: repo.headCommit, fromBranch: null };
  const root = repo.repoRoot;
  const r = await hostGit(runner, root, ['rev-parse', '-q', '--verify', `${from}^{commit}`], { signal, reject: false });
  if (r.exitCode !== 0 || !r.stdout.trim()) {
    throw new BangerError('usage', `--from ${JSON.stringify(from)} does not name a commit in ${root}`,
      'give a branch, a tag or a commit sha that exists in the host repository');
  }
  const full = await hostGit(runner, root, ['rev-parse', '--symbolic-full-name', from], { signal, reject: false });
  const name = full.exitCode === 0 ? full.stdout.trim() : '';
  return { baseCommit: r.stdout.trim(), fromBranch: name.startsWith('refs/heads/') && !name.includes('\n') ? name.slice('refs/heads/'.length) : null };
}

/** A guest command's exit status as the error it stands for (see the scripts' exit codes). */
function checkStep(p: Prepare, name: string, r: GuestExecResult): void {
  if (r.exitCode === 0) return;
  if (r.exitCode === 10) throw destTakenError(p.dest, r.stdout.toString('utf8'));
  if (r.exitCode === 11) {
    throw new BangerError('conflict', `${PREPARE}: ${tail(r.stderr, 30)}`, 'commit or stash the host changes first, or prepare from HEAD (no --from)');
  }
  if (r.exitCode === 12) throw new BangerError('conflict', `${PREPARE}: ${tail(r.stderr)}`, 'pick another --branch name');
  throw guestStepError(`${PREPARE} (${name})`, r);
}

/** The base's branch in the guest: `from`'s when the base moved, else the host's current one. */
const targetBranch = (p: Prepare) => (p.baseCommit !== p.repo.headCommit ? p.fromBranch : p.repo.currentBranch);

const markerOf = (p: Prepare, o: { readOnly: boolean; branch: string | null }) =>
  JSON.stringify({ sourcePath: p.sourcePath, headCommit: p.repo.headCommit, baseCommit: p.baseCommit, mode: p.opts.mode, preparedAt: p.preparedAt, ...o });

/** FINISH_BODY's arguments: refs, HEAD and index; the base; the new branch; move into place; read-only. */
function finishArgs(p: Prepare, fullCopy: boolean, shallow: string[]): string[] {
  return [
    p.dest, p.stagePath, p.opts.replace ? '1' : '0', fullCopy ? '1' : '0', p.repo.headCommit, p.baseCommit, targetBranch(p) ?? '', p.newBranch ?? '',
    p.opts.readOnly ? '1' : '0', markerOf(p, { readOnly: p.opts.readOnly, branch: p.newBranch ?? null }), p.repo.currentBranch ?? '', ...shallow,
  ];
}

function resultOf(p: Prepare, fin: GuestExecResult, bytes: number): WorkspacePrepareResult {
  return {
    sourcePath: p.sourcePath,
    repoRoot: p.repo.repoRoot,
    repoName: p.repo.repoName,
    guestPath: p.dest,
    mode: p.opts.mode,
    readOnly: p.opts.readOnly,
    readOnlyMount: /banger-prepared mounted=1/.test(fin.stdout.toString('utf8')),
    headCommit: p.repo.headCommit,
    currentBranch: p.repo.currentBranch,
    branchName: p.newBranch ?? targetBranch(p),
    baseCommit: p.baseCommit,
    preparedAt: p.preparedAt,
    bytesStreamed: bytes,
    bytesSent: bytes,
    cache: 'off',
    incremental: false,
  };
}

/**
 * full_copy: the directory as it is, then the finish, in one guest command (it checks the path and makes the
 * staging dir first). The plain tar's `end` line goes only after the host's tar exited well.
 */
async function prepareFullCopy(p: Prepare): Promise<WorkspacePrepareResult> {
  const zstd = p.opts.compression === 'zstd';
  const args = ['-c', ...(zstd ? ['-I', 'zstd -1 -q'] : []), '-f', '-', '-C', p.repo.repoRoot, ...TAR_AS_ROOT, '.'];
  const feed: Feed = async (input, signal, started) => {
    const tar = startHostStream('tar -c', 'tar', args, { signal });
    started(tar);
    await appendTo(input, tar.stdout, signal);
    const t = await tar.done;
    if (!t.ok) throw new BangerError('host', t.description);
    if (!zstd) input.write('end\n');
  };
  p.ctx.onProgress?.({ stage: 'tree' });
  const command = guestCommand(FULL_COPY_SCRIPT, [p.dest, p.stagePath, p.opts.replace ? '1' : '0', zstd ? '1' : '0', ...finishArgs(p, true, [])]);
  const t = await withFeeder('sending the tree', p.ctx.signal, feed, (feeder, input) =>
    streamToGuest(p.exec, `${PREPARE} (tree)`, 'tree', command, [feeder], input, p.ctx));
  checkStep(p, 'tree', t.result);
  return resultOf(p, t.result, t.bytes);
}

/**
 * shallow and full_history: one guest command with the history as packs, the tree checked out of them as they
 * arrive, only what differs on the host on top, then the finish (the guest checks the path and makes the
 * staging dir first). A path that holds this source's plain workspace is updated in place instead (incremental).
 */
async function preparePacked(p: Prepare): Promise<WorkspacePrepareResult> {
  const { runner, repo, opts } = p;
  const signal = p.ctx.signal;
  const plain = isPlainPrepare(opts);
  const tips = new Set([repo.headCommit, p.baseCommit]);
  const refUpdates: string[] = [];
  if (opts.mode === 'full_history') {
    for (const { sha, ref } of await hostRefs(runner, repo.repoRoot, signal)) {
      tips.add(sha);
      refUpdates.push(`create ${ref} ${sha}`);
    }
  } else if (repo.currentBranch) refUpdates.push(`create refs/heads/${repo.currentBranch} ${repo.headCommit}`);
  const shallow = opts.mode === 'full_history' ? await hostShallowList(runner, repo.repoRoot, signal) : await commitsWithParents(runner, repo.repoRoot, [...tips], signal);
  if (p.baseCommit !== repo.headCommit && p.fromBranch && !refUpdates.some((u) => u.startsWith(`create refs/heads/${p.fromBranch} `))) {
    refUpdates.push(`create refs/heads/${p.fromBranch} ${p.baseCommit}`);
  }
  const plainMarker = markerOf(p, { readOnly: false, branch: null });
  const inPlace = (old: { head: string; marker: string }) => prepareIncremental(p.exec, { dest: p.dest, repo, old, tips: [...tips], refUpdates, shallow, marker: plainMarker }, p.ctx, runner);
  const known = opts.lastMarker && !opts.replace ? reusableMarker(opts.lastMarker, p.sourcePath, opts.mode, plain) : undefined;
  const updated = known ? await inPlace(known) : undefined;
  if (known && updated) return incrementalResult(p, updated, known.head, plainMarker);
  p.ctx.onProgress?.({ stage: 'history' });
  const refs = Buffer.from(refUpdates.map((u) => u + '\n').join(''));
  const w = { what: PREPARE, dest: p.dest, stagePath: p.stagePath, replace: opts.replace ? '1' : '0', repo, tips: [...tips], noWalk: opts.mode === 'shallow', refs, finish: finishArgs(p, false, shallow) };
  const h = await sendPackedTree(p.exec, w, p.ctx, runner);
  const reuse = h.result.exitCode === 10 ? reusableWorkspace(h.result.stdout, p.sourcePath, opts.mode, plain) : undefined;
  if (!reuse) {
    checkStep(p, 'history', h.result);
    const resumePoint = plain && h.delta ? { marker: plainMarker, delta: h.delta } : undefined;
    return { ...resultOf(p, h.result, h.bytes), ...(resumePoint ? { resumePoint } : {}) };
  }
  const i = await inPlace(reuse);
  if (!i) throw new BangerError('conflict', `${PREPARE}: the workspace at ${p.dest} changed while it was being updated`, 'prepare again');
  return incrementalResult(p, i, reuse.head, plainMarker);
}

function incrementalResult(p: Prepare, i: { bytes: number; delta: WorktreeDelta }, previousHead: string, marker: string): WorkspacePrepareResult {
  const r = resultOf(p, { exitCode: 0, stdout: Buffer.alloc(0), stderr: Buffer.alloc(0) }, i.bytes);
  return { ...r, readOnly: false, readOnlyMount: false, incremental: true, previousHead, resumePoint: { marker, delta: i.delta } };
}

/** The host's branches, tags and remote-tracking refs (not the symbolic <remote>/HEAD ones), as full_history sends them. */
async function hostRefs(runner: Runner, root: string, signal?: AbortSignal): Promise<Array<{ sha: string; ref: string }>> {
  const r = await hostGit(runner, root, ['for-each-ref', '--format=%(objectname) %(refname)', 'refs/heads', 'refs/tags', 'refs/remotes'], { signal });
  return r.stdout.split('\n').flatMap((line) => {
    const m = /^([0-9a-f]{40,64}) (\S+)$/.exec(line);
    return m && !m[2].endsWith('/HEAD') ? [{ sha: m[1], ref: m[2] }] : [];
  });
}

/**
 * One guest command (PACKED_SCRIPT) for a fresh shallow/full_history prepare: it starts at once (the guest checks
 * the path and makes the staging repository) while the host plans the packs and lists its working-tree delta;
 * then the packs of HEAD's tree (each built while the one before it is sent, each checked out in the guest while
 * the next arrives), a pack of the rest of the history, the ref updates, the deletions and a tar of the changed
 * and untracked files follow on its stdin, and the guest finishes (FINISH_BODY) in the same command. When the
 * guest refuses (exit 10, the path is taken) nothing more is built or sent.
 */
async function sendPackedTree(
  exec: GuestExec,
  w: { what: string; dest: string; stagePath: string; replace: string; repo: RepoInfo; tips: string[]; noWalk: boolean; refs: Buffer; finish: string[] },
  ctx: PrepareContext,
  runner: Runner,
): Promise<{ bytes: number; result: GuestExecResult; delta?: WorktreeDelta }> {
  const root = w.repo.repoRoot;
  const packs: Array<Promise<HostPack | undefined>> = [];
  let stage = 'history';
  let sentDelta: WorktreeDelta | undefined;
  const feed: Feed = async (input, signal, started) => {
    const [plan, delta] = await Promise.all([checkoutPlan(root, w.repo.headCommit, signal), worktreeDelta(runner, root, signal)]);
    sentDelta = delta;
    const rest = restOfHistory(root, w.tips, plan.sent, { noWalk: w.noWalk, signal });
    rest.catch(() => {});
    // Each pack is built while the one before it crosses the link.
    const build = (i: number) => {
      const p = i < plan.slices.length
        ? packObjects(root, plan.slices[i].ids, signal)
        : rest.then((lines) => (lines.length ? packObjects(root, lines, signal) : undefined));
      p.catch(() => {});
      packs.push(p);
      return p;
    };
    let next = build(0);
    for (let i = 0; i <= plan.slices.length; i++) {
      const p = await next;
      if (i < plan.slices.length) next = build(i + 1);
      if (p) await appendPack(input, p, i < plan.slices.length ? plan.slices[i].paths : Buffer.alloc(0), signal);
      await removeHostPack(p);
    }
    input.write(Buffer.concat([Buffer.from(`end\n${w.refs.length}\n`), w.refs]));
    stage = 'tree';
    ctx.onProgress?.({ stage });
    await appendDelta(input, deltaHeader(delta), root, delta, signal, started);
    stage = 'finish';
    ctx.onProgress?.({ stage });
  };
  const command = guestCommand(PACKED_SCRIPT, [w.dest, w.stagePath, w.replace, w.repo.objectFormat, w.repo.headCommit, ...w.finish]);
  try {
    const sent = await withFeeder('sending the history and the tree', ctx.signal, feed, (feeder, input) =>
      streamToGuest(exec, `${w.what} (history)`, () => stage, command, [feeder], input, ctx));
    return { ...sent, delta: sentDelta };
  } finally {
    for (const p of packs) await removeHostPack(await p.catch(() => undefined));
  }
}

/** What a feeder does: write into `input` (the guest command's stdin), under `signal`; `started` learns of a host process it runs. */
type Feed = (input: PassThrough, signal: AbortSignal, started: (child: HostStream) => void) => Promise<void>;

/**
 * Run `use` with a feeder (a HostStream for streamToGuest) that writes `feed`'s output into the guest's input as
 * the guest command runs. The feeder's failure is the stream's (`what` failed); the input always ends (a short
 * stream fails the guest's checks); killing it aborts `feed` and the process it started. After `use`, it is
 * stopped and awaited: nothing is left running on the host.
 */
async function withFeeder<T>(what: string, signal: AbortSignal | undefined, feed: Feed, use: (feeder: HostStream, input: PassThrough) => Promise<T>): Promise<T> {
  const stop = new AbortController();
  const feedSignal = signal ? AbortSignal.any([signal, stop.signal]) : stop.signal;
  const input = new PassThrough();
  let child: HostStream | undefined;
  let finished = false;
  const done = feed(input, feedSignal, (c) => (child = c)).then(
    () => ({ ok: true, description: '' }),
    (e: unknown) => ({ ok: false, description: `${what} failed: ${errorMessage(e)}` }),
  ).finally(() => {
    finished = true;
    input.end();
  });
  const feeder: HostStream = { label: 'feeder', stdout: input, done, running: () => !finished, kill: () => { stop.abort(); child?.kill(); } };
  try {
    return await use(feeder, input);
  } finally {
    stop.abort();
    await done;
  }
}

/** Into `input`: `header`, a tar of the delta's files when it has any (`started` learns of it), then `end\n` (DELTA_END). */
async function appendDelta(input: PassThrough, header: Buffer, root: string, delta: WorktreeDelta, signal: AbortSignal, started: (child: HostStream) => void): Promise<void> {
  input.write(header);
  if (delta.send.length > 0) {
    const tar = startDeltaTar(root, delta, signal);
    started(tar);
    await appendTo(input, tar.stdout, signal);
    const t = await tar.done;
    if (!t.ok) throw new BangerError('host', t.description);
  }
  input.write('end\n');
}

/** APPLY_DELTA's header: the deleted paths' length and whether a tar follows, then the paths. */
const deltaHeader = (d: WorktreeDelta) => Buffer.concat([Buffer.from(`${d.deleted.length} ${d.send.length > 0 ? 1 : 0}\n`), d.deleted]);

/** A tar of the delta's changed and untracked files (named NUL-terminated on tar's stdin), relative to `root`. */
const startDeltaTar = (root: string, d: WorktreeDelta, signal: AbortSignal | undefined) =>
  startHostStream('tar -c', 'tar', ['-c', '-f', '-', '-C', root, ...TAR_AS_ROOT, '--no-recursion', '--null', '--verbatim-files-from', '-T', '-'], { signal, input: d.send });

/** The host's files go into the guest owned by root, whoever owns them on the host. */
const TAR_AS_ROOT = ['--owner=0', '--group=0', '--numeric-owner'];

/**
 * The HEAD and marker of a workspace at the guest path that an incremental re-prepare may update in place: one banger
 * prepared from the same source in the same mode, plain (no --from, --branch or read-only, then or now), whose
 * HEAD has not moved since. `stdout` is DEST_CHECK's ("repo <sha>", "marker <json>"). Otherwise undefined.
 */
function reusableWorkspace(stdout: Buffer, sourcePath: string, mode: WorkspaceMode, plainNow: boolean): { head: string; marker: string } | undefined {
  const text = stdout.toString('utf8');
  const head = /^repo ([0-9a-f]{40,64})$/m.exec(text)?.[1];
  const json = /^marker (\{.*\})$/m.exec(text)?.[1];
  if (!head || !json) return undefined;
  const r = reusableMarker(json, sourcePath, mode, plainNow);
  return r?.head === head ? r : undefined;
}

/** The HEAD a marker was written at, when it names a plain workspace of this source and mode (and this prepare is plain too). */
function reusableMarker(marker: string, sourcePath: string, mode: WorkspaceMode, plainNow: boolean): { head: string; marker: string } | undefined {
  if (!plainNow || mode === 'full_copy') return undefined;
  const m = parseMarker(marker);
  const plain = m?.readOnly === false && m.branch === null && m.baseCommit === m.headCommit;
  const ok = plain && m.sourcePath === sourcePath && m.mode === mode && typeof m.headCommit === 'string' && /^[0-9a-f]{40,64}$/.test(m.headCommit);
  return ok ? { head: m.headCommit as string, marker } : undefined;
}

/**
 * Update a workspace in place, in one guest command (INCREMENTAL_SCRIPT) that first checks the workspace still
 * holds `old.marker`: a pack of only the objects the guest lacks (the new tips' objects, not those reachable
 * from its HEAD, made with its index on the host), then the tree reset to the new HEAD (git writes only the files
 * that differ), untracked non-ignored files removed, and the host's delta on top. Ignored files in the guest
 * (build output) stay. Not atomic: an interrupted update leaves a valid repository part-way, with the old marker
 * (so the next prepare redoes it); --replace is the full reset. Returns the bytes sent and the delta laid over
 * HEAD, or undefined when the marker was not there (nothing touched).
 */
async function prepareIncremental(
  exec: GuestExec,
  w: { dest: string; repo: RepoInfo; old: { head: string; marker: string }; tips: string[]; refUpdates: string[]; shallow: string[]; marker: string },
  ctx: PrepareContext,
  runner: Runner,
): Promise<{ bytes: number; delta: WorktreeDelta } | undefined> {
  const root = w.repo.repoRoot;
  const noWalk = w.shallow.length > 0 && w.refUpdates.length <= 1; // shallow mode: no history walk
  let stage = 'history';
  let sentDelta: WorktreeDelta | undefined;
  const feed: Feed = async (input, signal, started) => {
    const [lines, delta] = await Promise.all([restOfHistory(root, [...w.tips, `^${w.old.head}`], new Set(), { noWalk, signal }), worktreeDelta(runner, root, signal)]);
    sentDelta = delta;
    const pack = lines.length > 0 ? await packObjects(root, lines, signal) : undefined;
    try {
      if (pack) await appendPack(input, pack, Buffer.alloc(0), signal);
    } finally {
      await removeHostPack(pack);
    }
    input.write('end\n');
    stage = 'tree';
    ctx.onProgress?.({ stage });
    await appendDelta(input, deltaHeader(delta), root, delta, signal, started);
  };
  ctx.onProgress?.({ stage });
  const refs = w.refUpdates.flatMap((u) => u.split(' ').slice(1, 3));
  const args = [w.dest, w.old.marker, w.old.head, w.repo.headCommit, w.repo.currentBranch ?? '', w.marker, ...w.shallow, '--', ...refs];
  const what = `${PREPARE} (incremental)`;
  const t = await withFeeder('sending the new objects and the delta', ctx.signal, feed, (feeder, input) =>
    streamToGuest(exec, what, () => stage, guestCommand(INCREMENTAL_SCRIPT, args), [feeder], input, ctx));
  if (t.result.exitCode === 13) return undefined;
  if (t.result.exitCode !== 0) throw guestStepError(what, t.result);
  return { bytes: t.bytes, delta: sentDelta! };
}

/**
 * The workspace cache's hit: the guest path `dest` holds what a plain prepare of this source at this HEAD left
 * (`from`), so one guest command (RESUME_SCRIPT) turns its delta into the host's current one. It starts at once
 * (the guest checks the marker) while the host inspects the repository, lists its delta while `when` is decided,
 * and plans; then the header and the tar follow on its stdin. Undefined, with nothing changed in the guest, when
 * `from` is not this HEAD's, `when` is false, or the guest's marker differs (a normal prepare follows).
 */
async function resumeWorkspace(exec: GuestExec, dest: string, from: ResumePoint, prepared: Promise<Prepare>, when: Promise<boolean>, ctx: PrepareContext): Promise<WorkspacePrepareResult | undefined> {
  let sent: { p: Prepare; marker: string; delta: WorktreeDelta } | undefined;
  const feed: Feed = async (input, signal, started) => {
    const p = await prepared;
    const was = parseMarker(from.marker);
    if (!was || was.headCommit !== p.repo.headCommit || was.sourcePath !== p.sourcePath || was.mode !== p.opts.mode) return;
    const root = p.repo.repoRoot;
    // the delta while `when` is decided (a hit waits for both; when it is false, the delta goes unused)
    const [go, delta] = await Promise.all([when, worktreeDelta(p.runner, root, signal)]);
    if (!go) return;
    const plan = await resumePlan(p.runner, root, p.repo.headCommit, from.delta, delta, signal);
    const marker = markerOf(p, { readOnly: false, branch: null });
    sent = { p, marker, delta };
    const header = `${plan.remove.length} ${plan.restore.length} ${delta.send.length > 0 ? 1 : 0}\n${marker}\n`;
    await appendDelta(input, Buffer.concat([Buffer.from(header), plan.remove, plan.restore]), root, delta, signal, started);
  };
  const command = guestCommand(RESUME_SCRIPT, [dest, from.marker]);
  try {
    const t = await withFeeder('sending the delta', ctx.signal, feed, (feeder, input) => streamToGuest(exec, `${PREPARE} (resume)`, 'tree', command, [feeder], input, ctx));
    if (t.result.exitCode === 13 || !sent) return undefined;
    if (t.result.exitCode !== 0) throw guestStepError(`${PREPARE} (resume)`, t.result);
    const { p, marker, delta } = sent;
    return { ...resultOf(p, t.result, t.bytes), incremental: true, previousHead: p.repo.headCommit, resumePoint: { marker, delta }, resumed: true };
  } catch (e) {
    if (!sent) await prepared; // the inspection's error, when it failed, is the one to report
    throw e;
  }
}

function parseMarker(marker: string): Record<string, unknown> | undefined {
  try {
    const m = JSON.parse(marker) as unknown;
    return m && typeof m === 'object' ? (m as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * From HEAD with delta `old` over it to HEAD with `now`: every path `old` touched and `now` does not send, and
 * every path `now` deletes, is removed (`now`'s files then come in its tar, replacing what is there); those of
 * HEAD's files that `old` touched and `now` leaves alone are checked out of the index again. NUL-terminated lists,
 * as RESUME_SCRIPT reads them.
 */
async function resumePlan(runner: Runner, root: string, head: string, old: WorktreeDelta, now: WorktreeDelta, signal?: AbortSignal): Promise<{ remove: Buffer; restore: Buffer }> {
  const key = (b: Buffer) => b.toString('latin1');
  const touchedBefore = [...splitNul(old.send), ...splitNul(old.deleted)];
  const sentNow = new Set(splitNul(now.send).map(key));
  const decidedNow = new Set([...sentNow, ...splitNul(now.deleted).map(key)]);
  // Deleted before and not sent: not there. Never removed again: a parent the old delta made a symlink would
  // take the removal elsewhere (lib/f deleted, lib -> vendor sent: `rm lib/f` is vendor/f).
  const sentBefore = new Set(splitNul(old.send).map(key));
  const absent = new Set(splitNul(old.deleted).map(key).filter((k) => !sentBefore.has(k)));
  // a file the tar writes again needs no removal first (tar replaces it), unless it is deleted from the index too
  const toRemove = [...touchedBefore.filter((b) => !sentNow.has(key(b))), ...splitNul(now.deleted)];
  const remove = new Map(toRemove.filter((b) => !absent.has(key(b))).map((b) => [key(b), b]));
  const candidates = touchedBefore.filter((b) => !decidedNow.has(key(b)));
  let restore: Buffer[] = [];
  if (candidates.length > 0) {
    const inHead = new Set((await hostGitPaths(runner, root, ['ls-tree', '-r', '--name-only', '--full-tree', head], signal)).map((l) => key(unquoteGitPath(l))));
    restore = [...new Map(candidates.filter((b) => inHead.has(key(b))).map((b) => [key(b), b])).values()];
  }
  const nulList = (bs: Iterable<Buffer>) => Buffer.concat([...bs].flatMap((b) => [b, Buffer.from([0])]));
  return { remove: nulList(remove.values()), restore: nulList(restore) };
}

function destTakenError(dest: string, stdout: string): BangerError {
  if (new RegExp(`^marker ${INTERRUPTED}$`, 'm').test(stdout)) {
    return new BangerError('conflict', `guest path ${dest} holds a workspace whose last update was cut short`, 'prepare it again with --replace (it is deleted first)');
  }
  const m = /repo (\S+)/.exec(stdout);
  const what = m ? `already holds a git repository (HEAD ${m[1]})` : 'exists and is not an empty directory';
  return new BangerError('conflict', `guest path ${dest} ${what}`, 'choose another --guest-path, or replace it (it is deleted first)');
}

async function checkFullCopyable(root: string, gitDir: string): Promise<void> {
  const dotGit = await stat(`${root}/.git`).catch(() => undefined);
  if (!dotGit?.isDirectory() || resolve(gitDir) !== resolve(root, '.git')) {
    throw new BangerError(
      'usage',
      `${root} is a linked worktree or a submodule checkout (its .git is not a directory): a full copy would not work in the guest`,
      'use --mode shallow or --mode full_history, or prepare from the main working tree',
    );
  }
  if (await stat(`${gitDir}/objects/info/alternates`).catch(() => undefined)) {
    throw new BangerError(
      'usage',
      `${root} borrows objects from another repository (objects/info/alternates): a full copy would be incomplete`,
      'run `git repack -a -d` and remove objects/info/alternates, or use --mode shallow or full_history',
    );
  }
}

/** The host's own shallow boundary (a shallow host clone stays shallow in the guest). */
async function hostShallowList(runner: Runner, root: string, signal?: AbortSignal): Promise<string[]> {
  const r = await hostGit(runner, root, ['rev-parse', '--is-shallow-repository'], { signal, reject: false });
  if (r.stdout.trim() !== 'true') return [];
  const p = await hostGit(runner, root, ['rev-parse', '--git-path', 'shallow'], { signal });
  const text = await readFile(resolve(root, p.stdout.trim()), 'utf8').catch(() => '');
  return text.split('\n').filter((l) => /^[0-9a-f]{40,64}$/.test(l));
}

/** The commits among `shas` that have parents in their raw objects (shallow mode marks them as the boundary). */
async function commitsWithParents(runner: Runner, root: string, shas: string[], signal?: AbortSignal): Promise<string[]> {
  const out: string[] = [];
  for (const sha of shas) {
    const r = await hostGit(runner, root, ['cat-file', 'commit', sha], { signal });
    const header = r.stdout.split('\n\n')[0];
    if (/^parent /m.test(header)) out.push(sha);
  }
  return out;
}
