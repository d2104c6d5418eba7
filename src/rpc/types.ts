/**
 * The shapes that cross the daemon socket: what each method answers and what its notifications carry. Plain
 * interfaces that import nothing from the daemon, the actors or the host layer, so that a client (the CLI,
 * the SDK in src/index.ts) can use them without loading any of that. The daemon builds these from its own
 * types (src/daemon/views.ts); the compiler checks that they agree.
 */

export type VmState = 'creating' | 'applyingWorkSeed' | 'booting' | 'restoring' | 'running' | 'snapshotting' | 'stopping' | 'stopped' | 'reconfiguring' | 'failed' | 'deleting' | 'deleted';
export type Vmm = 'firecracker' | 'qemu';
export type Accel = 'kvm' | 'tcg';
export type Net = 'tap' | 'user';
export type WorkspaceMode = 'shallow' | 'full_history' | 'full_copy';

export interface GitIdentity {
  name: string;
  email: string;
  source: 'host' | 'default';
}

export interface Isolation {
  egress: 'internet' | 'none';
  allowPeers: boolean;
  allow: string[];
}

export interface VmView {
  id: string;
  name: string;
  state: VmState;
  image: string;
  vmm: string;
  accel: string;
  net: string;
  vcpus: number;
  memoryMiB: number;
  diskBytes: number;
  guestIp: string | null;
  sshPort: number | null;
  pid: number | null;
  createdAt: string;
  error: { stage: string; message: string } | null;
  stopReason: string | null;
  /** The guest's git identity and whether it is the host's or banger's default (null: created before it was recorded). */
  gitIdentity: GitIdentity | null;
  /** A tap VM's isolation: what its guest may reach (user-net VMs: null). */
  isolation: Isolation | null;
  /** Published ports as `HOSTADDR:HOSTPORT:GUESTPORT`, open while the VM runs. */
  publish: string[];
  workspace?: { queued: number; running: string | null };
}

/** `vm.show`: the view plus where the VM's files are and what its disks really take. */
export interface VmDetail extends VmView {
  dir: string;
  serialLog: string;
  workDiskAllocatedBytes: number | null;
  rootDiskAllocatedBytes: number | null;
  /** The VM's guest sessions (issue 11), when they could be read. */
  sessions?: SessionView[];
  /** The guest's health, when it is running and answered. */
  health?: HealthView | null;
}

export interface ImageView {
  name: string;
  createdAt: string;
  kernel: string;
  vmlinux: string | null;
  initrd: string | null;
  rootfs: string;
  workSeed: string;
  sizeBytes: number;
  packages: number;
  builderVersion: number;
  usedBy: string[];
}

export interface PulledImage extends ImageView {
  /** false when the image was already present and nothing was built. */
  pulled: boolean;
}

export interface DaemonStatus {
  pid: number;
  socket: string;
  version: string;
  commit: string;
  uptimeSeconds: number;
  vms: number;
  home: string;
  running: number;
  rootHelper: { socket?: string; state: string; lastError: string | null; attempts: number } | null;
  tapPool: Array<{ tap: string; vmId: string | null }> | null;
  /** The live inspector's WebSocket address (`daemon start --inspect`), or null. */
  inspector: string | null;
  /** The warm pool per kind (config warmPool): its size, VMs ready to hand out, VMs starting. */
  warmPool?: Array<{ image: string; vcpus: number; memoryMiB: number; size: number; ready: number; starting: number }>;
}

export interface DaemonStopping {
  stopping: true;
  pid: number;
}

export interface DoctorCheck {
  name: string;
  status: 'ok' | 'warn' | 'fail';
  detail: string;
  fix?: string;
}

export interface DoctorReport {
  checks: DoctorCheck[];
  ok: boolean;
  /** What `--vmm auto --net auto` would pick here, e.g. "firecracker (kvm, net tap)" or "qemu (tcg)". */
  vmmAuto: string;
}

/** One row of a VM's lifecycle log (`vm.logs`, and streamed by `vm.logs --follow`). */
export interface LogRow {
  vmId: string;
  seq: number;
  time: string;
  stage: string;
  status: 'start' | 'done' | 'error' | 'info';
  durationMs?: number | null;
  message?: string | null;
}

/** `vm.logs` with serial: true. */
export interface SerialLog {
  serial: string;
}

