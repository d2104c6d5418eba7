import { chmod, lstat, mkdir, mkdtemp, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BangerError } from '../../errors.js';
import { run, type Runner } from '../exec/runner.js';

/**
 * Scripting debugfs (e2fsprogs) to edit ext4 images without mounting them and without root.
 *
 * What we learned by experiment with debugfs 1.47.0 (Debian 12):
 * - Arguments may be double-quoted; inside quotes spaces, '#', '$', ';', "'", tabs and UTF-8 are literal, and a
 *   backslash is literal too (there is no escape character), so a path containing '"' or a newline cannot be
 *   expressed at all: we reject those. A command file line longer than BUFSIZ (8192) is silently split.
 * - debugfs exits 0 even when commands fail. Every failure goes to stderr, as "<cmd>: <message>"
 *   ("write: Ext2 file already exists", "mkdir: ...") or "<path>: <message>" ("nope: File not found by
 *   ext2_lookup" from `sif`), sometimes preceded by a line from the library ("ext2fs_mkdir: ...",
 *   "do_write_internal: ..."). Successful commands print nothing to stderr; stdout carries the echo of each
 *   command ("debugfs: write a b") and chatter such as "Allocated inode: 13". The only non-error stderr line is
 *   the banner "debugfs 1.47.0 (5-Feb-2023)".
 * - `mkdir` and `symlink` onto an existing name corrupt the filesystem (an inode and a block stay allocated but
 *   unlinked; the parent's link count is off). `write` onto an existing name fails cleanly, and `rm` of a missing name
 *   is harmless. So never mkdir/symlink blindly: ask existingPaths() first.
 * - `write HOST GUEST` accepts a GUEST path with directories (created in that directory, not a name containing
 *   '/'), copies the host file's permission bits, and records uid/gid 0. `mkdir` makes 0755 root:root,
 *   `symlink LINK TARGET` 0777 root:root. `write` onto an existing name fails: rm first.
 * - `rdump / DIR` dumps the root directory's contents straight into DIR (DIR must exist and be empty; an
 *   existing entry fails with "File exists") and then chmods DIR to the root inode's mode. As non-root it keeps
 *   the modes but prints "Operation not permitted while changing ownership of ..." for every entry.
 */

const BANNER_RE = /^debugfs \d[\w.~+-]* \(.*\)$/;
const MAX_LINE = 8000;

/** Quote one argument for a debugfs command line (command file or -R). */
export function debugfsQuote(arg: string): string {
  if (typeof arg !== 'string' || arg.length === 0) {
    throw new BangerError('usage', 'debugfs: empty path', 'give a non-empty path');
  }
  if (arg.includes('"') || arg.includes('\n') || arg.includes('\r') || arg.includes('\0')) {
    throw new BangerError(
      'usage',
      `path ${JSON.stringify(arg)} cannot be written into a disk image: it contains a double quote, a newline or a NUL`,
      'rename the file: debugfs cannot express such names',
    );
  }
  if (arg.length > 4000) {
    throw new BangerError('usage', `path too long for debugfs (${arg.length} characters)`, 'use a shorter path');
  }
  return `"${arg}"`;
}

/** Can this string be given to debugfs as an argument? */
export function isDebugfsSafe(arg: string): boolean {
  try {
    debugfsQuote(arg);
    return true;
  } catch {
    return false;
  }
}

const toOctal = (n: number) => '0' + n.toString(8);

export const S_IFREG = 0o100000;
export const S_IFDIR = 0o040000;
export const S_IFLNK = 0o120000;

/** Collects debugfs commands for one `debugfs -w -f` run. Guest paths are absolute or relative to the image's root. */
export class DebugfsScript {
  private readonly lines: string[] = [];
  /** stderr lines some commands are allowed to print (e.g. rm of a file that may not exist). */
  private readonly tolerated: RegExp[] = [];

