/**
 * Firecracker's launch as named handler lists (firecracker-go-sdk handlers.go): `init` starts the process and
 * waits for its API socket (resolve-binary → prepare-dirs → spawn | jail → wait-api-socket); `config` configures
 * and boots it (machine-config → boot-source → drives → network-interfaces → vsock → InstanceStart), or, when
 * restoring, loads a snapshot instead. Cleanups are registered as resources are acquired and run in reverse when
 * a handler fails.
 */
import { mkdir, rm, symlink, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { BangerError, errorMessage } from '../../../errors.js';
import { Files } from '../../../paths.js';
import { Cleanups } from '../../exec/cleanups.js';
import type { ExitStatus } from '../../exec/spawn.js';
import { checkSocketPath, sleep } from '../../exec/wait.js';
import type { LaunchSpec, SnapshotFiles, VmmProcess } from '../driver.js';
import {
  FirecrackerApi,
  probeApiSocket,
  type BootSource,
  type Drive,
  type InstanceActionInfo,
  type MachineConfiguration,
  type NetworkInterface,
  type SnapshotLoadParams,
  type Vsock,
} from './api.js';
import { HandlerList, type Handler } from './handlers.js';
import { launchJailed, removeJail, type JailerConfig, type JailLauncher, type JailRequest, type JailResult } from './jailer.js';
import {
  bootArgs,
  describeExit,
  FirecrackerFiles,
  firecrackerId,
  GUEST_CID,
  identifyFirecracker,
  resolveFirecrackerBinary,
  restoresSnapshots,
  SNAPSHOT_LOAD_MIN_VERSION,
  spawnVmm,
  tail,
  type FirecrackerProcess,
} from './process.js';

/** How long to wait for the exit event of our child once /proc shows it gone. */
const EXIT_EVENT_GRACE_MS = 5000;

export interface JailerOptions {
  uid: number;
  gid: number;
  launch?: JailLauncher;
  /** Removes an instance's chroot after it exited (the root helper's firecracker.unjail). */
  unjail?: (fcId: string) => Promise<unknown>;
  config?: JailerConfig;
}

/** What the handlers need from the driver. */
export interface LaunchDeps {
  binary?: string;
  env?: NodeJS.ProcessEnv;
  jailer?: JailerOptions;
  readyTimeoutMs: number;
  requestTimeoutMs: number;
  kill(proc: VmmProcess): Promise<void>;
}

/** The state one launch builds up, handler by handler. */
export interface LaunchContext {
  deps: LaunchDeps;
  spec: LaunchSpec;
  net: { mode: 'tap'; tap: string; mac: string };
  fcId: string;
  apiSocket: string;
  vsockSocket: string;
  vmmLog: string;
  pidFile: string;
  api: FirecrackerApi;
  cleanups: Cleanups;
  signal?: AbortSignal;
  binary: string;
  pid: number;
  exited?: Promise<ExitStatus>;
  chrootDir?: string;
  /** Paths as Firecracker sees them (inside the chroot when jailed). */
  paths: { kernel: string; initrd?: string; rootDisk: string; workDisk: string; identityDisk?: string; vsock: string };
  /** Set when the launch restores a snapshot instead of booting. */
  snapshot?: SnapshotFiles & { resume: boolean };
}

export type LaunchHandler = Handler<LaunchContext>;

export interface FirecrackerHandlers {
  init: HandlerList<LaunchContext>;
  config: HandlerList<LaunchContext>;
}

/** Validates the spec and resolves its paths; refuses what Firecracker cannot do. */
export function newLaunchContext(deps: LaunchDeps, spec0: LaunchSpec, signal: AbortSignal | undefined, log: (line: string) => void): LaunchContext {
  const net = spec0.net;
  if (net.mode === 'user') {
    throw new BangerError('unsupported', 'Firecracker has no user-mode networking: a VM on Firecracker needs TAP networking', 'use --net tap (needs the root helper), or --vmm qemu for --net user');
  }
  if (spec0.identityDisk && deps.jailer) throw new BangerError('unsupported', 'a jailed Firecracker takes no identity disk: the jail links only the root and work disks', 'run Firecracker without the jailer (the daemon does), or launch without an identity disk');
  const r = (p: string) => resolve(p);
  const o = (p: string | undefined) => (p ? r(p) : undefined);
  const spec: LaunchSpec = { ...spec0, vmDir: r(spec0.vmDir), runDir: r(spec0.runDir), kernel: r(spec0.kernel), initrd: o(spec0.initrd), rootDisk: r(spec0.rootDisk), workDisk: r(spec0.workDisk), identityDisk: o(spec0.identityDisk), serialLog: r(spec0.serialLog) };
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 32) throw new BangerError('invalid_params', `Firecracker takes 1-32 vCPUs, got ${spec.vcpus}`);
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 64) throw new BangerError('invalid_params', `memory must be at least 64 MiB, got ${spec.memoryMiB}`);
  if (spec.accel !== 'kvm') log(`warning: Firecracker always uses KVM; accel '${spec.accel}' is ignored`);
  const fcId = firecrackerId(spec.id);
  const apiSocket = checkSocketPath(join(spec.runDir, FirecrackerFiles.apiSocket(fcId)));
  const vsockSocket = checkSocketPath(join(spec.runDir, FirecrackerFiles.vsock(fcId)));
  return {
    deps,
    spec,
    net,
    fcId,
    apiSocket,
    vsockSocket,
    vmmLog: join(spec.vmDir, FirecrackerFiles.vmmLog),
    pidFile: join(spec.vmDir, Files.vmmPid),
    api: new FirecrackerApi(apiSocket, { timeoutMs: deps.requestTimeoutMs }),
    cleanups: new Cleanups(),
    signal,
    binary: '',
    pid: 0,
    paths: { kernel: spec.kernel, initrd: spec.initrd, rootDisk: spec.rootDisk, workDisk: spec.workDisk, identityDisk: spec.identityDisk, vsock: vsockSocket },
  };
}

