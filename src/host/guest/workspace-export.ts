/**
 * Workspace export (workspace.ts has the prepare): one guest script that never writes to the repository (a
 * temporary index and object directory, with the repository's objects as an alternate, in a temp dir a trap
 * removes) prints the changed names and a binary patch against the base, which the host checks and keeps.
 */
import { randomBytes } from 'node:crypto';
import { open, rename, unlink } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join } from 'node:path';
import { Writable } from 'node:stream';
import { BangerError, errorMessage } from '../../errors.js';
import type { Runner } from '../exec/runner.js';
import { abortError, CONTROL_RE, execGuest, guestStepError, normalizeAbsolute, splitNul, tail, validateRevision, type GuestExec, type GuestExecResult } from './workspace.js';
import { EXPORT_SCRIPT, guestCommand } from './workspace-scripts.js';

export interface ExportOptions {
  guestPath: string;
  /** A revision in the guest; default the guest's HEAD. */
  baseCommit?: string;
}

export interface WorkspaceExportResult {
  guestPath: string;
  /** The base actually used, resolved to a commit sha in the guest. */
  baseCommit: string;
  /** Exactly the bytes of `git diff --binary` (apply with `git apply`; it carries binary hunks). */
  patch: Buffer;
  changedFiles: string[];
  hasChanges: boolean;
}

/**
 * The guest's work as one patch against the base: committed work past the base, uncommitted edits and
 * untracked (non-ignored) files. One guest script, which writes nothing into the repository: the temporary
 * index (`GIT_INDEX_FILE`, seeded with `git read-tree <base>`) and any new objects (`GIT_OBJECT_DIRECTORY`, the
 * repository's objects as an alternate) live in a mktemp directory removed by a trap on exit. The SPEC's
 * `read-tree --index-output` would lock the real index (index.lock) for the duration; GIT_INDEX_FILE does not.
 * The one trace left: like any `git add`, git refreshes the mtime of existing loose objects it hashes again.
 * The diff runs with fixed options (no renames, no color, no external diff or textconv, a/ b/ prefixes), so the
 * guest's git config cannot change the patch's format.
 */
export async function exportWorkspace(
  exec: GuestExec,
  opts: ExportOptions,
  ctx: { signal?: AbortSignal; runner?: Runner } = {},
): Promise<WorkspaceExportResult> {
  const what = 'workspace export';
  if (typeof opts.guestPath !== 'string' || !opts.guestPath.startsWith('/') || CONTROL_RE.test(opts.guestPath)) {
    throw new BangerError('usage', `guest path ${JSON.stringify(opts.guestPath)} is not an absolute path`);
  }
  const guestPath = normalizeAbsolute(opts.guestPath);
  const base = opts.baseCommit === undefined || opts.baseCommit === '' ? '' : validateRevision(opts.baseCommit, 'base commit');
  const r = await execGuest(exec, what, guestCommand(EXPORT_SCRIPT, [guestPath, base]), { signal: ctx.signal });
  if (r.exitCode === 3) {
    throw new BangerError('not_found', `${what}: ${tail(r.stderr, 1)}`, 'prepare a workspace there first, or pass the right --guest-path');
  }
  if (r.exitCode === 4) {
    throw new BangerError('usage', `${what}: ${tail(r.stderr, 1)}`, 'give a commit that exists in the guest repository (the prepare result has baseCommit)');
  }
  if (r.exitCode !== 0) throw guestStepError(what, r);
  const { sha, names, patch } = parseExport(r.stdout);
  return {
    guestPath,
    baseCommit: sha,
    patch,
    changedFiles: splitNul(names).map((b) => b.toString('utf8')),
    hasChanges: patch.length > 0,
  };
}

/** `BANGER-EXPORT 1 <sha> <n>\n` + n bytes of NUL-terminated names + the patch bytes. Anything before the header
 * (a shell rc file that prints) is skipped. */
function parseExport(out: Buffer): { sha: string; names: Buffer; patch: Buffer } {
  const at = out.indexOf('BANGER-EXPORT 1 ');
  const nl = at < 0 ? -1 : out.indexOf(10, at);
  const m = nl < 0 ? null : /^BANGER-EXPORT 1 ([0-9a-f]{40,64}) (\d+)$/.exec(out.subarray(at, nl).toString('latin1'));
  if (!m) throw new BangerError('host', 'workspace export: the guest sent no export header (unexpected output)');
  const n = Number(m[2]);
  const start = nl + 1;
  if (start + n > out.length) throw new BangerError('host', 'workspace export: the guest output was cut short');
  return { sha: m[1], names: out.subarray(start, start + n), patch: Buffer.from(out.subarray(start + n)) };
}

