/**
 * A "guest" that is this host: GuestExec runs `sh -c command` locally, stdin piped, stdout/stderr streamed to the
 * caller's writables when given (with backpressure, as ssh2 does) or collected. Abort kills the process group.
 */
import { spawn } from 'node:child_process';
import type { Readable } from 'node:stream';
import type { GuestExec } from '../../src/host/guest/workspace.js';

export function streamingLocalGuest(): GuestExec {
  return (command, opts = {}) =>
    new Promise((resolve, reject) => {
      const { signal } = opts;
      if (signal?.aborted) return reject(new Error('aborted before start'));
      const child = spawn('sh', ['-c', command], { detached: true, stdio: ['pipe', 'pipe', 'pipe'] });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      if (opts.stdout) child.stdout.pipe(opts.stdout as NodeJS.WritableStream, { end: false });
      else child.stdout.on('data', (b: Buffer) => out.push(b));
      if (opts.stderr) child.stderr.pipe(opts.stderr as NodeJS.WritableStream, { end: false });
      else child.stderr.on('data', (b: Buffer) => err.push(b));
      child.stdin.on('error', () => {});
      const stdin = opts.stdin;
      if (stdin === undefined) child.stdin.end();
      else if (typeof stdin === 'string' || Buffer.isBuffer(stdin)) child.stdin.end(stdin);
      else (stdin as Readable).pipe(child.stdin);
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
        if (signal?.aborted) return reject(new Error('guest command aborted'));
        resolve({ exitCode: code ?? (sig ? 128 : 1), stdout: Buffer.concat(out), stderr: Buffer.concat(err) });
      });
    });
}