/** The VmmProcess a launch hands back. */
export function launchedProcess(c: LaunchContext): FirecrackerProcess {
  return { pid: c.pid, qmpSocket: c.apiSocket, apiSocket: c.apiSocket, vsockSocket: c.vsockSocket, fcId: c.fcId, vmDir: c.spec.vmDir, serialLog: c.spec.serialLog, ...(c.chrootDir ? { chrootDir: c.chrootDir } : {}) };
}

// ───────────────────────────── init: start the process ─────────────────────────────

export const ResolveBinary: LaunchHandler = {
  name: 'resolve-binary',
  fn: async (c) => {
    c.binary = await resolveFirecrackerBinary(c.deps.binary, c.deps.env ?? process.env);
  },
};

export const PrepareDirs: LaunchHandler = {
  name: 'prepare-dirs',
  fn: async (c) => {
    await mkdir(c.spec.runDir, { recursive: true, mode: 0o700 });
    await mkdir(c.spec.vmDir, { recursive: true });
    await mkdir(dirname(c.spec.serialLog), { recursive: true });
    // A Firecracker still serving this socket would be cut off from it: refuse instead. Only a socket that
    // nothing listens on (left behind by a VMM that exited) is removed; a slow answer is not "nobody".
    const probe = await probeApiSocket(c.apiSocket, 2000, c.signal);
    if (probe.serving) {
      throw new BangerError('conflict', `a Firecracker ${probe.info ? `(instance ${probe.info.id}) ` : ''}is already serving ${c.apiSocket}${probe.info ? '' : ` (${probe.detail})`}`, 'stop that VM first');
    }
    await rm(c.apiSocket, { force: true });
    await rm(c.vsockSocket, { force: true });
  },
};