// ---------------------------------------------------------------------------------------------------------
// export to a file, bounded

export interface ExportToFileOptions extends ExportOptions {
  /** Absolute path of the patch file; written whole or not at all (a temp file next to it, then rename). */
  outputPath: string;
  /** More patch bytes than this is a PatchTooLarge error (config maxPatchBytes). */
  maxBytes: number;
  /** The whole export, guest command included (config exportTimeoutMs). */
  timeoutMs: number;
  /** Where the patch is written before the rename (default partialPathFor(outputPath)). */
  tempPath?: string;
}

/** A fresh temp name next to the output: `.<name>.<12 hex>.partial`, in the same directory so the rename is atomic. */
export function partialPathFor(outputPath: string): string {
  return join(dirname(outputPath), `.${basename(outputPath)}.${randomBytes(6).toString('hex')}.partial`);
}

export interface WorkspaceFileExportResult extends Omit<WorkspaceExportResult, 'patch'> {
  outputPath: string;
  patchBytes: number;
}

/** The patch was bigger than the cap: nothing was written. */
export function patchTooLargeError(maxBytes: number): BangerError {
  return new BangerError(
    'conflict',
    `PatchTooLarge: the patch is larger than maxPatchBytes (${maxBytes} bytes); nothing was written`,
    'raise maxPatchBytes in $BANGER_HOME/config.json, or export less (commit or remove large generated files in the guest)',
  );
}

/**
 * exportWorkspace's patch, streamed from the guest into `outputPath` under a byte cap and a timeout: the daemon
 * holds one chunk at a time (the ssh channel waits for each file write), never the patch. Over the cap or past
 * the deadline the guest command is aborted, the temp file removed, and the output path left as it was.
 */
export async function exportWorkspaceToFile(
  exec: GuestExec,
  opts: ExportToFileOptions,
  ctx: { signal?: AbortSignal } = {},
): Promise<WorkspaceFileExportResult> {
  const what = 'workspace export';
  if (typeof opts.guestPath !== 'string' || !opts.guestPath.startsWith('/') || CONTROL_RE.test(opts.guestPath)) {
    throw new BangerError('usage', `guest path ${JSON.stringify(opts.guestPath)} is not an absolute path`);
  }
  if (!isAbsolute(opts.outputPath)) throw new BangerError('usage', `the output path ${JSON.stringify(opts.outputPath)} is not absolute`);
  const guestPath = normalizeAbsolute(opts.guestPath);
  const base = opts.baseCommit === undefined || opts.baseCommit === '' ? '' : validateRevision(opts.baseCommit, 'base commit');
  const temp = opts.tempPath ?? partialPathFor(opts.outputPath);
  const file = await open(temp, 'wx', 0o600).catch((e: NodeJS.ErrnoException) => {
    throw new BangerError('usage', `cannot write the patch next to ${opts.outputPath}: ${e.message}`, 'give an output path in a directory you can write to');
  });
  const abort = new AbortController();
  const stop = (why: BangerError) => abort.signal.aborted || abort.abort(why);
  const onOuterAbort = () => stop(abortError(ctx.signal, what));
  if (ctx.signal?.aborted) onOuterAbort();
  ctx.signal?.addEventListener('abort', onOuterAbort, { once: true });
  const timer = setTimeout(() => stop(new BangerError('timeout', `${what} did not finish within ${opts.timeoutMs} ms; nothing was written`,
    'raise exportTimeoutMs in $BANGER_HOME/config.json')), opts.timeoutMs);
  const sink = exportSink(file, opts.maxBytes, stop);
  const stderr = tailSink(64 * 1024);
  let done = false;
  try {
    const r = await execGuest(exec, what, guestCommand(EXPORT_SCRIPT, [guestPath, base]), { signal: abort.signal, stdout: sink.stream, stderr: stderr.stream })
      .catch((e) => { throw abort.signal.aborted ? abort.signal.reason : e; });
    await sink.finish();
    if (abort.signal.aborted) throw abort.signal.reason;
    checkExportExit(what, { ...r, stderr: Buffer.concat([r.stderr, stderr.text()]) });
    const { sha, names } = sink.parsed();
    await file.close();
    await rename(temp, opts.outputPath);
    done = true;
    const changedFiles = splitNul(names).map((b) => b.toString('utf8'));
    return { guestPath, baseCommit: sha, changedFiles, hasChanges: sink.patchBytes() > 0, outputPath: opts.outputPath, patchBytes: sink.patchBytes() };
  } finally {
    clearTimeout(timer);
    ctx.signal?.removeEventListener('abort', onOuterAbort);
    if (!done) {
      sink.stream.destroy();
      await file.close().catch(() => {});
      await unlink(temp).catch(() => {});
    }
  }
}

