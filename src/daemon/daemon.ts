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
import { createFirecrackerDriver } from '../host/firecracker.js';
import { RootHelper } from '../actors/root-helper.js';
import { TapPool, ownerTag } from '../actors/tap-pool.js';
import { makeNetwork } from '../actors/network.js';
import { DEFAULT_HELPER_SOCKET } from '../roothelper/units.js';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { makeJobRunners } from './jobs.js';
import { buildInfo } from '../version.js';
import { clearLeftovers } from '../host/image.js';


export interface DaemonHandle {
  rootHelper?: RootHelper;
  tapPool?: TapPool;
  network?: ReturnType<typeof makeNetwork>;
  helperSocket?: string;
  /** The helper runs as a service (not as this daemon's child): `--net auto` then picks tap. */
  helperIsService?: boolean;
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
  takeLock(join(layout.run, 'daemon.lock'));
  const store = new Store(openDb(layout.db));
  const log = (line: string) => {
    try {
      appendFileSync(layout.logFile, `${new Date().toISOString()} ${line}\n`);
    } catch {
      /* logging must never take the daemon down */
    }
  };
  let keyPromise: Promise<UserKey> | undefined;
  const drivers: Record<string, VmmDriver | undefined> = {
    qemu: qemuDriver,
    firecracker: createFirecrackerDriver({ binary: config.firecrackerBin, log: (l) => log(`firecracker: ${l}`) }),
  };

  // The root helper (TAP devices, bridge, NAT): a service on its socket, or — when the daemon runs as root —
  // our own child process. BANGER_ROOT_HELPER=off disables it (user-mode networking only).
  const isRoot = process.getuid?.() === 0;
  const helperSocket = env.BANGER_ROOT_HELPER_SOCKET ?? (isRoot ? join(layout.run, 'roothelper.sock') : DEFAULT_HELPER_SOCKET);
  let rootHelper: RootHelper | undefined;
  let tapPool: TapPool | undefined;
  let network: ReturnType<typeof makeNetwork> | undefined;
  // A helper installed as a service (its socket exists before we start) makes `--net auto` pick tap; a helper
  // a root daemon runs itself serves explicit `--net tap` only, so that plain `sudo banger vm run` does not
  // put a bridge on the host's network unasked.
  const helperIsService = existsSync(helperSocket) && !helperSocket.startsWith(layout.run + '/');
  if (env.BANGER_ROOT_HELPER !== 'off' && (isRoot || existsSync(helperSocket))) {
    rootHelper = new RootHelper({ socket: helperSocket, spawnChild: isRoot, stateDir: layout.home, bridge: config.bridge, log });
    tapPool = new TapPool(store.db, rootHelper, { size: config.tapPoolSize, bridge: config.bridge, uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, log, tag: ownerTag(process.getuid?.() ?? 0, layout.home) });
    network = makeNetwork(rootHelper, tapPool, store, config);
  }
  const stepEnv = {
    layout,
    store,
    config,
    runner: run,
    userKey: () => (keyPromise ??= ensureUserKey(layout.keysDir, { runner: run })),
    network,
    driver: (kind: string) => {
      const d = drivers[kind];
      if (!d) throw new BangerError('unsupported', `the ${kind} VMM driver is not available in this daemon`, 'use --vmm qemu');
      return d;
    },
    log: (vmId: string, stage: string, status: string, ms?: number, message?: string) =>
      log(`vm ${vmId} ${stage} ${status}${ms !== undefined ? ` ${ms}ms` : ''}${message ? ` ${message.split('\n')[0]}` : ''}`),
  };
  // What a killed build or create left (gigabytes, at times): none runs yet, so none of it is in use. Awaited
  // before the VM actors restart (their steps rewrite *.partial files); the big trees go in the background.
  await clearLeftovers(layout, { runner: run, log }).catch((e) => log(`clearing leftovers: ${(e as Error).message}`));
  let supervisor!: Supervisor;
  const jobRunners = makeJobRunners(() => supervisor, stepEnv);
  supervisor = new Supervisor(stepEnv, jobRunners);
  const restored = supervisor.restoreAll();
  log(`daemon ${process.pid} started; restored ${restored.restored} VM actor(s)${restored.errors.length ? `; errors: ${restored.errors.join('; ')}` : ''}`);
  // Address leases of VMs that no longer exist are freed.
  store.db.prepare('DELETE FROM ip_leases WHERE vm_id NOT IN (SELECT id FROM vms WHERE deleted = 0)').run();
  if (tapPool && network && rootHelper) {
    // Reconcile TAP leases with the devices that exist, then warm the pool. Runs in the pool's queue, so any
    // lease asked for meanwhile waits for it.
    const vmTaps = new Map<string, string>();
    for (const id of supervisor.ids()) {
      const c = supervisor.snapshot(id).context;
      const tap = c.runtime?.tap ?? c.net?.tap;
      if (tap) vmTaps.set(tap, id);
    }
    const inspectable = restored.errors.length === 0;
    // Touch the host's network (bridge, warm TAPs) only when tap networking is in use or wanted.
    const wantPool = helperIsService || config.defaultNet === 'tap' || vmTaps.size > 0 || tapPool.leases().length > 0;
    if (wantPool) void (async () => {
      if (!(await rootHelper.reachable(15_000))) {
        log(`root helper not reachable on ${helperSocket}: ${rootHelper.state().lastError ?? ''}`);
        return;
      }
      try {
        await network.ensureBridge();
        const r = await tapPool.reconcile(vmTaps, inspectable, () => supervisor.ids());
        log(`tapPool reconciled: adopted ${r.adopted.length}, deleted ${r.deleted.length} stray, forgot ${r.forgotten.length}`);
        await tapPool.refill();
      } catch (e) {
        log(`tapPool: ${(e as Error).message}`);
      }
    })();
  }

