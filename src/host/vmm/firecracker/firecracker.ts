/**
 * The Firecracker driver. Firecracker is started detached (its own session, so the VM outlives the daemon),
 * directly or through the jailer, and configured over its HTTP API on a Unix socket. The launch is two named
 * handler lists (launch.ts); this file holds the lifecycle around it: stop, kill, status, waitExit, and the
 * capabilities Resumable (PATCH /vm) and Snapshottable (PUT /snapshot/create, PUT /snapshot/load).
 */
import { lstat, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BangerError, errorMessage } from '../../../errors.js';
import { Files } from '../../../paths.js';
import { errnoCode as errno } from '../../exec/errno.js';
import type { Runner } from '../../exec/runner.js';
import { sleep } from '../../exec/wait.js';
import type { LaunchSpec, Resumable, SnapshotFiles, Snapshottable, StopOutcome, VmmExit, VmmLifecycle, VmmProcess, VmmState } from '../driver.js';
import { FirecrackerApi, probeApiSocket, type ApiRequestOptions, type InstanceActionInfo, type InstanceInfo, type SnapshotCreateParams, type Vm } from './api.js';
import { defaultHandlers, newLaunchContext, patchDrives, runLaunch, unjail, type DrivePaths, type FirecrackerHandlers, type JailerOptions, type LaunchDeps } from './launch.js';
import { childExit, describeExit, FirecrackerFiles, identifyFirecracker, procFields, type FirecrackerProcess } from './process.js';

export * from './api.js';
export * from './jailer.js';
export { HandlerList, HandlerFailed, type Handler } from './handlers.js';
export { defaultHandlers, drivePaths, type DrivePaths, type FirecrackerHandlers, type JailerOptions, type LaunchContext, type LaunchHandler } from './launch.js';
export {
  BASE_BOOT_ARGS,
  bootArgs,
  FirecrackerFiles,
  firecrackerId,
  GUEST_CID,
  identifyFirecracker,
  JAIL_API_SOCKET,
  JAIL_FILES,
  firecrackerVersion,
  resolveFirecrackerBinary,
  restoresSnapshots,
  SNAPSHOT_LOAD_MIN_VERSION,
  type FirecrackerProcess,
  type PidIdentity,
} from './process.js';
export { MAX_SOCKET_PATH } from '../../exec/wait.js';
export type { LaunchSpec } from '../driver.js';

export interface FirecrackerDriverOptions {
  /** The Firecracker binary (config key `firecrackerBin`); else $BANGER_FIRECRACKER_BIN; else PATH. */
  binary?: string;
  env?: NodeJS.ProcessEnv;
  /** Bound on "the API socket answers GET /" after spawn. Default 10 s. */
  readyTimeoutMs?: number;
  /** Bound on each API call. Default 5 s. */
  requestTimeoutMs?: number;
  /** Launch through the jailer: with `launch` (the root helper) or, when running as root, launchJailed with `config`. */
  jailer?: JailerOptions;
  /** One line per boot step with its time, and warnings. */
  log?: (line: string) => void;
  /** Edits the default handler lists (add, remove or swap a step by name) before each launch. */
  handlers?: (defaults: FirecrackerHandlers) => FirecrackerHandlers;
  /** Unused by Firecracker itself (it needs no helper commands); accepted for symmetry with QEMU. */
  runner?: Runner;
}

export interface FirecrackerDriver extends VmmLifecycle, Resumable, Snapshottable {
  kind: 'firecracker';
  launch(spec: LaunchSpec, opts?: { signal?: AbortSignal; runner?: Runner }): Promise<FirecrackerProcess>;
  loadSnapshot(spec: LaunchSpec, files: SnapshotFiles, opts?: { signal?: AbortSignal; resume?: boolean }): Promise<FirecrackerProcess>;
  /** The API client for a launched VM. */
  api(proc: VmmProcess): FirecrackerApi;
  /** GET / on the VM's socket. */
  describe(proc: VmmProcess, opts?: ApiRequestOptions): Promise<InstanceInfo>;
  /** PATCH /drives: the running VM reopens these drives at these paths (a snapshot records the paths it has then). */
  redirectDrives(proc: VmmProcess, drives: Partial<DrivePaths>, opts?: { signal?: AbortSignal }): Promise<void>;
}

