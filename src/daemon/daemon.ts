/**
 * The owner daemon: the store, the supervisor with every VM actor, and the JSON-RPC server on the
 * daemon socket. Started by `banger daemon start [--foreground]` (the CLI starts it when the socket is absent).
 */
import { mkdirSync, writeFileSync, rmSync, readFileSync, appendFileSync } from 'node:fs';
import { connect } from 'node:net';
import { BangerError } from '../errors.js';
import { layout as makeLayout, type Layout } from '../paths.js';
import { loadConfig, type Config } from '../config.js';
import { openDb } from '../store/db.js';
import { Store } from '../store/repo.js';
import { RpcServer } from '../rpc/server.js';
import { Supervisor } from '../actors/supervisor.js';
import { run } from '../host/runner.js';
import { ensureUserKey, type UserKey } from '../host/keys.js';
import { qemuDriver, type VmmDriver } from '../host/qemu.js';
import { makeHandlers } from './handlers.js';
import { makeJobRunners } from './jobs.js';

export const VERSION = '0.1.0';

export interface DaemonHandle {
  layout: Layout;
  config: Config;
  store: Store;
  supervisor: Supervisor;
  server: RpcServer;
  startedAt: number;
  stop(): Promise<void>;
}

function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    const t = setTimeout(() => {
      s.destroy();
      resolve(false);
    }, 1000);
    s.once('connect', () => {
      clearTimeout(t);
      s.destroy();
      resolve(true);
    });
    s.once('error', () => {
      clearTimeout(t);
      resolve(false);
    });
  });
}

export async function startDaemon(env: NodeJS.ProcessEnv = process.env): Promise<DaemonHandle> {
  const layout = makeLayout(env);
  const config = loadConfig(layout.config, env);
  mkdirSync(layout.home, { recursive: true, mode: 0o700 });
  mkdirSync(layout.run, { recursive: true, mode: 0o700 });
  mkdirSync(layout.vmsDir, { recursive: true });
  mkdirSync(layout.imagesDir, { recursive: true });
  if (Buffer.byteLength(layout.socket) > 107) {
    throw new BangerError('usage', `the daemon socket path ${layout.socket} is longer than the 107 bytes a Unix socket allows`, 'set XDG_RUNTIME_DIR or BANGER_RUNTIME_DIR to a shorter directory');
  }
  if (await socketAnswers(layout.socket)) {
    throw new BangerError('conflict', `a banger daemon is already running on ${layout.socket}`, 'banger daemon status');
  }
  const store = new Store(openDb(layout.db));
  const log = (line: string) => {
    try {
      appendFileSync(layout.logFile, `${new Date().toISOString()} ${line}\n`);
    } catch {
      /* logging must never take the daemon down */
    }
  };
  let keyPromise: Promise<UserKey> | undefined;
  const drivers: Record<string, VmmDriver | undefined> = { qemu: qemuDriver };
  const stepEnv = {
    layout,
    store,
    config,
    runner: run,
    userKey: () => (keyPromise ??= ensureUserKey(layout.keysDir, { runner: run })),
    driver: (kind: string) => {
      const d = drivers[kind];
      if (!d) throw new BangerError('unsupported', `the ${kind} VMM driver is not available in this daemon`, 'use --vmm qemu');
      return d;
    },
    log: (vmId: string, stage: string, status: string, ms?: number, message?: string) =>
      log(`vm ${vmId} ${stage} ${status}${ms !== undefined ? ` ${ms}ms` : ''}${message ? ` ${message.split('\n')[0]}` : ''}`),
  };
  let supervisor!: Supervisor;
  const jobRunners = makeJobRunners(() => supervisor, stepEnv);
  supervisor = new Supervisor(stepEnv, jobRunners);
  const restored = supervisor.restoreAll();
  log(`daemon ${process.pid} started; restored ${restored.restored} VM actor(s)${restored.errors.length ? `; errors: ${restored.errors.join('; ')}` : ''}`);

  const startedAt = Date.now();
  let stopping: Promise<void> | undefined;
  const handle: DaemonHandle = {
    layout,
    config,
    store,
    supervisor,
    server: undefined as unknown as RpcServer,
    startedAt,
    stop: () =>
      (stopping ??= (async () => {
        log(`daemon ${process.pid} stopping (VMs keep running)`);
        supervisor.detachAll();
        await handle.server.close();
        rmSync(layout.socket, { force: true });
        rmSync(layout.pidFile, { force: true });
        store.db.close();
      })()),
  };
  const handlers = makeHandlers(handle, { version: VERSION, drivers, log });
  handle.server = new RpcServer(handlers, log);
  await handle.server.listen(layout.socket);
  writeFileSync(layout.pidFile, String(process.pid));
  return handle;
}

export function readDaemonPid(l: Layout): number | undefined {
  try {
    const pid = Number(readFileSync(l.pidFile, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}