/** One row of a VM's event log (`vm.events`). */
export interface EventRow {
  vmId: string;
  seq: number;
  time: string;
  actor: string;
  type: string;
  payload: unknown;
  from?: string | null;
  to?: string | null;
}

/** A live state transition, streamed by `inspect.subscribe`. */
export interface Transition {
  time: string;
  vmId: string;
  vmName: string;
  actor: string;
  event: string;
  from: string | null;
  to: string;
}

/** The first message `inspect.subscribe` streams: the VMs there are now. */
export interface InspectHello {
  type: 'hello';
  vms: Array<{ id: string; name: string; state: VmState }>;
}

export type InspectEvent = InspectHello | Transition;

/** How to reach a VM's sshd (`vm.ssh`). */
export interface SshTarget {
  host: string;
  port: number | null;
  user: string;
  identityFile: string;
  knownHostsFile: string;
  hostKeyAlias: string;
}

export interface PrepareResult {
  vmId: string;
  sourcePath: string;
  repoRoot: string;
  repoName: string;
  guestPath: string;
  mode: WorkspaceMode;
  readOnly: boolean;
  /** Whether a read-only bind mount backs readOnly (else only mode bits do). */
  readOnlyMount: boolean;
  /** The host's HEAD. */
  headCommit: string;
  /** The host's current branch (null when detached). */
  currentBranch: string | null;
  /** The branch checked out in the guest (null when the guest is detached). */
  branchName: string | null;
  /** The commit the guest's tree is based on: export against this. */
  baseCommit: string;
  preparedAt: string;
  bytesStreamed: number;
  /** Bytes that crossed the link into the guest. */
  bytesSent: number;
  /**
   * The workspace cache: "hit" (the VM was made from a cached work disk and the workspace in it checked out: only
   * the delta was sent), "miss" (streamed in full, then stored for next time), "off" (not a VM made with
   * --workspace, full_copy, or the cache is disabled).
   */
  cache: 'hit' | 'miss' | 'off';
  /** Things the caller should see, e.g. a copy-on-write clone that fell back to a full copy. */
  warnings?: string[];
  /** The guest path held this repository's workspace: only new objects and the host's delta were sent. */
  incremental: boolean;
}

/** One workspace cache entry (banger cache list). */
export interface CacheEntryView {
  key: string;
  sourcePath: string;
  headCommit: string;
  mode: WorkspaceMode;
  guestPath: string;
  image: string;
  /** Bytes it occupies on the host, and the disk's apparent size. */
  bytes: number;
  sizeBytes: number;
  createdAt: string;
  lastUsedAt: string;
  hits: number;
}

export interface ExportResult {
  guestPath: string;
  baseCommit: string;
  /** `git diff --binary` output, as UTF-8 text when it is valid UTF-8, else base64. */
  patch: string;
  patchEncoding: 'utf8' | 'base64';
  changedFiles: string[];
  hasChanges: boolean;
  /** The size of the patch in bytes. */
  patchBytes: number;
  /** Where the daemon wrote the patch, when the call gave `output` (then `patch` is empty). */
  output?: string;
}

/** Notifications the daemon sends while a request runs, tied to its id. */
export interface ProgressParams {
  requestId: number | string;
  stage: string;
  status: 'start' | 'done' | 'error' | 'info';
  ms?: number;
  detail?: string;
  bytes?: number;
}

// ---- guest sessions, exec and health (issue 11)
export type SessionState = 'running' | 'ended';

/** One session in the guest, as last seen. */
export interface SessionView {
  name: string;
  /** Its transient systemd unit in the guest. */
  unit: string;
  pipe: boolean;
  argv: string[];
  cwd: string | null;
  startedAt: string;
  state: SessionState;
  /** When ended: why (`exited with status 0`, `killed by signal TERM`, `the VM stopped`...). */
  endReason: string | null;
  exitCode: number | null;
  /** Bytes written so far to its stdout and stderr files (null when the guest could not be asked). */
  stdoutBytes: number | null;
  stderrBytes: number | null;
  /** Who holds the exclusive attach, if anyone. */
  attachedBy: string | null;
}

/** A chunk of a session's or a command's output. `data` is base64. */
export interface OutputChunk {
  stream: 'stdout' | 'stderr';
  data: string;
  /** Offset in the session's file after this chunk (sessions only). */
  offset?: number;
}

export interface SessionLogs {
  /** base64 */
  data: string;
  /** Where the next read starts. */
  offset: number;
}

