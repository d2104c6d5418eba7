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
import { run } from '../host/exec/runner.js';
import { ensureUserKey, type UserKey } from '../host/guest/keys.js';
import { qemuDriver, type VmmDriver } from '../host/vmm/qemu/qemu.js';
import { makeHandlers, type HandlerDeps } from './handlers.js';
import { createPoolVm } from './handlers/vms.js';
import { warmGuest } from './handlers/guest-access.js';
import { WarmPool } from './warm-pool.js';
import { SshPool } from '../host/guest/pool.js';
import { createFirecrackerDriver } from '../host/vmm/firecracker/firecracker.js';
import { RootHelper } from '../actors/root-helper.js';
import { TapPool } from '../actors/tap-pool.js';
import { gatewayAddress, parseCidr } from '../host/net/net.js';
import { makeNetwork } from '../actors/network.js';
import { firewallEntryOf, firewallResync } from '../actors/firewall-sync.js';
import { DEFAULT_HELPER_SOCKET } from '../roothelper/units.js';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { makeJobRunners } from './jobs.js';
import { vmTransitionHooks } from './vm-hooks.js';
import { serveInspector, type InspectorServer } from './inspector.js';
import type { StepEnv } from '../actors/vm-steps.js';
import { buildInfo } from '../version.js';
import { clearLeftovers } from '../host/image/image.js';
import { clearExportLeftovers } from './export-journal.js';

export interface DaemonHandle extends Partial<TapNetworking> {
  layout: Layout;
  config: Config;
  store: Store;
  supervisor: Supervisor;
  server: RpcServer;
  /** The live inspector (`daemon start --inspect`), when served. */
  inspector?: InspectorServer;
  warmPool: WarmPool;
  startedAt: number;
  stop(): Promise<void>;
}

export interface DaemonOptions {
  /** Serve the actor system to Stately's inspector on 127.0.0.1:PORT (0 picks a free port). */
  inspectPort?: number;
}

