/** Connects to the owner daemon through the library client (src/index.ts), starting the daemon when its socket is absent. */
import { mkdirSync, openSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BangerError } from '../errors.js';
import { layout, type Layout } from '../paths.js';
import { connect, type BangerClient } from '../index.js';

export const BIN = fileURLToPath(new URL('../../bin/banger.js', import.meta.url));

export async function tryConnect(l: Layout): Promise<BangerClient | undefined> {
  try {
    return await connect({ socket: l.socket, timeoutMs: 3000 });
  } catch {
    return undefined;
  }
}

/** Start the daemon in the background; resolve once its socket answers (bounded). */
export async function spawnDaemon(l: Layout, opts: { timeoutMs?: number; inspectPort?: number } = {}): Promise<number> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const inspect = opts.inspectPort === undefined ? [] : ['--inspect', String(opts.inspectPort)];
  mkdirSync(l.home, { recursive: true, mode: 0o700 });
  const out = openSync(l.logFile, 'a');
  const { spawnDetached } = await import('../host/exec/spawn.js'); // only when a daemon has to be started
  const child = spawnDetached(process.execPath, [BIN, 'daemon', 'start', '--foreground', ...inspect], { logFd: out });
  const pid = child.pid;
  let exited: number | null = null;
  void child.exited.then((code) => (exited = code));
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const c = await tryConnect(l);
    if (!c && exited !== null) {
      // Another CLI may have started a daemon at the same moment (ours then exits on the lock): give it a moment.
      await new Promise((r) => setTimeout(r, 300));
      const again = await tryConnect(l);
      if (again) {
        again.close();
        return pid;
      }
      if (Date.now() > deadline - timeoutMs + 5000) throw new BangerError('host', `the banger daemon exited at start (code ${exited})`, `see ${l.logFile}`);
      continue;
    }
    if (c) {
      c.close();
      return pid;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new BangerError('timeout', `the banger daemon did not answer on ${l.socket} within ${timeoutMs / 1000} s`, `see ${l.logFile}`);
}

export async function connectDaemon(autoStart = true): Promise<BangerClient> {
  const l = layout();
  const c = await tryConnect(l);
  if (c) return c;
  if (!autoStart) throw new BangerError('host', `the banger daemon is not running (no answer on ${l.socket})`, 'banger daemon start');
  await spawnDaemon(l);
  const c2 = await tryConnect(l);
  if (!c2) throw new BangerError('host', `the banger daemon started but its socket ${l.socket} does not answer`, `see ${l.logFile}`);
  return c2;
}