function checkExportExit(what: string, r: GuestExecResult): void {
  if (r.exitCode === 3) {
    throw new BangerError('not_found', `${what}: ${tail(r.stderr, 1)}`, 'prepare a workspace there first, or pass the right --guest-path');
  }
  if (r.exitCode === 4) {
    throw new BangerError('usage', `${what}: ${tail(r.stderr, 1)}`, 'give a commit that exists in the guest repository (the prepare result has baseCommit)');
  }
  if (r.exitCode !== 0) throw guestStepError(what, r);
}

/** Keeps only the last `max` bytes written (a guest's stderr is never held whole). */
function tailSink(max: number) {
  let buf = Buffer.alloc(0);
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      buf = Buffer.concat([buf, chunk]);
      if (buf.length > max) buf = buf.subarray(buf.length - max);
      cb();
    },
  });
  return { stream, text: () => buf };
}

const MAX_HEADER_SEARCH = 64 * 1024;

/**
 * Parses the framed export output (see parseExport) as it arrives: the header and the names are kept (names
 * longer than the cap are refused too), the patch goes to `file`, one chunk at a time, each write awaited.
 * A failure (over the cap, bad framing, a write error) goes to `onFail` once; later output is then discarded, so
 * the channel always drains.
 */
function exportSink(file: import('node:fs/promises').FileHandle, maxBytes: number, onFail: (e: BangerError) => void) {
  let pending = Buffer.alloc(0); // before and inside the header
  let header: { sha: string; n: number } | undefined;
  const names: Buffer[] = [];
  let namesLeft = 0;
  let patch = 0;
  let failed = false;
  const writePatch = async (b: Buffer) => {
    if (b.length === 0) return;
    if (patch + b.length > maxBytes) throw patchTooLargeError(maxBytes);
    patch += b.length;
    await file.write(b);
  };
  const take = async (chunk: Buffer) => {
    if (!header) {
      pending = Buffer.concat([pending, chunk]);
      const at = pending.indexOf('BANGER-EXPORT 1 ');
      const nl = at < 0 ? -1 : pending.indexOf(10, at);
      if (nl < 0) {
        if (pending.length > MAX_HEADER_SEARCH) throw new BangerError('host', 'workspace export: the guest sent no export header (unexpected output)');
        return;
      }
      const m = /^BANGER-EXPORT 1 ([0-9a-f]{40,64}) (\d+)$/.exec(pending.subarray(at, nl).toString('latin1'));
      if (!m) throw new BangerError('host', 'workspace export: the guest sent a malformed export header');
      header = { sha: m[1], n: Number(m[2]) };
      if (header.n > maxBytes) throw patchTooLargeError(maxBytes);
      namesLeft = header.n;
      chunk = pending.subarray(nl + 1);
      pending = Buffer.alloc(0);
    }
    if (namesLeft > 0) {
      const part = chunk.subarray(0, namesLeft);
      names.push(Buffer.from(part));
      namesLeft -= part.length;
      chunk = chunk.subarray(part.length);
    }
    await writePatch(chunk);
  };
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      if (failed) return cb();
      take(chunk).then(
        () => cb(),
        (e: unknown) => {
          failed = true;
          onFail(e instanceof BangerError ? e : new BangerError('host', `workspace export: writing the patch failed: ${errorMessage(e)}`));
          cb();
        },
      );
    },
  });
  stream.on('error', () => {});
  return {
    stream,
    finish: () => new Promise<void>((res, rej) => {
      if (stream.destroyed) return res();
      stream.end(() => res());
      stream.once('error', rej);
    }),
    parsed() {
      if (!header) throw new BangerError('host', 'workspace export: the guest sent no export header (unexpected output)');
      if (namesLeft > 0) throw new BangerError('host', 'workspace export: the guest output was cut short');
      return { sha: header.sha, names: Buffer.concat(names) };
    },
    patchBytes: () => patch,
  };
}