/** What every lifecycle function below shares. */
interface Core {
  options: FirecrackerDriverOptions;
  log: (line: string) => void;
  apiFor: (proc: VmmProcess) => FirecrackerApi;
  deps: LaunchDeps;
}

export function createFirecrackerDriver(options: FirecrackerDriverOptions = {}): FirecrackerDriver {
  const requestTimeoutMs = options.requestTimeoutMs ?? 5000;
  const core: Core = {
    options,
    log: options.log ?? (() => {}),
    apiFor: (proc) => new FirecrackerApi(procFields(proc).apiSocket, { timeoutMs: requestTimeoutMs }),
    deps: { binary: options.binary, env: options.env, jailer: options.jailer, readyTimeoutMs: options.readyTimeoutMs ?? 10_000, requestTimeoutMs, kill: (proc) => kill(core, proc) },
  };
  return {
    kind: 'firecracker',
    launch: (spec, opts = {}) => launch(core, spec, opts.signal),
    kill: (proc) => kill(core, proc),
    stop: (proc, opts) => stop(core, proc, opts),
    status: (proc) => status(core, proc),
    waitExit: (proc, signal) => waitExitAndUnjail(core, proc, signal),
    resume: (proc) => core.apiFor(proc).patch('/vm', { state: 'Resumed' } satisfies Vm),
    createSnapshot: (proc, files, opts) => createSnapshot(core, proc, files, opts?.signal),
    loadSnapshot: (spec, files, opts = {}) => launch(core, spec, opts.signal, { ...files, resume: opts.resume ?? true }),
    api: core.apiFor,
    describe: (proc, opts) => core.apiFor(proc).describe(opts),
    redirectDrives: (proc, drives, opts) => patchDrives(core.apiFor(proc), drives, opts?.signal),
  };
}

async function launch(core: Core, spec: LaunchSpec, signal: AbortSignal | undefined, snapshot?: SnapshotFiles & { resume: boolean }): Promise<FirecrackerProcess> {
  const jailed = !!core.options.jailer;
  if (snapshot && jailed) {
    throw new BangerError('unsupported', 'snapshots of a jailed Firecracker are not built: the snapshot files would have to be linked into the chroot', 'run Firecracker without the jailer to use snapshots');
  }
  const ctx = newLaunchContext(core.deps, spec, signal, core.log);
  if (snapshot) ctx.snapshot = { ...snapshot };
  const defaults = defaultHandlers({ jailed, snapshot: !!snapshot, identityDisk: !!spec.identityDisk });
  return runLaunch(ctx, core.options.handlers ? core.options.handlers(defaults) : defaults, core.log);
}

/**
 * PATCH /vm Paused, then PUT /snapshot/create. The guest stays paused: resume it, or stop it. A Full snapshot;
 * Diff snapshots need dirty page tracking, which banger does not turn on.
 */
async function createSnapshot(core: Core, proc: VmmProcess, files: SnapshotFiles, signal?: AbortSignal): Promise<void> {
  if (core.options.jailer) throw new BangerError('unsupported', 'snapshots of a jailed Firecracker are not built', 'run Firecracker without the jailer to use snapshots');
  const api = core.apiFor(proc);
  await api.patch('/vm', { state: 'Paused' } satisfies Vm, { signal });
  const body: SnapshotCreateParams = { snapshot_type: 'Full', snapshot_path: files.snapshotPath, mem_file_path: files.memFilePath };
  await api.put('/snapshot/create', body, { signal, timeoutMs: Math.max(core.deps.requestTimeoutMs, 60_000) });
}

async function isOurs(proc: VmmProcess): Promise<boolean> {
  const { id } = await identifyFirecracker(proc.pid, procFields(proc).fcId);
  return id === 'ours' || id === 'unknown';
}