export interface SessionSent {
  bytes: number;
  lines: number;
}

export interface ExecResultView {
  exitCode: number;
  signal: string | null;
  /** The command ran past its timeout and was stopped (exitCode is then timeout(1)'s 124). */
  timedOut: boolean;
}

/** The guest agent's GET /healthz (src/host/image/agent.ts), and how it was reached. */
export interface HealthView {
  ok: boolean;
  via: 'agent';
  /** QEMU: a virtio-serial port; Firecracker: vsock. */
  transport: 'virtio-serial' | 'vsock';
  uptimeSeconds: number;
  load: [number, number, number];
  memory: { totalKiB: number; availableKiB: number };
  /** Free and total bytes of the root filesystem and of the work disk (/root). */
  disk: { '/': { freeBytes: number; totalBytes: number }; '/root': { freeBytes: number; totalBytes: number } };
  sessionsRunning: number;
  checkedAt: string;
}

export interface SessionResults {
  'guest.session.start': SessionView;
  'guest.session.list': SessionView[];
  'guest.session.show': SessionView;
  'guest.session.send': SessionSent;
  /** Answers when the attach ends: detached by the client, or the session ended. Its first stream chunk, empty, says it was granted. */
  'guest.session.attach': { ended: boolean };
  'guest.session.logs': SessionLogs;
  'guest.session.kill': SessionView;
  'vm.exec': ExecResultView;
  /** accepted false: that exec has finished (or never was), the chunk went nowhere. */
  'vm.exec.input': { accepted: boolean };
  'vm.health': HealthView;
}

export interface SessionStreams {
  'guest.session.attach': OutputChunk;
  'guest.session.logs': OutputChunk;
  'vm.exec': OutputChunk;
}
// ---- end guest sessions

/** What each method answers. */
export interface Results extends SessionResults {
  'daemon.status': DaemonStatus;
  'daemon.stop': DaemonStopping;
  'doctor.run': DoctorReport;
  'image.pull': PulledImage;
  'image.import': ImageView;
  'image.list': ImageView[];
  'image.show': ImageView;
  'image.delete': { deleted: string };
  'vm.create': VmView;
  'vm.start': VmView;
  'vm.stop': VmView;
  'vm.restart': VmView;
  'vm.delete': VmView;
  'vm.set': VmView;
  'vm.wait': VmView;
  'vm.list': VmView[];
  'vm.show': VmDetail;
  'vm.events': EventRow[];
  /** The rows (streamed as they come, then [] with follow: true), or the serial console with serial: true. */
  'vm.logs': LogRow[] | SerialLog;
  'vm.ssh': SshTarget;
  'vm.workspace.prepare': PrepareResult;
  'vm.workspace.export': ExportResult;
  'cache.list': { budgetBytes: number; totalBytes: number; entries: CacheEntryView[] };
  'cache.prune': { removed: string[] };
  /** Answers only when the client goes away; everything it has to say is streamed. */
  'inspect.subscribe': null;
  // ---- snapshots, restore and fork (issue 12)
  'vm.snapshot': SnapshotView;
  'vm.restore': VmView;
  'vm.fork': ForkResult;
  'snapshot.list': SnapshotView[];
  'snapshot.show': SnapshotView;
  'snapshot.delete': { deleted: string };
}

/** A snapshot: where it came from, what it takes on disk, and who still needs it. */
export interface SnapshotView {
  id: string;
  name: string;
  vmId: string;
  vmName: string;
  createdAt: string;
  image: string;
  vcpus: number;
  memoryMiB: number;
  dir: string;
  /** The saved memory and device state. */
  stateBytes: number;
  /** Blocks the snapshot's own files take (its disk layers are shared with its VM by hard link). */
  allocatedBytes: number;
  /** Milliseconds per phase of the save. */
  timings: Record<string, number>;
  /** Snapshots this one's disk layers are backed by. */
  chain: string[];
  /** Live VMs and snapshots whose disks are backed by it: while there are any it cannot be deleted. */
  users: { vms: string[]; snapshots: string[] };
}

export interface ForkResult {
  /** The snapshot the forks start from (taken just now when a VM was forked). */
  snapshot: SnapshotView;
  forks: VmView[];
}

/** What the methods that stream send as `stream` notifications. */
export interface Streams extends SessionStreams {
  'vm.logs': LogRow;
  'inspect.subscribe': InspectEvent;
}
