/**
 * Long-lived and interactive child processes (the runner in runner.ts is for commands that run to completion).
 * Kept here so that src/host stays the only place that starts processes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import { BangerError } from '../../errors.js';

export interface DetachedOptions {
  /** A file descriptor for stdout (and stderr, unless stderrFd or onStderrLine is given); default ignore. */
  logFd?: number;
  /** A file descriptor for stderr alone (e.g. a VMM's log while stdout is the guest console). */
  stderrFd?: number;
  /** Called with each stderr line instead of writing stderr to logFd. */
  onStderrLine?: (line: string) => void;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** File descriptors the child gets as its fds 3, 4, … (e.g. a FIFO end it watches). */
  extraFds?: readonly number[];
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface Detached {
  pid: number;
  child: ChildProcess;
  /** Resolves with the exit code (or 1 for a signal) when the process ends. */
  exited: Promise<number>;
  /** Resolves with how the process ended (code or signal; both null when it could not start). */
  exitStatus: Promise<ExitStatus>;
  /** Resolves once the process runs; rejects when it could not be started (e.g. no such file). */
  started: Promise<void>;
  isRunning(): boolean;
}

/** Start a process that outlives us (its own process group, unref'd). */
export function spawnDetached(file: string, args: readonly string[], opts: DetachedOptions = {}): Detached {
  const out = opts.logFd ?? 'ignore';
  const err = opts.onStderrLine ? 'pipe' : (opts.stderrFd ?? out);
  const child = spawn(file, args as string[], { detached: true, stdio: ['ignore', out, err, ...(opts.extraFds ?? [])], env: opts.env ?? process.env, cwd: opts.cwd });
  if (opts.onStderrLine && child.stderr) {
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d: string) => {
      for (const line of d.split('\n').filter(Boolean)) opts.onStderrLine!(line);
    });
  }
  const exitStatus = new Promise<ExitStatus>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', () => resolve({ code: null, signal: null }));
  });
  const started = new Promise<void>((resolve, reject) => {
    child.once('spawn', () => resolve());
    child.once('error', (e) => reject(new BangerError('host', `cannot start ${file}: ${e.message}`, undefined, { cause: e })));
  });
  started.catch(() => {}); // a caller that does not wait for the start learns of a failure through exited
  const exited = exitStatus.then(({ code }) => code ?? 1);
  child.unref();
  return { pid: child.pid ?? -1, child, exited, exitStatus, started, isRunning: () => child.exitCode === null && child.signalCode === null };
}

/** Run a command attached to our terminal (stdin/stdout/stderr inherited); resolves with its exit status. */
export function runInteractive(file: string, args: readonly string[], hint?: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args as string[], { stdio: 'inherit' });
    child.on('error', (e) => reject(new BangerError('host', `could not run ${file}: ${e.message}`, hint)));
    child.on('exit', (code, sig) => resolve(code ?? (sig ? 128 + 15 : 1)));
  });
}

/**
 * Runs a command to completion with these stdin and stdout: a socket or file descriptor is handed to the child, not
 * copied through this process (a stream that size took a core here). Resolves on exit 0; else throws with `what`
 * and the end of its stderr.
 */
export async function runHandingOver(
  file: string,
  args: readonly string[],
  io: { stdin: Socket | 'ignore'; stdout: Socket | number },
  what: string,
): Promise<void> {
  const child = spawn(file, args, { stdio: [io.stdin, io.stdout, 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-2000)));
  const code = await new Promise<number | null>((res, rej) => child.once('error', rej).once('close', res));
  if (code !== 0) throw new BangerError('host', `${what} failed (${file} exit ${code}): ${stderr.trim()}`);
}