  const startedAt = Date.now();
  let stopping: Promise<void> | undefined;
  const handle: DaemonHandle = {
    layout,
    config,
    store,
    supervisor,
    server: undefined as unknown as RpcServer,
    startedAt,
    rootHelper,
    tapPool,
    network,
    helperSocket,
    helperIsService,
    stop: () =>
      (stopping ??= (async () => {
        log(`daemon ${process.pid} stopping (VMs keep running)`);
        supervisor.detachAll();
        tapPool?.stop();
        await rootHelper?.stop();
        await handle.server.close();
        rmSync(layout.socket, { force: true });
        rmSync(layout.pidFile, { force: true });
        store.db.close();
      })()),
  };
  const handlers = makeHandlers(handle, { version: buildInfo().version, commit: buildInfo().commit, drivers, log });
  handle.server = new RpcServer(handlers, log);
  await handle.server.listen(layout.socket);
  writeFileSync(layout.pidFile, String(process.pid));
  return handle;
}

/** A daemon killed with SIGKILL whose parent has not reaped it yet is a zombie: it holds nothing any more. */
function isZombie(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] === 'Z';
  } catch {
    return false;
  }
}

/** One daemon per BANGER_HOME: an O_EXCL lock file holding the pid; a dead holder's lock is taken over. */
function takeLock(path: string): void {
  for (let i = 0; i < 2; i++) {
    try {
      writeFileSync(path, String(process.pid), { flag: 'wx' });
      process.on('exit', () => {
        try {
          if (readFileSync(path, 'utf8') === String(process.pid)) rmSync(path, { force: true });
        } catch {
          /* gone */
        }
      });
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const holder = Number(readFileSync(path, 'utf8'));
      let alive = false;
      try {
        process.kill(holder, 0);
        alive = holder !== process.pid && !isZombie(holder);
      } catch {
        alive = false;
      }
      if (alive) throw new BangerError('conflict', `another banger daemon (pid ${holder}) is starting or running for this BANGER_HOME`, 'banger daemon status');
      rmSync(path, { force: true });
    }
  }
  throw new BangerError('conflict', `could not take the daemon lock ${path}`);
}