export const Spawn: LaunchHandler = {
  name: 'spawn',
  fn: async (c) => {
    const s = spawnVmm(c.binary, ['--api-sock', c.apiSocket, '--id', c.fcId], { stdout: c.spec.serialLog, stderr: c.vmmLog }, c.spec.vmDir);
    await s.started;
    c.pid = s.pid;
    c.exited = s.exitStatus;
    c.cleanups.add('kill firecracker', () => c.deps.kill(launchedProcess(c)));
    await writeFile(c.pidFile, `${c.pid}\n`); // at once: a daemon killed from here on leaves the pid where `vm delete` finds it
  },
};

export const Jail: LaunchHandler = {
  name: 'jail',
  fn: async (c) => {
    const j = c.deps.jailer!;
    const { spec } = c;
    const req: JailRequest = { id: c.fcId, vmDir: spec.vmDir, binary: c.binary, uid: j.uid, gid: j.gid, kernel: spec.kernel, initrd: spec.initrd, rootDisk: spec.rootDisk, workDisk: spec.workDisk };
    c.cleanups.add('remove jail', () => unjail(j, c.fcId));
    let res: JailResult;
    if (j.launch) res = await j.launch(req, { signal: c.signal });
    else if (j.config) res = await launchJailed(req, j.config, { signal: c.signal });
    else throw new BangerError('internal', 'jailer configured without a launcher or a jailer config');
    c.pid = res.pid;
    c.chrootDir = res.chrootDir;
    c.cleanups.add('kill jailed firecracker', () => c.deps.kill(launchedProcess(c)));
    // At once: a daemon killed from here on leaves the pid where `vm delete` finds it.
    await writeFile(c.pidFile, `${c.pid}\n`);
    await linkJailFiles(c, res);
    c.paths = { ...res.jailPaths };
  },
};

/** Short symlinks from the run dir into the chroot (the 108-byte socket limit), and the logs from the VM dir. */
async function linkJailFiles(c: LaunchContext, res: JailResult): Promise<void> {
  await symlink(res.apiSocket, c.apiSocket);
  await symlink(join(res.chrootDir, res.jailPaths.vsock), c.vsockSocket);
  // The VMM writes its output inside the chroot; the VM directory links to it until it exits.
  for (const [link, target] of [[c.spec.serialLog, res.logs.serial], [c.vmmLog, res.logs.vmm]] as const) {
    await rm(link, { force: true });
    await symlink(target, link);
  }
}

export async function unjail(j: JailerOptions, fcId: string): Promise<void> {
  if (j.unjail) await j.unjail(fcId);
  else if (j.config) await removeJail(fcId, j.config);
}

export const WaitApiSocket: LaunchHandler = {
  name: 'wait-api-socket',
  fn: (c) => waitReady(c),
};

/** Wait until GET / answers; end early (with the VMM's own words) if the process exits. */
async function waitReady(c: LaunchContext): Promise<void> {
  const { api, pid, exited, fcId, signal } = c;
  const readyTimeoutMs = c.deps.readyTimeoutMs;
  const deadline = Date.now() + readyTimeoutMs;
  let gone = false;
  void exited?.then(() => (gone = true));
  let last: unknown;
  for (;;) {
    if (signal?.aborted) throw new BangerError('aborted', 'launching Firecracker: aborted');
    if (gone || (await identifyFirecracker(pid, fcId)).id === 'gone') throw await exitedEarly(c);
    try {
      await api.describe({ timeoutMs: Math.max(200, Math.min(1000, deadline - Date.now())) });
      return;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) {
      throw new BangerError('timeout', `Firecracker's API socket ${api.socketPath} did not answer within ${readyTimeoutMs} ms: ${errorMessage(last)}`);
    }
    await sleep(20, signal);
  }
}

async function exitedEarly(c: LaunchContext): Promise<BangerError> {
  // /proc may show it gone (a zombie) before our exit event: it is our child, so the event is coming, but a
  // busy machine can take a while to deliver it.
  const ex = c.exited ? await Promise.race([c.exited, sleep(EXIT_EVENT_GRACE_MS).then(() => undefined)]) : undefined;
  const how = ex ? ` (${describeExit(ex).replace('exited with code', 'exit code')})` : '';
  const said = (await Promise.all([c.vmmLog, c.spec.serialLog].map((l) => tail(l)))).filter(Boolean).join('\n');
  return new BangerError('host', `Firecracker exited before its API socket answered${how}${said ? `: ${said}` : ''}`, 'see the VM\'s firecracker.log; Firecracker needs a usable /dev/kvm');
}

