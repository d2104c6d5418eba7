import { execa, type Options as ExecaOptions } from 'execa';
import { BangerError } from '../../errors.js';

/**
 * The one way banger starts a child process. Takes an AbortSignal (stopping an actor stops its commands)
 * and puts the command's stderr into the error it throws. Tests may hand in another Runner.
 */
export interface RunOptions {
  signal?: AbortSignal;
  input?: string | Buffer;
  env?: Record<string, string | undefined>;
  cwd?: string;
  timeoutMs?: number;
  /** Return the result instead of throwing on a non-zero exit. */
  reject?: boolean;
  encoding?: 'utf8' | 'buffer';
}

export interface RunResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  stdoutBuffer?: Buffer;
}

export type Runner = (file: string, args: readonly string[], opts?: RunOptions) => Promise<RunResult>;

export class CommandError extends BangerError {
  constructor(
    readonly command: string,
    readonly exitCode_: number | undefined,
    readonly stderr: string,
    message?: string,
  ) {
    const tail = stderr.trim().split('\n').slice(-8).join('\n');
    super('host', message ?? `${command} failed${exitCode_ !== undefined ? ` (exit ${exitCode_})` : ''}${tail ? `: ${tail}` : ''}`);
  }
}

export const run: Runner = async (file, args, opts = {}) => {
  const options: ExecaOptions = {
    cancelSignal: opts.signal,
    input: opts.input,
    env: opts.env,
    extendEnv: true,
    cwd: opts.cwd,
    timeout: opts.timeoutMs,
    reject: false,
    stripFinalNewline: false,
    encoding: opts.encoding === 'buffer' ? 'buffer' : 'utf8',
    stdin: opts.input === undefined ? 'ignore' : 'pipe',
  };
  let r;
  try {
    r = await execa(file, args as string[], options);
  } catch (e) {
    throw new CommandError(file, undefined, '', `${file} could not be started: ${(e as Error).message}`);
  }
  // With encoding 'buffer', execa returns Uint8Arrays (not Buffers).
  const asBuf = (x: unknown) => (x instanceof Uint8Array ? Buffer.from(x.buffer, x.byteOffset, x.byteLength) : undefined);
  const stderr = asBuf(r.stderr)?.toString('utf8') ?? String(r.stderr ?? '');
  const stdoutBuffer = asBuf(r.stdout);
  const stdout = stdoutBuffer ? stdoutBuffer.toString('utf8') : String(r.stdout ?? '');
  const cmd = [file, ...args.slice(0, 3)].join(' ');
  if (r.isCanceled) throw new BangerError('aborted', `${cmd}: aborted`);
  if (r.timedOut) throw new CommandError(cmd, undefined, stderr, `${cmd} timed out after ${opts.timeoutMs} ms`);
  if ((r as { failed?: boolean }).failed && r.exitCode === undefined) {
    throw new CommandError(cmd, undefined, stderr, `${cmd} could not be started: ${(r as { shortMessage?: string }).shortMessage ?? 'unknown error'}`);
  }
  const exitCode = r.exitCode ?? 1;
  if (exitCode !== 0 && opts.reject !== false) throw new CommandError(cmd, exitCode, stderr);
  return { exitCode, stdout, stderr, stdoutBuffer };
};

/** Is a command on PATH? */
export async function which(cmd: string, runner: Runner = run): Promise<string | undefined> {
  const paths = (process.env.PATH ?? '').split(':').concat(['/usr/sbin', '/sbin']);
  const { access, constants } = await import('node:fs/promises');
  for (const p of paths) {
    if (!p) continue;
    const full = `${p}/${cmd}`;
    try {
      await access(full, constants.X_OK);
      return full;
    } catch {
      /* next */
    }
  }
  void runner;
  return undefined;
}