/** Resolves true once the process is gone, false at the deadline. */
async function waitGone(proc: VmmProcess, timeoutMs: number, signal?: AbortSignal): Promise<boolean> {
  const child = childExit(proc.pid);
  // Our own child: gone when its exit event says so (the kernel reports it once every thread is done).
  if (child) return raceDeadline(child.then(() => true), timeoutMs, signal);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!(await isOurs(proc))) return true;
    const left = deadline - Date.now();
    if (left <= 0) return false;
    await sleep(Math.min(100, left), signal);
  }
}

/** `p`, or false after `timeoutMs`; rejects when `signal` aborts. */
function raceDeadline(p: Promise<boolean>, timeoutMs: number, signal?: AbortSignal): Promise<boolean> {
  return new Promise<boolean>((res, rej) => {
    if (signal?.aborted) return rej(new BangerError('aborted', 'aborted'));
    const done = (fn: () => void) => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      fn();
    };
    const timer = setTimeout(() => done(() => res(false)), Math.max(0, timeoutMs));
    const onAbort = () => done(() => rej(new BangerError('aborted', 'aborted')));
    signal?.addEventListener('abort', onAbort, { once: true });
    void p.then((v) => done(() => res(v)));
  });
}

async function removeSockets(core: Core, proc: VmmProcess): Promise<void> {
  const f = procFields(proc);
  await Promise.all([rm(f.apiSocket, { force: true }), f.vsockSocket ? rm(f.vsockSocket, { force: true }) : undefined]);
  if (f.vmDir) await rm(join(f.vmDir, Files.vmmPid), { force: true });
  await releaseJail(core, proc);
}

/** Remove an exited instance's jail (idempotent), keeping copies of the logs that live in it. */
async function releaseJail(core: Core, proc: VmmProcess): Promise<void> {
  const j = core.options.jailer;
  if (!j) return;
  const f = procFields(proc);
  // The logs live in the chroot, linked from the VM directory: keep a copy before the chroot goes.
  for (const l of [f.serialLog, f.vmDir ? join(f.vmDir, FirecrackerFiles.vmmLog) : undefined]) if (l) await keepLinkedLog(l);
  try {
    await unjail(j, f.fcId);
  } catch (e) {
    core.log(`firecracker ${f.fcId}: could not remove its jail: ${errorMessage(e)}`);
  }
}

/** Replaces a symlinked log with a copy of what it points to. */
async function keepLinkedLog(l: string): Promise<void> {
  try {
    if (!(await lstat(l)).isSymbolicLink()) return;
    const text = await readFile(l).catch(() => Buffer.alloc(0));
    await rm(l, { force: true });
    await writeFile(l, text);
  } catch {
    /* no log to keep */
  }
}

async function kill(core: Core, proc: VmmProcess): Promise<void> {
  if (await isOurs(proc)) {
    try {
      process.kill(proc.pid, 'SIGKILL');
    } catch (e) {
      if (errno(e) !== 'ESRCH') throw new BangerError('host', `cannot kill Firecracker pid ${proc.pid}: ${errorMessage(e)}`);
    }
    if (!(await waitGone(proc, 10_000))) throw new BangerError('host', `Firecracker pid ${proc.pid} did not exit within 10 s of SIGKILL`);
  }
  await removeSockets(core, proc);
}

async function stop(core: Core, proc: VmmProcess, { timeoutMs, signal }: { timeoutMs: number; signal?: AbortSignal }): Promise<StopOutcome> {
  if (!(await isOurs(proc))) {
    await removeSockets(core, proc);
    return 'already-gone';
  }
  let sent = false;
  try {
    await core.apiFor(proc).put('/actions', { action_type: 'SendCtrlAltDel' } satisfies InstanceActionInfo, { timeoutMs: 3000, signal });
    sent = true;
  } catch (e) {
    if (e instanceof BangerError && e.kind === 'aborted') throw e;
    core.log(`firecracker pid ${proc.pid}: SendCtrlAltDel failed (${errorMessage(e)}); killing`);
  }
  if (sent && (await waitGone(proc, timeoutMs, signal))) {
    await removeSockets(core, proc);
    return 'graceful';
  }
  if (!sent && !(await isOurs(proc))) {
    await removeSockets(core, proc);
    return 'already-gone';
  }
  if (signal?.aborted) throw new BangerError('aborted', 'stopping the VM: aborted');
  await kill(core, proc);
  return 'killed';
}