// ───────────────────────────── config: configure and boot ─────────────────────────────

export const MachineConfig: LaunchHandler = {
  name: 'machine-config',
  fn: (c) => c.api.put('/machine-config', { vcpu_count: c.spec.vcpus, mem_size_mib: c.spec.memoryMiB, smt: false } satisfies MachineConfiguration, { signal: c.signal }),
};

export const BootSourceHandler: LaunchHandler = {
  name: 'boot-source',
  fn: (c) =>
    c.api.put('/boot-source', { kernel_image_path: c.paths.kernel, boot_args: bootArgs(c.spec.cmdline), ...(c.paths.initrd ? { initrd_path: c.paths.initrd } : {}) } satisfies BootSource, { signal: c.signal }),
};

export const DriveRootfs: LaunchHandler = {
  name: 'drive-rootfs',
  fn: (c) => c.api.put('/drives/rootfs', { drive_id: 'rootfs', path_on_host: c.paths.rootDisk, is_root_device: true, is_read_only: false } satisfies Drive, { signal: c.signal }),
};

export const DriveWork: LaunchHandler = {
  name: 'drive-work',
  fn: (c) => c.api.put('/drives/work', { drive_id: 'work', path_on_host: c.paths.workDisk, is_root_device: false, is_read_only: false } satisfies Drive, { signal: c.signal }),
};

/** The VM's identity disk (identity-disk.ts), read-only; the guest finds it by the marker it starts with. */
export const DriveIdentity: LaunchHandler = {
  name: 'drive-identity',
  fn: (c) => c.api.put('/drives/identity', { drive_id: 'identity', path_on_host: c.paths.identityDisk!, is_root_device: false, is_read_only: true } satisfies Drive, { signal: c.signal }),
};

export const NetworkInterfaces: LaunchHandler = {
  name: 'network-interfaces',
  fn: (c) => c.api.put('/network-interfaces/eth0', { iface_id: 'eth0', host_dev_name: c.net.tap, guest_mac: c.net.mac.toLowerCase() } satisfies NetworkInterface, { signal: c.signal }),
};

export const VsockHandler: LaunchHandler = {
  name: 'vsock',
  fn: (c) => c.api.put('/vsock', { guest_cid: GUEST_CID, uds_path: c.paths.vsock } satisfies Vsock, { signal: c.signal }),
};

export const InstanceStart: LaunchHandler = {
  name: 'instance-start',
  fn: (c) => c.api.put('/actions', { action_type: 'InstanceStart' } satisfies InstanceActionInfo, { signal: c.signal, timeoutMs: Math.max(c.deps.requestTimeoutMs, 10_000) }),
};

/** Refuses, before the load, a Firecracker too old to put a restored VM's vsock socket anywhere but the source's path. */
export const CheckLoadVersion: LaunchHandler = {
  name: 'check-load-version',
  fn: async (c) => {
    const { vmm_version: v } = await c.api.describe({ signal: c.signal });
    if (restoresSnapshots(v)) return;
    const [major, minor] = SNAPSHOT_LOAD_MIN_VERSION;
    throw new BangerError(
      'unsupported',
      `Firecracker ${v} cannot restore a banger snapshot: its PUT /snapshot/load has no vsock_override, so the restored VM would bind the source VM's vsock socket`,
      `install Firecracker ${major}.${minor} or later (config key firecrackerBin, or $BANGER_FIRECRACKER_BIN)`,
    );
  },
};

/**
 * PUT /snapshot/load in place of the whole configuration: devices, memory and vCPU state come from the files. The
 * VM gets its own TAP and vsock socket; its drives are reopened at the paths the snapshot recorded, which the
 * caller points at this VM's own disks (see AnchorDrives).
 */