/** The root helper, the TAP pool over it and the network they make: present when this daemon can do tap networking. */
interface TapNetworking {
  rootHelper: RootHelper;
  tapPool: TapPool;
  network: ReturnType<typeof makeNetwork>;
  helperSocket: string;
  /** The helper runs as a service (not as this daemon's child): `--net auto` then picks tap. */
  helperIsService: boolean;
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

async function claimHome(layout: Layout): Promise<void> {
  for (const dir of [layout.home, layout.run]) mkdirSync(dir, { recursive: true, mode: 0o700 });
  for (const dir of [layout.vmsDir, layout.imagesDir]) mkdirSync(dir, { recursive: true });
  if (Buffer.byteLength(layout.socket) > 107) {
    throw new BangerError('usage', `the daemon socket path ${layout.socket} is longer than the 107 bytes a Unix socket allows`, 'set XDG_RUNTIME_DIR or BANGER_RUNTIME_DIR to a shorter directory');
  }
  if (await socketAnswers(layout.socket)) {
    throw new BangerError('conflict', `a banger daemon is already running on ${layout.socket}`, 'banger daemon status');
  }
  takeLock(join(layout.run, 'daemon.lock'));
}

function daemonLog(layout: Layout): (line: string) => void {
  return (line) => {
    try {
      appendFileSync(layout.logFile, `${new Date().toISOString()} ${line}\n`);
    } catch {
      /* logging must never take the daemon down */
    }
  };
}

/**
 * The root helper (TAP devices, bridge, NAT): a service on its socket, or — when the daemon runs as root — our
 * own child process. BANGER_ROOT_HELPER=off disables it (user-mode networking only). A helper installed as a
 * service (its socket exists before we start) makes `--net auto` pick tap; a helper a root daemon runs itself
 * serves explicit `--net tap` only, so that plain `sudo banger vm run` does not put a bridge on the host unasked.
 */
function tapNetworking(env: NodeJS.ProcessEnv, layout: Layout, config: Config, store: Store, log: (l: string) => void): TapNetworking | undefined {
  const isRoot = process.getuid?.() === 0;
  const helperSocket = env.BANGER_ROOT_HELPER_SOCKET ?? (isRoot ? join(layout.run, 'roothelper.sock') : DEFAULT_HELPER_SOCKET);
  if (env.BANGER_ROOT_HELPER === 'off' || !(isRoot || existsSync(helperSocket))) return undefined;
  const c = parseCidr(config.subnet);
  const cidr = `${gatewayAddress(config.subnet)}/${c.prefix}`;
  const rootHelper = new RootHelper({ socket: helperSocket, spawnChild: isRoot, stateDir: layout.home, network: { bridge: config.bridge, cidr, nat: config.nat }, log });
  const tapPool = new TapPool(store.db, rootHelper, { size: config.tapPoolSize, log });
  const helperIsService = existsSync(helperSocket) && !helperSocket.startsWith(layout.run + '/');
  return { rootHelper, tapPool, network: makeNetwork(rootHelper, tapPool, store, config), helperSocket, helperIsService };
}

function vmmDrivers(config: Config, log: (l: string) => void): Record<string, VmmDriver | undefined> {
  return {
    qemu: qemuDriver,
    firecracker: createFirecrackerDriver({ binary: config.firecrackerBin, log: (l) => log(`firecracker: ${l}`) }),
  };
}

function stepEnvironment(layout: Layout, config: Config, store: Store, drivers: Record<string, VmmDriver | undefined>, network: TapNetworking['network'] | undefined, log: (l: string) => void): StepEnv {
  let keyPromise: Promise<UserKey> | undefined;
  return {
    layout,
    store,
    config,
    runner: run,
    userKey: () => (keyPromise ??= ensureUserKey(layout.keysDir)),
    network,
    ssh: new SshPool(),
    driver: (kind) => {
      const d = drivers[kind];
      if (!d) throw new BangerError('unsupported', `the ${kind} VMM driver is not available in this daemon`, 'use --vmm qemu');
      return d;
    },
    log: (vmId, stage, status, ms, message) => log(`vm ${vmId} ${stage} ${status}${ms !== undefined ? ` ${ms}ms` : ''}${message ? ` ${message.split('\n')[0]}` : ''}`),
  };
}

/**
 * Reconcile TAP leases with the devices that exist, then warm the pool — in the pool's queue, so any lease asked
 * for meanwhile waits for it. The host's network (bridge, warm TAPs) is touched only when tap networking is in use
 * or wanted.
 */
function startTapNetworking(t: TapNetworking, sup: Supervisor, config: Config, inspectable: boolean, log: (l: string) => void): void {
  const firewallEntries = () => sup.ids().flatMap((id) => firewallEntryOf(sup.snapshot(id).context) ?? []);
  const resyncFirewall = firewallResync(t.rootHelper, firewallEntries, log);
  // Every (re)connect: a helper that was restarted knows none of this daemon's VMs.
  t.rootHelper.onConnect = () => void resyncFirewall();
  sup.enableRootHelper();
  t.rootHelper.attach(sup.system.get('rootHelper'));
  t.tapPool.attach(sup.system.get('tapPool'));
  const vmTaps = new Map<string, string>();
  for (const id of sup.ids()) {
    const c = sup.snapshot(id).context;
    const tap = c.runtime?.tap ?? c.net?.tap;
    if (tap) vmTaps.set(tap, id);
  }
  const wanted = t.helperIsService || config.defaultNet === 'tap' || vmTaps.size > 0 || t.tapPool.leases().length > 0;
  if (!wanted) return;
  void (async () => {
    if (!(await t.rootHelper.reachable(15_000))) return log(`root helper not reachable on ${t.helperSocket}: ${t.rootHelper.state().lastError ?? ''}`);
    try {
      await t.network.ensureBridge();
      const r = await t.tapPool.reconcile(vmTaps, inspectable, () => sup.ids());
      log(`tapPool reconciled: adopted ${r.adopted.length}, deleted ${r.deleted.length} stray, forgot ${r.forgotten.length}`);
      await resyncFirewall(r.deleted);
      await t.tapPool.refill();
    } catch (e) {
      log(`tapPool: ${(e as Error).message}`);
    }
  })();
}

export async function startDaemon(env: NodeJS.ProcessEnv = process.env, opts: DaemonOptions = {}): Promise<DaemonHandle> {
  const layout = makeLayout(env);
  const config = loadConfig(layout.config, env);
  await claimHome(layout);
  const store = new Store(openDb(layout.db));
  const log = daemonLog(layout);
  const tap = tapNetworking(env, layout, config, store, log);
  const drivers = vmmDrivers(config, log);
  const stepEnv = stepEnvironment(layout, config, store, drivers, tap?.network, log);
  // What a killed build or create left (gigabytes, at times): none runs yet, so none of it is in use. Awaited
  // before the VM actors restart (their steps rewrite *.partial files); the big trees go in the background.
  await clearLeftovers(layout, { runner: run, log }).catch((e) => log(`clearing leftovers: ${(e as Error).message}`));
  await clearExportLeftovers(layout, log).catch((e) => log(`clearing export leftovers: ${(e as Error).message}`));
  const inspector = opts.inspectPort === undefined ? undefined : await serveInspector(opts.inspectPort);
  const infra = tap && { rootHelper: tap.rootHelper.logic, tapPool: tap.tapPool.logic };
  const jobRunners = makeJobRunners(() => supervisor, stepEnv);
  const supervisor: Supervisor = new Supervisor(stepEnv, jobRunners, { infra, inspect: inspector?.inspect });
  supervisor.onTransition(vmTransitionHooks(stepEnv.ssh, jobRunners));
  const restored = supervisor.start();
  log(`daemon ${process.pid} started; restored ${restored.restored} VM actor(s)${restored.errors.length ? `; errors: ${restored.errors.join('; ')}` : ''}${inspector ? `; inspector on 127.0.0.1:${inspector.port}` : ''}`);
  // Address leases of VMs that no longer exist are freed.
  store.db.prepare('DELETE FROM ip_leases WHERE vm_id NOT IN (SELECT id FROM vms WHERE deleted = 0)').run();
  if (tap) startTapNetworking(tap, supervisor, config, restored.errors.length === 0, log);
  const deps: HandlerDeps = { version: buildInfo().version, commit: buildInfo().commit, drivers, log };
  const warmPool: WarmPool = new WarmPool(config, supervisor, { create: (kind, key): Promise<void> => createPoolVm(services, deps, kind, key), warm: (id): Promise<void> => warmGuest(services, id) }, log);
  const services = { layout, config, store, supervisor, ssh: stepEnv.ssh, inspector, ...tap, warmPool, startedAt: Date.now(), stop: () => handle.stop() };
  const server = new RpcServer(makeHandlers(services, deps), log);
  const handle: DaemonHandle = { ...services, server, stop: stopper(() => handle, log) };
  await server.listen(layout.socket);
  writeFileSync(layout.pidFile, String(process.pid));
  handle.warmPool.start();
  return handle;
}

/** Stop serving; VMs keep running (the next daemon adopts them). Idempotent. */
function stopper(handle: () => DaemonHandle, log: (l: string) => void): () => Promise<void> {
  let stopping: Promise<void> | undefined;
  return () =>
    (stopping ??= (async () => {
      const h = handle();
      log(`daemon ${process.pid} stopping (VMs keep running)`);
      await h.warmPool.stop();
      h.tapPool?.stop();
      await h.rootHelper?.stop();
      h.supervisor.detachAll();
      await h.inspector?.close();
      await h.server.close();
      rmSync(h.layout.socket, { force: true });
      rmSync(h.layout.pidFile, { force: true });
      h.store.db.close();
    })());
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