  get commands(): readonly string[] {
    return this.lines;
  }
  get length(): number {
    return this.lines.length;
  }
  /** stderr patterns allowed by the commands added so far (one entry per allowed line). */
  get toleratedErrors(): readonly RegExp[] {
    return this.tolerated;
  }

  private add(line: string): this {
    if (line.length > MAX_LINE) throw new BangerError('usage', `debugfs command too long (${line.length} characters)`);
    this.lines.push(line);
    return this;
  }

  /**
   * mkdir GUEST. The name must not exist yet: debugfs 1.47.0's mkdir (and symlink) onto an existing name prints
   * "already exists" but leaves an allocated, unlinked inode and block behind (e2fsck then reports errors). Check
   * with existingPaths() first when unsure.
   */
  mkdir(guestPath: string): this {
    return this.add(`mkdir ${debugfsQuote(guestPath)}`);
  }

  /** write HOSTFILE GUEST (copies the host file's contents and permission bits). */
  write(hostFile: string, guestPath: string): this {
    return this.add(`write ${debugfsQuote(hostFile)} ${debugfsQuote(guestPath)}`);
  }

  /** symlink GUEST -> TARGET */
  symlink(guestPath: string, target: string): this {
    return this.add(`symlink ${debugfsQuote(guestPath)} ${debugfsQuote(target)}`);
  }

  /** set_inode_field GUEST FIELD VALUE; a numeric mode is written in octal (give the full mode with type bits). */
  sif(guestPath: string, field: 'mode' | 'uid' | 'gid' | 'mtime' | 'atime' | 'ctime', value: number | string): this {
    const v = typeof value === 'number' ? (field === 'mode' ? toOctal(value) : String(value)) : value;
    if (!/^[0-9A-Za-z]+$/.test(v)) throw new BangerError('usage', `bad debugfs field value ${JSON.stringify(v)}`);
    return this.add(`sif ${debugfsQuote(guestPath)} ${field} ${v}`);
  }

  /** Mode (full, with type bits) and owner in one go. */
  setAttrs(guestPath: string, mode: number, uid = 0, gid = 0): this {
    return this.sif(guestPath, 'mode', mode).sif(guestPath, 'uid', uid).sif(guestPath, 'gid', gid);
  }

  /** rm GUEST (a file or symlink). With ifExists, a missing name is not an error (its parent must exist). */
  rm(guestPath: string, opts: { ifExists?: boolean } = {}): this {
    this.add(`rm ${debugfsQuote(guestPath)}`);
    if (opts.ifExists) this.tolerated.push(/^rm: File not found by ext2_lookup while trying to resolve filename\s*$/);
    return this;
  }

  /** rmdir GUEST (must be empty). */
  rmdir(guestPath: string): this {
    return this.add(`rmdir ${debugfsQuote(guestPath)}`);
  }

  /** Replace (or create) a regular file: rm if present, write, set mode/owner. */
  replaceFile(hostFile: string, guestPath: string, mode: number, uid = 0, gid = 0): this {
    return this.rm(guestPath, { ifExists: true })
      .write(hostFile, guestPath)
      .setAttrs(guestPath, S_IFREG | (mode & 0o7777), uid, gid);
  }

  toString(): string {
    return this.lines.join('\n') + '\n';
  }
}

/** The error lines in debugfs's stderr (everything but the version banner and blank lines). */
export function parseDebugfsErrors(stderr: string): string[] {
  return stderr
    .split('\n')
    .map((l) => l.trimEnd())
    .filter((l) => l.trim() !== '' && !BANNER_RE.test(l));
}

/** runDebugfs's error: a BangerError('host') that also carries the error lines. */
export class DebugfsFailure extends BangerError {
  constructor(
    readonly errors: string[],
    message: string,
    hint?: string,
  ) {
    super('host', message, hint);
  }
}

/** Remove from `errors` one line per tolerated pattern (each pattern forgives at most one line). */
function withoutTolerated(errors: string[], tolerated: readonly RegExp[]): string[] {
  const budget = [...tolerated];
  const left: string[] = [];
  for (const line of errors) {
    const i = budget.findIndex((re) => re.test(line));
    if (i >= 0) budget.splice(i, 1);
    else left.push(line);
  }
  return left;
}