export const SnapshotLoad: LaunchHandler = {
  name: 'snapshot-load',
  fn: (c) => {
    const s = c.snapshot;
    if (!s) throw new BangerError('internal', 'snapshot-load handler without snapshot files');
    const body: SnapshotLoadParams = {
      snapshot_path: s.snapshotPath,
      mem_backend: { backend_type: 'File', backend_path: s.memFilePath },
      resume_vm: s.resume,
      network_overrides: [{ iface_id: 'eth0', host_dev_name: c.net.tap }],
      vsock_override: { uds_path: c.paths.vsock },
    };
    return c.api.put('/snapshot/load', body, { signal: c.signal, timeoutMs: Math.max(c.deps.requestTimeoutMs, 30_000) });
  },
};

/** The drives of a VM, by Firecracker drive id, as a launch attaches them. */
export type DrivePaths = { rootfs: string; work: string; identity?: string };

export const drivePaths = (p: { rootDisk: string; workDisk: string; identityDisk?: string }): DrivePaths => ({
  rootfs: p.rootDisk,
  work: p.workDisk,
  ...(p.identityDisk ? { identity: p.identityDisk } : {}),
});

/** PATCH /drives/{id} to each path: Firecracker reopens the drive there (the same file through a link: the guest sees nothing). */
export async function patchDrives(api: FirecrackerApi, drives: Partial<DrivePaths>, signal?: AbortSignal): Promise<void> {
  for (const [id, path] of Object.entries(drives)) if (path) await api.patch(`/drives/${id}`, { drive_id: id, path_on_host: path }, { signal });
}

/**
 * After a load, each drive is reopened at the VM's own path: the recorded path is a link the next restore of the
 * same snapshot points elsewhere, and a snapshot of this VM must record paths of its own.
 */
export const AnchorDrives: LaunchHandler = {
  name: 'anchor-drives',
  fn: (c) => patchDrives(c.api, drivePaths(c.paths), c.signal),
};

/** The default lists: boot from the spec, or (with `snapshot`) restore. */
export function defaultHandlers(opts: { jailed: boolean; snapshot: boolean; identityDisk?: boolean }): FirecrackerHandlers {
  const drives = [DriveRootfs, DriveWork, ...(opts.identityDisk ? [DriveIdentity] : [])];
  return {
    init: new HandlerList([ResolveBinary, PrepareDirs, opts.jailed ? Jail : Spawn, WaitApiSocket]),
    config: new HandlerList(opts.snapshot ? [CheckLoadVersion, SnapshotLoad, AnchorDrives] : [MachineConfig, BootSourceHandler, ...drives, NetworkInterfaces, VsockHandler, InstanceStart]),
  };
}

/** Runs init then config; on the first failure runs the cleanups and throws an error naming the handler. */
export async function runLaunch(c: LaunchContext, handlers: FirecrackerHandlers, log: (line: string) => void): Promise<FirecrackerProcess> {
  const label = `firecracker ${c.spec.id}`;
  const t0 = Date.now();
  try {
    await handlers.init.run(c, log, label);
    await handlers.config.run(c, log, label);
  } catch (e) {
    const step = (e as { handler?: string }).handler ?? 'launch';
    const cause = (e as { cause?: unknown }).cause ?? e;
    const failures = await c.cleanups.runAll();
    const suffix = failures.length ? ` (cleanup also failed: ${failures.join('; ')})` : '';
    const kind = cause instanceof BangerError ? cause.kind : 'host';
    const hint = cause instanceof BangerError ? cause.hint : undefined;
    throw new BangerError(kind, `Firecracker launch failed at step ${step}: ${errorMessage(cause)}${suffix}`, hint, { cause });
  }
  c.cleanups.release();
  log(`${label}: ${c.snapshot ? 'restored' : 'booted'} (pid ${c.pid}) in ${Date.now() - t0} ms`);
  return launchedProcess(c);
}
