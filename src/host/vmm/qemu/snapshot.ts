/**
 * QEMU snapshots: a running guest's memory and device state saved to a file while its disks are frozen as qcow2
 * layers at the same instant, and a new QEMU started from that file (`-incoming defer`).
 *
 * Saving, with the guest paused (`stop`) from first to last:
 *  1. the disks: one QMP `transaction` of `blockdev-snapshot-sync` for root and work puts a new, empty qcow2
 *     overlay on top of each; the files the guest wrote until now become read-only backing files (the frozen
 *     layers). The guest goes on writing into the new overlays.
 *  2. the state: `migrate` to a Unix socket this process listens on; the connection goes to a `cat` into the
 *     state file. No shell (`exec:`, see below) and no fd passing to QEMU; QEMU 7.2 has no `file:` migration.
 *  3. `cont` (the guest runs on, on its new layers) or `quit`.
 * Restoring: QEMU is launched with the same machine and devices plus `-incoming defer`; `migrate-incoming` to a
 * Unix socket QEMU listens on, and a `cat` of the state file writes into it. The guest runs when it is loaded.
 * (Not `exec:` either way: QEMU 7.2 SIGTERMs the command as soon as it closes the pipe, which could cut a
 * `cat > file` short, and a pipe moves the stream in 64 KiB turns between two processes.)
 */
import { open, rm, stat } from 'node:fs/promises';
import { createConnection, createServer, type Socket } from 'node:net';
import { BangerError, errorMessage } from '../../../errors.js';
import { checkSocketPath, sleep } from '../../exec/wait.js';
import { runHandingOver } from '../../exec/spawn.js';
import type { VmmProcess } from '../driver.js';
import { QmpClient } from './qmp.js';

/** The top file of each of a VM's disks, with its format. */
export interface DiskLayer {
  file: string;
  format: 'raw' | 'qcow2';
}
export interface DiskLayers {
  root: DiskLayer;
  work: DiskLayer;
}

export interface SaveStateOptions {
  stateFile: string;
  /** A Unix socket path this process listens on for QEMU's migration stream (removed afterwards). */
  migSocket: string;
  /** The new overlays the guest goes on writing into (qcow2, created by QEMU; must not exist yet). */
  newLayers: { root: string; work: string };
  /** Called once the disks are frozen, the guest still paused: the frozen layers (record the new ones now). */
  onFrozen: (frozen: DiskLayers) => Promise<void>;
  after: 'resume' | 'quit';
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface SaveStateResult {
  frozen: DiskLayers;
  stateBytes: number;
  /** Milliseconds per phase: pause, freeze, migrate, resume. */
  timings: Record<string, number>;
}

/** Pause, freeze both disks as layers, save memory and devices to a file, then resume or quit. */
export async function saveQemuState(proc: VmmProcess, opts: SaveStateOptions): Promise<SaveStateResult> {
  const timings: Record<string, number> = {};
  const timed = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    const t0 = performance.now();
    try {
      return await fn();
    } finally {
      timings[name] = Math.round(performance.now() - t0);
    }
  };
  const qmp = await QmpClient.connect(proc.qmpSocket, { timeoutMs: 5000, signal: opts.signal });
  let finished = false;
  try {
    await timed('pause', () => qmp.execute('stop', undefined, { timeoutMs: 10_000 }));
    const frozen = await timed('freeze', async () => {
      const layers = await currentLayers(qmp);
      await qmp.execute('transaction', {
        actions: (['root', 'work'] as const).map((device) => ({
          type: 'blockdev-snapshot-sync',
          data: { device, 'snapshot-file': opts.newLayers[device], format: 'qcow2', mode: 'absolute-paths' },
        })),
      }, { timeoutMs: 30_000 });
      await opts.onFrozen(layers);
      return layers;
    });
    await timed('migrate', () => migrateToFile(qmp, opts));
    const stateBytes = (await stat(opts.stateFile)).size;
    await timed(opts.after === 'resume' ? 'resume' : 'quit', () => qmp.execute(opts.after === 'resume' ? 'cont' : 'quit', undefined, { timeoutMs: 10_000 }));
    finished = true;
    return { frozen, stateBytes, timings };
  } finally {
    // A failure half-way must not leave the guest paused: it runs on (on whatever layers it has now).
    if (!finished && qmp.isOpen) await qmp.execute('cont', undefined, { timeoutMs: 5000 }).catch(() => undefined);
    qmp.close();
  }
}

/** The top file and format of the root and work drives, as QEMU has them open now. */
async function currentLayers(qmp: QmpClient): Promise<DiskLayers> {
  const blocks = await qmp.execute<Array<{ device: string; inserted?: { file: string; drv: string } }>>('query-block', undefined, { timeoutMs: 5000 });
  const layer = (device: string): DiskLayer => {
    const b = blocks.find((x) => x.device === device)?.inserted;
    if (!b) throw new BangerError('host', `QEMU has no ${device} drive (query-block)`);
    if (b.drv !== 'raw' && b.drv !== 'qcow2') throw new BangerError('host', `the ${device} drive is ${b.drv}, not raw or qcow2`);
    return { file: b.file, format: b.drv };
  };
  return { root: layer('root'), work: layer('work') };
}

/**
 * `migrate` to a Unix socket we listen on; the connection is handed, unread, to a `cat` whose stdout is the state
 * file, so the stream never passes through this process (copied here, it took a core). Resolves when QEMU says
 * completed and cat has written everything.
 */