export interface DebugfsRunOptions {
  runner?: Runner;
  signal?: AbortSignal;
  /** Open read-write (default true). */
  write?: boolean;
  /** stderr lines to ignore in addition to the script's own tolerated ones. */
  ignore?: RegExp[];
}

/**
 * Run a whole script with one `debugfs -w -f CMDFILE IMAGE`. Throws a BangerError('host') listing the error
 * lines if any command failed (debugfs itself exits 0 in that case).
 */
export async function runDebugfs(
  image: string,
  commands: DebugfsScript | readonly string[],
  opts: DebugfsRunOptions = {},
): Promise<{ stdout: string; stderr: string; ms: number }> {
  const runner = opts.runner ?? run;
  const script = commands instanceof DebugfsScript ? commands : undefined;
  const lines: readonly string[] = script ? script.commands : (commands as readonly string[]);
  const tolerated = [...(script?.toleratedErrors ?? []), ...(opts.ignore ?? [])];
  const t0 = performance.now();
  const dir = await mkdtemp(join(tmpdir(), 'banger-debugfs-'));
  try {
    const cmdFile = join(dir, 'commands');
    await writeFile(cmdFile, lines.join('\n') + '\n', { mode: 0o600 });
    const args = [...(opts.write === false ? [] : ['-w']), '-f', cmdFile, image];
    const r = await runner('debugfs', args, { signal: opts.signal, reject: false });
    const errors = withoutTolerated(parseDebugfsErrors(r.stderr), tolerated);
    if (r.exitCode !== 0 || errors.length > 0) {
      const shown = errors.slice(0, 12).join('\n');
      throw new DebugfsFailure(
        errors,
        `debugfs on ${image} failed${r.exitCode !== 0 ? ` (exit ${r.exitCode})` : ''}: ${shown || r.stderr.trim()}` +
          (errors.length > 12 ? `\n(and ${errors.length - 12} more)` : ''),
        'the disk image may be damaged or not ext2/3/4; check it with e2fsck -fn',
      );
    }
    return { stdout: r.stdout, stderr: r.stderr, ms: performance.now() - t0 };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Run one read-only request (`debugfs -R REQUEST IMAGE`); returns stdout and the error lines. */
export async function debugfsRequest(
  image: string,
  request: string,
  opts: { runner?: Runner; signal?: AbortSignal } = {},
): Promise<{ stdout: string; errors: string[] }> {
  const runner = opts.runner ?? run;
  const r = await runner('debugfs', ['-R', request, image], { signal: opts.signal, reject: false });
  const errors = parseDebugfsErrors(r.stderr);
  if (r.exitCode !== 0) errors.push(`debugfs exited ${r.exitCode}`);
  return { stdout: r.stdout, errors };
}

const NOT_FOUND_RE = /File not found by ext2_lookup/;

/**
 * Which of these guest paths exist in the image (one read-only debugfs run of `stat` commands; a missing path
 * makes debugfs print "<path>: File not found by ext2_lookup", or "...: Ext2 inode is not a directory" when a
 * parent is a file).
 */
export async function existingPaths(
  image: string,
  guestPaths: readonly string[],
  opts: { runner?: Runner; signal?: AbortSignal } = {},
): Promise<Set<string>> {
  if (guestPaths.length === 0) return new Set();
  const missing = new Set<string>();
  const lines = guestPaths.map((p) => `stat ${debugfsQuote(p)}`);
  const missingRe = /: (File not found by ext2_lookup|Ext2 inode is not a directory)\s*$/;
  const errors: string[] = [];
  try {
    await runDebugfs(image, lines, { ...opts, write: false });
  } catch (e) {
    if (!(e instanceof DebugfsFailure)) throw e;
    errors.push(...e.errors);
  }
  for (const l of errors) {
    const m = missingRe.exec(l);
    const p = m ? guestPaths.find((g) => l.startsWith(`${g}: `)) : undefined;
    if (!p) throw new BangerError('host', `debugfs could not inspect ${image}: ${l}`, 'check the image with e2fsck -fn');
    missing.add(p);
  }
  return new Set(guestPaths.filter((p) => !missing.has(p)));
}
const CHOWN_RE = /Operation not permitted while changing ownership of /;

/**
 * Dump a directory of an image into hostDir (which must be empty or absent) with `rdump`. The directory's contents
 * land directly in hostDir. Returns false if guestDir does not exist in the image.
 */
export async function rdumpDir(
  image: string,
  guestDir: string,
  hostDir: string,
  opts: { runner?: Runner; signal?: AbortSignal } = {},
): Promise<boolean> {
  await mkdir(hostDir, { recursive: true });
  if ((await readdir(hostDir)).length > 0) throw new BangerError('internal', `rdump target ${hostDir} is not empty`);
  // rdump of "/x" creates hostDir/x; rdump of "/" dumps the contents directly. Use a staging dir for the former.
  const norm = '/' + guestDir.split('/').filter(Boolean).join('/');
  const target = norm === '/' ? hostDir : await mkdtemp(join(hostDir, '.rdump-'));
  try {
    const { errors } = await debugfsRequest(image, `rdump ${debugfsQuote(norm)} ${debugfsQuote(target)}`, opts);
    const real = errors.filter((l) => !CHOWN_RE.test(l));
    if (real.some((l) => NOT_FOUND_RE.test(l))) return false;
    if (real.length > 0) {
      throw new BangerError('host', `debugfs rdump ${norm} from ${image} failed: ${real.slice(0, 8).join('\n')}`);
    }
    if (norm !== '/') {
      const base = norm.slice(norm.lastIndexOf('/') + 1);
      const dumped = join(target, base);
      const st = await lstat(dumped).catch(() => undefined);
      if (!st) return false;
      if (!st.isDirectory()) throw new BangerError('usage', `${norm} in ${image} is not a directory`);
      // Move the dumped directory's entries up into hostDir.
      for (const e of await readdir(dumped)) await rename(join(dumped, e), join(hostDir, e));
      await chmod(hostDir, st.mode & 0o7777);
    }
    return true;
  } finally {
    if (norm !== '/') await rm(target, { recursive: true, force: true });
  }
}

export interface DiskStat {
  type: 'regular' | 'directory' | 'symlink' | 'other';
  /** Permission bits only (e.g. 0o600). */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Target of a fast symlink (one short enough to live in the inode, under 60 bytes). */
  target?: string;
}

/** `debugfs -R 'stat PATH'`, parsed; undefined if the path does not exist. */
export async function debugfsStat(
  image: string,
  guestPath: string,
  opts: { runner?: Runner; signal?: AbortSignal } = {},
): Promise<DiskStat | undefined> {
  const { stdout, errors } = await debugfsRequest(image, `stat ${debugfsQuote(guestPath)}`, opts);
  if (errors.some((l) => NOT_FOUND_RE.test(l))) return undefined;
  if (errors.length > 0) throw new BangerError('host', `debugfs stat ${guestPath} on ${image} failed: ${errors.join('\n')}`);
  const m = /Type:\s+(\S+)\s+Mode:\s+(\d+)/.exec(stdout);
  const u = /User:\s+(\d+)\s+Group:\s+(\d+)/.exec(stdout);
  const s = /Size:\s+(\d+)/.exec(stdout);
  if (!m || !u || !s) throw new BangerError('host', `unexpected debugfs stat output for ${guestPath}: ${stdout.slice(0, 200)}`);
  const t = m[1];
  return {
    type: t === 'regular' || t === 'directory' || t === 'symlink' ? t : 'other',
    mode: parseInt(m[2], 8),
    uid: Number(u[1]),
    gid: Number(u[2]),
    size: Number(s[1]),
    target: /Fast link dest: "(.*)"\s*$/m.exec(stdout)?.[1],
  };
}
