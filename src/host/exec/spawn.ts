/**
 * Long-lived and interactive child processes (the runner in runner.ts is for commands that run to completion).
 * Kept here so that src/host stays the only place that starts processes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { BangerError } from '../../errors.js';

export interface DetachedOptions {
  /** A file descriptor for stdout and stderr (e.g. an opened log file); default ignore. */
  logFd?: number;
  /** Called with each stderr line instead of writing stderr to logFd. */
  onStderrLine?: (line: string) => void;
  env?: NodeJS.ProcessEnv;
}

export interface Detached {
  pid: number;
  child: ChildProcess;
  /** Resolves with the exit code (or 1 for a signal) when the process ends. */
  exited: Promise<number>;
  isRunning(): boolean;
}

/** Start a process that outlives us (its own process group, unref'd). */
export function spawnDetached(file: string, args: readonly string[], opts: DetachedOptions = {}): Detached {
  const out = opts.logFd ?? 'ignore';
  const child = spawn(file, args as string[], {
    detached: true,
    stdio: ['ignore', out, opts.onStderrLine ? 'pipe' : out],
    env: opts.env ?? process.env,
  });
  if (opts.onStderrLine && child.stderr) {
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d: string) => {
      for (const line of d.split('\n').filter(Boolean)) opts.onStderrLine!(line);
    });
  }
  const exited = new Promise<number>((resolve) => {
    child.once('exit', (code) => resolve(code ?? 1));
    child.once('error', () => resolve(1));
  });
  child.unref();
  return { pid: child.pid ?? -1, child, exited, isRunning: () => child.exitCode === null && child.signalCode === null };
}

/** Run a command attached to our terminal (stdin/stdout/stderr inherited); resolves with its exit status. */
export function runInteractive(file: string, args: readonly string[], hint?: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args as string[], { stdio: 'inherit' });
    child.on('error', (e) => reject(new BangerError('host', `could not run ${file}: ${e.message}`, hint)));
    child.on('exit', (code, sig) => resolve(code ?? (sig ? 128 + 15 : 1)));
  });
}