const STATE_MAP: Record<string, VmmState> = { Running: 'running', Paused: 'paused' };

async function status(core: Core, proc: VmmProcess): Promise<{ state: VmmState; reasons: string[] }> {
  const f = procFields(proc);
  const ident = await identifyFirecracker(proc.pid, f.fcId);
  if (ident.id === 'gone' || ident.id === 'other') {
    const reasons =
      ident.id === 'gone'
        ? [`Firecracker process ${proc.pid} is not running${ident.detail ? ` (${ident.detail})` : ''}`]
        : [`pid ${proc.pid} now belongs to another program (${ident.detail}); the VM's Firecracker is gone`];
    const probe = await probeApiSocket(f.apiSocket, 500);
    if (probe.serving) return { state: 'broken', reasons: [...reasons, `yet something serves ${f.apiSocket} (${probe.detail})`] };
    return { state: 'gone', reasons };
  }
  if (ident.detail === 'exiting') return { state: 'shutdown', reasons: [`Firecracker process ${proc.pid} is exiting`] };
  let info: InstanceInfo;
  try {
    info = await core.apiFor(proc).describe({ timeoutMs: 2000 });
  } catch (e) {
    if (!(await isOurs(proc))) return { state: 'gone', reasons: [`Firecracker process ${proc.pid} exited`] };
    return { state: 'broken', reasons: [`Firecracker process ${proc.pid} is running but its API socket ${f.apiSocket} did not answer: ${errorMessage(e)}`] };
  }
  if (info.id !== f.fcId) return { state: 'broken', reasons: [`the API socket ${f.apiSocket} answers for instance ${info.id}, expected ${f.fcId}`] };
  const state = STATE_MAP[info.state];
  if (state) return { state, reasons: state === 'running' ? [] : [`Firecracker reports state '${info.state}'`] };
  return { state: 'broken', reasons: [`Firecracker process ${proc.pid} is up but reports state '${info.state}' (the instance was never started)`] };
}

/**
 * A jailed Firecracker that exits on its own is unjailed at once: its chroot holds hard links to the VM's disks,
 * which would keep a deleted VM's space in use. (stop, kill and delete unjail through removeSockets.)
 */
async function waitExitAndUnjail(core: Core, proc: VmmProcess, signal: AbortSignal): Promise<VmmExit> {
  const exit = await waitExit(proc, signal);
  if (core.options.jailer) await releaseJail(core, proc);
  return exit;
}

async function waitExit(proc: VmmProcess, signal: AbortSignal): Promise<VmmExit> {
  const child = childExit(proc.pid);
  // Our own child: its exit event tells how it ended. Not /proc first: it can show the child gone (a zombie)
  // before the event arrives, and the exit status would be lost.
  if (child) {
    const ex = await Promise.race([
      child,
      new Promise<never>((_, rej) => {
        if (signal.aborted) rej(new BangerError('aborted', 'waiting for Firecracker to exit: aborted'));
        signal.addEventListener('abort', () => rej(new BangerError('aborted', 'waiting for Firecracker to exit: aborted')), { once: true });
      }),
    ]);
    return { reason: describeExit(ex) };
  }
  if (!(await isOurs(proc))) return { reason: 'process not running' };
  while (await isOurs(proc)) await sleep(250, signal);
  return { reason: 'process exited' };
}

/** The default Firecracker driver (binary from $BANGER_FIRECRACKER_BIN or PATH). */
export const firecrackerDriver: FirecrackerDriver = createFirecrackerDriver();
