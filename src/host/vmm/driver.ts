/**
 * What a VMM driver is, shared by QEMU (qemu/) and Firecracker (firecracker/). Small interfaces in lima's
 * driver.go style: every driver has the lifecycle; capabilities that only some VMMs have (resuming a guest
 * paused on an I/O error, snapshots) are interfaces of their own, found with the `is…` guards below.
 */
import type { Runner } from '../exec/runner.js';
import type { PublishedPort } from '../../rpc/publish.js';

export type UserNetBackend = 'isolated' | 'slirp' | 'passt';

export interface LaunchSpec {
  id: string;
  vmDir: string;
  runDir: string;
  kernel: string;
  initrd?: string;
  cmdline: string;
  rootDisk: string;
  /** The root disk's format: 'qcow2' for an overlay on the image (QEMU only; Firecracker takes raw), default raw. */
  rootFormat?: 'raw' | 'qcow2';
  workDisk: string;
  /** The work disk's format: 'qcow2' once a snapshot froze it as a layer (QEMU only), default raw. */
  workFormat?: 'raw' | 'qcow2';
  /** The VM's identity disk (src/host/disk/identity-disk.ts), read-only, serial banger-identity (QEMU only). */
  identityDisk?: string;
  /**
   * QEMU: the bulk port beside the guest agent's (src/host/guest/bulk.ts). Default true; false restores a snapshot
   * saved before the port existed (QEMU loads a state only into the same set of ports).
   */
  bulkPort?: boolean;
  /** QEMU: start with `-incoming defer`, waiting for a saved state (a snapshot's) instead of booting. */
  incoming?: boolean;
  vcpus: number;
  memoryMiB: number;
  accel: 'kvm' | 'tcg';
  /** `publish`: host ports forwarded to the guest (user net: passt's forwards; tap: the daemon proxies them). */
  /**
   * User net's `backend` (config `userNet`): isolated (the default: QEMU's slirp in a namespace of its own, egress
   * through slirp4netns, src/host/net/usernet-ns.ts), slirp (reaches the host's loopback) or passt.
   * `egress: 'none'`: slirp with restrict=on, only the forwards reach the guest, the guest reaches nothing.
   */
  net: { mode: 'user'; sshPort: number; publish?: PublishedPort[]; backend?: UserNetBackend; egress?: 'internet' | 'none' } | { mode: 'tap'; tap: string; mac: string };
  serialLog: string;
  /** QEMU block cache mode for both disks. Default 'writeback' (flushes from the guest are honoured). */
  diskCache?: 'writeback' | 'none' | 'unsafe';
}

export interface VmmProcess {
  pid: number;
  /** QEMU: the command QMP socket; Firecracker: the API socket. Also identifies the process. */
  qmpSocket: string;
}

export type VmmState = 'running' | 'paused' | 'shutdown' | 'gone' | 'broken';

export interface VmmExit {
  reason: string;
  /** From QEMU's SHUTDOWN event when one was seen, e.g. 'guest-shutdown', 'guest-reset', 'host-signal'. */
  shutdownReason?: string;
  /** True when the guest itself asked to shut down / reset. */
  guest?: boolean;
  /**
   * Set when waitExit returned because QEMU paused the guest on a disk error (werror=enospc): the process is
   * still there, stopped. `reason` then says what happened and what to do.
   */
  ioError?: IoErrorStop;
}

/** What QEMU said about the disk error it paused the guest for (BLOCK_IO_ERROR, query-block's io-status). */
export interface IoErrorStop {
  /** The drive id: 'root' or 'work'. */
  device?: string;
  operation?: string;
  /** The host's disk is full (ENOSPC). */
  nospace: boolean;
  /** The host error as QEMU words it, e.g. "No space left on device". */
  detail?: string;
}

export type StopOutcome = 'graceful' | 'killed' | 'already-gone';

/** Start, stop, observe: what every VMM does. */
export interface VmmLifecycle {
  kind: 'qemu' | 'firecracker';
  launch(spec: LaunchSpec, opts: { signal?: AbortSignal; runner?: Runner }): Promise<VmmProcess>;
  stop(proc: VmmProcess, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<StopOutcome>;
  kill(proc: VmmProcess): Promise<void>;
  status(proc: VmmProcess): Promise<{ state: VmmState; reasons: string[] }>;
  waitExit(proc: VmmProcess, signal: AbortSignal): Promise<VmmExit>;
}

/** Resumes a paused guest (QEMU: `cont`, which retries the I/O that failed; Firecracker: PATCH /vm Resumed). */
export interface Resumable {
  resume(proc: VmmProcess): Promise<void>;
}

/** Where a snapshot lives: the VM state file and the guest memory file. */
export interface SnapshotFiles {
  snapshotPath: string;
  memFilePath: string;
}

/** Saving a running guest to files and starting a new VMM from them. */
export interface Snapshottable {
  /** Pauses the guest and writes its state and memory; the guest stays paused (resume it, or stop it). */
  createSnapshot(proc: VmmProcess, files: SnapshotFiles, opts?: { signal?: AbortSignal }): Promise<void>;
  /** Starts a fresh VMM for `spec` and loads the snapshot into it; `resume` runs the guest at once. */
  loadSnapshot(spec: LaunchSpec, files: SnapshotFiles, opts?: { signal?: AbortSignal; resume?: boolean }): Promise<VmmProcess>;
}

/**
 * A driver: the lifecycle, plus the capabilities it may have. They are optional members so that a caller holding
 * any driver can ask (`isResumable(d)`), and a driver that has one declares it with `VmmLifecycle & Resumable`.
 */
export interface VmmDriver extends VmmLifecycle, Partial<Resumable>, Partial<Snapshottable> {}

export function isResumable<D extends VmmDriver>(d: D): d is D & Resumable {
  return typeof d.resume === 'function';
}

export function isSnapshottable<D extends VmmDriver>(d: D): d is D & Snapshottable {
  return typeof d.createSnapshot === 'function' && typeof d.loadSnapshot === 'function';
}