async function migrateToFile(qmp: QmpClient, opts: SaveStateOptions): Promise<void> {
  const sock = checkSocketPath(opts.migSocket);
  await rm(sock, { force: true });
  // pauseOnConnect: nothing of the stream is read here before cat has the socket.
  const server = createServer({ pauseOnConnect: true });
  try {
    const written = new Promise<void>((resolve, reject) => {
      server.once('connection', (conn) => {
        server.close();
        catInto(conn, opts.stateFile).then(resolve, reject);
      });
      server.once('error', reject);
    });
    written.catch(() => undefined); // awaited below, after the migration; a rejection meanwhile is not unhandled
    await new Promise<void>((res, rej) => server.listen(sock, res).once('error', rej));
    // The default bandwidth cap (128 MiB/s in 7.2) only slows a local file down.
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 2 ** 30 }, { timeoutMs: 5000 });
    await qmp.execute('migrate', { uri: `unix:${sock}` }, { timeoutMs: 10_000 });
    await waitMigration(qmp, opts.timeoutMs ?? 300_000, opts.signal);
    await written;
  } finally {
    server.close();
    await rm(sock, { force: true });
  }
}

/** `cat` from the connection (its stdin) into a new file (its stdout, mode 0600). */
async function catInto(conn: Socket, file: string): Promise<void> {
  const out = await open(file, 'w', 0o600);
  try {
    const done = runHandingOver('cat', [], { stdin: conn, stdout: out.fd }, `writing the snapshot's state to ${file}`);
    conn.destroy(); // cat has its own copy of the socket
    await done;
  } finally {
    await out.close();
  }
}

/** Polls query-migrate until 'completed'; 'failed' or 'cancelled' throws with QEMU's reason. */
async function waitMigration(qmp: QmpClient, timeoutMs: number, signal?: AbortSignal): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const st = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate', undefined, { timeoutMs: 5000 });
    if (st.status === 'completed') return;
    if (st.status === 'failed' || st.status === 'cancelled') {
      throw new BangerError('host', `QEMU migration ${st.status}${st['error-desc'] ? `: ${st['error-desc']}` : ''}`);
    }
    if (Date.now() > deadline) throw new BangerError('timeout', `QEMU migration did not complete within ${Math.round(timeoutMs / 1000)} s (status ${st.status ?? 'none'})`);
    await sleep(50, signal);
  }
}

/**
 * Loads a saved state into a QEMU started with `-incoming defer`: QEMU listens on `migSocket`, and a `cat` of the
 * state file writes into the connection (the stream never passes through this process, where it took a core; a
 * pipe, QEMU's `exec:`, moved it in 64 KiB turns between cat and QEMU, which a busy machine made 5× slower). The
 * guest runs once QEMU has it all.
 */
export async function loadQemuState(proc: VmmProcess, opts: { stateFile: string; migSocket: string; timeoutMs?: number; signal?: AbortSignal }): Promise<void> {
  await stat(opts.stateFile).catch(() => {
    throw new BangerError('not_found', `the snapshot's state file ${opts.stateFile} is missing`, 'the snapshot is damaged: delete it and take another');
  });
  const sock = checkSocketPath(opts.migSocket);
  await rm(sock, { force: true });
  const qmp = await QmpClient.connect(proc.qmpSocket, { timeoutMs: 5000, signal: opts.signal });
  try {
    await qmp.execute('migrate-incoming', { uri: `unix:${sock}` }, { timeoutMs: 10_000 });
    const conn = await connectUnix(sock, 5000, opts.signal);
    const sent = runHandingOver('cat', ['--', opts.stateFile], { stdin: 'ignore', stdout: conn }, `sending the snapshot's state ${opts.stateFile} to QEMU`);
    conn.destroy(); // cat has its own copy of the socket
    await sent;
    await waitRunning(qmp, opts.timeoutMs ?? 120_000, opts.signal);
  } finally {
    qmp.close();
    await rm(sock, { force: true });
  }
}

async function connectUnix(path: string, timeoutMs: number, signal?: AbortSignal): Promise<Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<Socket>((res, rej) => {
        const s = createConnection({ path });
        s.once('connect', () => res(s.pause()));
        s.once('error', rej);
      });
    } catch (e) {
      if (Date.now() > deadline) throw new BangerError('host', `QEMU's incoming migration socket ${path}: ${errorMessage(e)}`);
      await sleep(20, signal);
    }
  }
}

/** Waits until the incoming state is loaded and runs the guest; a failed migration throws with QEMU's reason. */
async function waitRunning(qmp: QmpClient, timeoutMs: number, signal?: AbortSignal): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const st = await qmp.execute<{ status: string }>('query-status', undefined, { timeoutMs: 5000 });
    if (st.status === 'running') return;
    const mig = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate', undefined, { timeoutMs: 5000 }).catch(() => ({}) as { status?: string; 'error-desc'?: string });
    if (mig.status === 'failed') throw new BangerError('host', `loading the snapshot failed${mig['error-desc'] ? `: ${mig['error-desc']}` : ''}`);
    // The guest was paused when it was saved, and QEMU restores that run state: once loaded, it is run here.
    if (mig.status === 'completed' && st.status === 'paused') {
      await qmp.execute('cont', undefined, { timeoutMs: 10_000 });
      continue;
    }
    if (Date.now() > deadline) throw new BangerError('timeout', `the restored guest did not run within ${Math.round(timeoutMs / 1000)} s (QEMU status ${st.status}, migration ${mig.status ?? 'none'})`);
    await sleep(25, signal);
  }
}
