/**
 * A fake Firecracker API server on a Unix socket, as strict as Firecracker's swagger spec
 * (src/firecracker/swagger/firecracker.yaml): only documented endpoints and methods, JSON bodies checked field by
 * field (unknown fields rejected, types checked, required fields enforced), 204 on success, 400 with
 * `{"fault_message": ...}` on errors, pre-boot-only endpoints refused after InstanceStart, post-boot-only ones
 * before it. Files named in bodies must exist (kernel, initrd, drives), as Firecracker opens them.
 * Every request is recorded.
 *
 * The vsock device's host side behaves as Firecracker's docs/vsock.md describes for host-initiated connections:
 * Firecracker listens on `uds_path`; the host connects and sends `CONNECT <port>\n`; when something in the guest
 * listens on that port (here: `listenInGuest`), Firecracker answers `OK <host-side port>\n` and forwards the
 * connection, else it closes it. A line that is not `CONNECT <u32>` within 32 bytes also closes it.
 *
 * Snapshots as Firecracker restores them: PUT /snapshot/load reopens every drive at the path recorded in the
 * snapshot (a missing file fails the load) and binds the vsock socket at the recorded path, or at `vsock_override`'s,
 * which only Firecracker 1.16 and later knows (older ones refuse it as an unknown field). The files a request made
 * Firecracker open are recorded, resolved (`opened`), so a test can tell whose disk a restored VM writes to.
 */
import { existsSync, readFileSync, realpathSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createNetServer, type Server as NetServer, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { z } from 'zod';

export interface RecordedRequest {
  method: string;
  path: string;
  /** Parsed JSON body, or the raw text when it was not JSON, or undefined when empty. */
  body: unknown;
  status: number;
  response?: unknown;
  /** The files this request made Firecracker open (drive id or `vsock` → resolved path). */
  opened?: Record<string, string>;
  at: number;
}

export interface FakeFirecrackerOptions {
  socketPath: string;
  /** Instance id (Firecracker's --id). Default "anonymous-instance". */
  id?: string;
  vmmVersion?: string;
  /** Resolve paths from bodies inside this directory (what the jailer's chroot does). */
  chroot?: string;
  /** Answer 204 to SendCtrlAltDel but never act on it (a guest that ignores the key press). */
  ignoreCtrlAltDel?: boolean;
  /** Called after a SendCtrlAltDel was accepted and acted upon (the binary exits here). */
  onCtrlAltDel?: () => void;
  /** Called after InstanceStart succeeded. */
  onStart?: () => void;
  /** Called for every request once its answer is decided, before the answer is sent: whoever got an answer can rely
   *  on the request having been recorded. */
  onRequest?: (r: RecordedRequest) => void;
}

type State = 'Not started' | 'Running' | 'Paused';

class Fault extends Error {
  constructor(
    message: string,
    readonly status = 400,
  ) {
    super(message);
  }
}

const AFTER_START = 'The requested operation is not supported after starting the microVM.';
const BEFORE_START = 'The requested operation is not supported before starting the microVM.';
const ID_RE = /^[A-Za-z0-9_]{1,64}$/;
const DEFAULT_VERSION = '1.7.0-fake';

/** Is a Firecracker version string (`1.16.0`, `v1.16.0-dev`) at least major.minor? */
function versionAtLeast(version: string, major: number, minor: number): boolean {
  const m = /^v?(\d+)\.(\d+)/.exec(version);
  return !!m && (Number(m[1]) > major || (Number(m[1]) === major && Number(m[2]) >= minor));
}

// ───────────────────────────── schemas (definitions in the swagger spec) ─────────────────────────────

const int = (min?: number, max?: number) => {
  let s = z.number().int();
  if (min !== undefined) s = s.min(min);
  if (max !== undefined) s = s.max(max);
  return s;
};
const TokenBucket = z.strictObject({ size: int(0), refill_time: int(0), one_time_burst: int(0).optional() });
const RateLimiter = z.strictObject({ bandwidth: TokenBucket.optional(), ops: TokenBucket.optional() });

const MachineConfiguration = z.strictObject({
  vcpu_count: int(1, 32),
  mem_size_mib: int(1),
  smt: z.boolean().optional(),
  track_dirty_pages: z.boolean().optional(),
  cpu_template: z.enum(['C3', 'T2', 'T2S', 'T2CL', 'T2A', 'V1N1', 'None']).optional(),
  huge_pages: z.enum(['None', 'Transparent', '2M']).optional(),
});
const BootSource = z.strictObject({ kernel_image_path: z.string(), boot_args: z.string().optional(), initrd_path: z.string().optional() });
const Drive = z.strictObject({
  drive_id: z.string(),
  partuuid: z.string().optional(),
  is_root_device: z.boolean(),
  cache_type: z.enum(['Unsafe', 'Writeback']).optional(),
  is_read_only: z.boolean().optional(),
  path_on_host: z.string().optional(),
  rate_limiter: RateLimiter.optional(),
  io_engine: z.enum(['Sync', 'Async']).optional(),
  socket: z.string().optional(),
});
const PartialDrive = z.strictObject({ drive_id: z.string(), path_on_host: z.string().optional(), rate_limiter: RateLimiter.optional() });
const NetworkInterface = z.strictObject({
  iface_id: z.string(),
  host_dev_name: z.string(),
  guest_mac: z.string().optional(),
  mtu: int(68, 65535).optional(),
  rx_rate_limiter: RateLimiter.optional(),
  tx_rate_limiter: RateLimiter.optional(),
});
const PartialNetworkInterface = z.strictObject({ iface_id: z.string(), rx_rate_limiter: RateLimiter.optional(), tx_rate_limiter: RateLimiter.optional() });
const Vsock = z.strictObject({ guest_cid: int(3), uds_path: z.string(), vsock_id: z.string().optional() });
const InstanceActionInfo = z.strictObject({ action_type: z.enum(['FlushMetrics', 'InstanceStart', 'SendCtrlAltDel']) });
const Logger = z.strictObject({
  level: z
    .string()
    .refine((l) => ['error', 'warning', 'info', 'debug', 'trace', 'off'].includes(l.toLowerCase()), { message: 'unknown level' })
    .optional(),
  log_path: z.string().optional(),
  show_level: z.boolean().optional(),
  show_log_origin: z.boolean().optional(),
  module: z.string().optional(),
});
const Metrics = z.strictObject({ metrics_path: z.string() });
const Vm = z.strictObject({ state: z.enum(['Paused', 'Resumed']) });
const EntropyDevice = z.strictObject({ rate_limiter: RateLimiter.optional() });
const SerialDevice = z.strictObject({ serial_out_path: z.string().optional(), rate_limiter: TokenBucket.optional() });
const SnapshotCreateParams = z.strictObject({ mem_file_path: z.string(), snapshot_path: z.string(), snapshot_type: z.enum(['Full', 'Diff']).optional() });
const MemoryBackend = z.strictObject({ backend_type: z.enum(['File', 'Uffd']), backend_path: z.string() });
const SnapshotLoadParams = z.strictObject({
  enable_diff_snapshots: z.boolean().optional(),
  track_dirty_pages: z.boolean().optional(),
  mem_file_path: z.string().optional(),
  mem_backend: MemoryBackend.optional(),
  snapshot_path: z.string(),
  resume_vm: z.boolean().optional(),
  network_overrides: z.array(z.strictObject({ iface_id: z.string(), host_dev_name: z.string() })).optional(),
  vsock_override: z.strictObject({ uds_path: z.string() }).optional(),
  clock_realtime: z.boolean().optional(),
});
/** What the fake writes into a snapshot file: its configuration, so that a load restores it. */
const SNAPSHOT_MAGIC = 'fake-firecracker-snapshot/1';

function deserialize<T>(schema: z.ZodType<T>, body: unknown): T {
  if (body === undefined) throw new Fault('The request body is empty.');
  const r = schema.safeParse(body);
  if (r.success) return r.data;
  const detail = r.error.issues
    .map((i) => {
      const at = i.path.length ? ` at ${i.path.join('.')}` : '';
      if (i.code === 'unrecognized_keys') return `unknown field ${i.keys.map((k) => `\`${k}\``).join(', ')}${at}`;
      if (i.code === 'invalid_type') return `invalid type${at}: expected ${i.expected}`;
      return `${i.message}${at}`;
    })
    .join('; ');
  throw new Fault(`An error occurred when deserializing the json body of a request: ${detail}.`);
}

// ───────────────────────────── the server ─────────────────────────────

export class FakeFirecracker {
  readonly requests: RecordedRequest[] = [];
  state: State = 'Not started';
  readonly id: string;
  machineConfig: z.infer<typeof MachineConfiguration> = { vcpu_count: 1, mem_size_mib: 128, smt: false, track_dirty_pages: false, huge_pages: 'None' };
  bootSource?: z.infer<typeof BootSource>;
  readonly drives = new Map<string, z.infer<typeof Drive>>();
  readonly ifaces = new Map<string, z.infer<typeof NetworkInterface>>();
  vsock?: z.infer<typeof Vsock>;
  logger?: z.infer<typeof Logger>;
  metrics?: z.infer<typeof Metrics>;
  entropy?: z.infer<typeof EntropyDevice>;
  serial?: z.infer<typeof SerialDevice>;
  private server: Server;
  /** What the request being handled opened, for its record. */
  private opened?: Record<string, string>;
  private vsockListener?: NetServer;
  private vsockHostPath?: string;
  /** Guest-side vsock listeners by port: what a host-initiated CONNECT reaches. */
  private readonly guestListeners = new Map<number, (sock: Socket) => void>();
  /** Firecracker numbers the host side of forwarded connections from 2^30 up. */
  private nextHostPort = 2 ** 30;
  /** Every CONNECT line received on the vsock socket, and whether it was forwarded. */
  readonly vsockConnects: Array<{ line: string; forwarded: boolean }> = [];

  constructor(readonly options: FakeFirecrackerOptions) {
    this.id = options.id ?? 'anonymous-instance';
    this.server = createServer((req, res) => void this.handle(req, res));
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.options.socketPath, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
  }

  async close(): Promise<void> {
    this.server.closeAllConnections?.();
    await new Promise<void>((r) => this.server.close(() => r()));
    if (this.vsockListener) await new Promise<void>((r) => this.vsockListener!.close(() => r()));
  }

  /** The requests for one method and path, e.g. ('PUT', '/drives/rootfs'). */
  find(method: string, path: string): RecordedRequest[] {
    return this.requests.filter((r) => r.method === method && r.path === path);
  }

  /** A path from a request body as this process sees it (inside the chroot when one is set). */
  private host(p: string): string {
    return this.options.chroot ? join(this.options.chroot, p) : p;
  }

  private mustBeFile(p: string, what: string): void {
    let ok = false;
    try {
      ok = statSync(this.host(p)).isFile();
    } catch {
      ok = false;
    }
    if (!ok) throw new Fault(`${what}: No such file or directory (os error 2): ${p}`);
  }

  private preBoot(): void {
    if (this.state !== 'Not started') throw new Fault(AFTER_START);
  }

  private postBoot(): void {
    if (this.state === 'Not started') throw new Fault(BEFORE_START);
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const text = Buffer.concat(chunks).toString('utf8');
    const method = req.method ?? 'GET';
    const path = (req.url ?? '/').split('?')[0];
    let body: unknown;
    let status = 204;
    let response: unknown;
    this.opened = undefined;
    try {
      if (text.trim()) {
        try {
          body = JSON.parse(text);
        } catch (e) {
          body = text;
          throw new Fault(`An error occurred when deserializing the json body of a request: ${(e as Error).message}.`);
        }
      }
      response = this.route(method, path, body);
      status = response === undefined ? 204 : 200;
    } catch (e) {
      status = e instanceof Fault ? e.status : 500;
      response = { fault_message: e instanceof Error ? e.message : String(e) };
    }
    const rec: RecordedRequest = { method, path, body, status, response, ...(this.opened ? { opened: this.opened } : {}), at: Date.now() };
    this.requests.push(rec);
    this.options.onRequest?.(rec);
    if (status === 204) {
      res.writeHead(204, { Server: 'Firecracker API' });
      res.end();
    } else {
      const payload = JSON.stringify(response);
      res.writeHead(status, { Server: 'Firecracker API', 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(payload) });
      res.end(payload);
    }
    if (method === 'PUT' && path === '/actions' && status === 204) {
      const action = (body as { action_type: string }).action_type;
      if (action === 'SendCtrlAltDel' && !this.options.ignoreCtrlAltDel) setImmediate(() => this.options.onCtrlAltDel?.());
      if (action === 'InstanceStart') setImmediate(() => this.options.onStart?.());
    }
  }

  /** Returns the JSON answer of a GET (200), or undefined for 204. Throws Fault. */
  private route(method: string, path: string, body: unknown): unknown {
    const key = `${method} ${path}`;
    const invalid = () => new Fault(`Invalid request method and/or path: ${method} ${path}.`);
    const drive = /^\/drives\/([^/]+)$/.exec(path);
    const iface = /^\/network-interfaces\/([^/]+)$/.exec(path);

    if (drive) {
      const id = decodeURIComponent(drive[1]);
      if (method === 'PUT') return this.putDrive(id, body);
      if (method === 'PATCH') return this.patchDrive(id, body);
      throw invalid();
    }
    if (iface) {
      const id = decodeURIComponent(iface[1]);
      if (method === 'PUT') return this.putIface(id, body);
      if (method === 'PATCH') {
        const b = deserialize(PartialNetworkInterface, body);
        if (b.iface_id !== id) throw new Fault('The id from the path does not match the id from the body!');
        this.postBoot();
        if (!this.ifaces.has(id)) throw new Fault(`Invalid network interface ID - not found: ${id}`);
        return undefined;
      }
      throw invalid();
    }

    switch (key) {
      case 'GET /':
        return { id: this.id, state: this.state, vmm_version: this.version, app_name: 'Firecracker' };
      case 'GET /version':
        return { firecracker_version: this.version };
      case 'GET /machine-config':
        return this.machineConfig;
      case 'PUT /machine-config': {
        const b = deserialize(MachineConfiguration, body);
        this.preBoot();
        this.checkMachine(b);
        this.machineConfig = { smt: false, track_dirty_pages: false, huge_pages: 'None', ...b };
        return undefined;
      }
      case 'PATCH /machine-config': {
        const b = deserialize(MachineConfiguration.partial(), body);
        this.preBoot();
        const merged = { ...this.machineConfig, ...b };
        this.checkMachine(merged);
        this.machineConfig = merged;
        return undefined;
      }
      case 'PUT /boot-source': {
        const b = deserialize(BootSource, body);
        this.preBoot();
        this.mustBeFile(b.kernel_image_path, 'Cannot open kernel image');
        if (b.initrd_path !== undefined) this.mustBeFile(b.initrd_path, 'Cannot open initrd image');
        this.bootSource = b;
        return undefined;
      }
      case 'PUT /vsock': {
        const b = deserialize(Vsock, body);
        this.preBoot();
        this.bindVsock(b.uds_path, 'Cannot create vsock device');
        this.vsock = b;
        return undefined;
      }
      case 'PUT /actions': {
        const b = deserialize(InstanceActionInfo, body);
        return this.action(b.action_type);
      }
      case 'PUT /logger': {
        const b = deserialize(Logger, body);
        this.preBoot();
        if (b.log_path !== undefined && !existsSync(this.host(b.log_path))) throw new Fault(`Failed to open target file: No such file or directory (os error 2)`);
        this.logger = b;
        return undefined;
      }
      case 'PUT /metrics': {
        const b = deserialize(Metrics, body);
        this.preBoot();
        if (this.metrics) throw new Fault('Reinitialization of metrics not allowed.');
        this.metrics = b;
        return undefined;
      }
      case 'PATCH /vm': {
        const b = deserialize(Vm, body);
        this.postBoot();
        this.state = b.state === 'Paused' ? 'Paused' : 'Running';
        return undefined;
      }
      case 'GET /vm/config':
        return {
          'boot-source': this.bootSource,
          drives: [...this.drives.values()],
          'machine-config': this.machineConfig,
          'network-interfaces': [...this.ifaces.values()],
          ...(this.vsock ? { vsock: this.vsock } : {}),
          ...(this.logger ? { logger: this.logger } : {}),
          ...(this.metrics ? { metrics: this.metrics } : {}),
          ...(this.entropy ? { entropy: this.entropy } : {}),
        };
      case 'PUT /entropy': {
        const b = deserialize(EntropyDevice, body);
        this.preBoot();
        this.entropy = b;
        return undefined;
      }
      case 'PUT /snapshot/create':
        return this.snapshotCreate(body);
      case 'PUT /snapshot/load':
        return this.snapshotLoad(body);
      case 'PUT /serial': {
        const b = deserialize(SerialDevice, body);
        this.preBoot();
        this.serial = b;
        return undefined;
      }
    }
    // Documented, but not modelled here: say so instead of pretending.
    const documented = new Set([
      'GET /balloon', 'PUT /balloon', 'PATCH /balloon', 'GET /balloon/statistics', 'PATCH /balloon/statistics',
      'PATCH /balloon/hinting/start', 'GET /balloon/hinting/status', 'PATCH /balloon/hinting/stop', 'PUT /cpu-config',
      'PUT /mmds', 'PATCH /mmds', 'GET /mmds', 'PUT /mmds/config', 'PUT /hotplug/memory', 'PATCH /hotplug/memory',
      'GET /hotplug/memory',
    ]);
    if (documented.has(key) || /^\/pmem\/[^/]+$/.test(path)) throw new Fault(`fake firecracker does not model ${method} ${path}`, 501);
    throw invalid();
  }

  /** Firecracker: the microVM must be paused; a Diff snapshot needs dirty page tracking; the files' directory must exist. */
  private snapshotCreate(body: unknown): undefined {
    const b = deserialize(SnapshotCreateParams, body);
    this.postBoot();
    if (this.state !== 'Paused') throw new Fault('Create snapshot error: Cannot save the microVM state: the microVM is not paused.');
    if (b.snapshot_type === 'Diff' && !this.machineConfig.track_dirty_pages) {
      throw new Fault('Create snapshot error: Diff snapshots require dirty page tracking (track_dirty_pages) to be enabled.');
    }
    for (const p of [b.snapshot_path, b.mem_file_path]) {
      if (!existsSync(dirname(this.host(p)))) throw new Fault(`Create snapshot error: Cannot open snapshot file: No such file or directory (os error 2): ${p}`);
    }
    const config = { machineConfig: this.machineConfig, bootSource: this.bootSource, drives: [...this.drives.values()], ifaces: [...this.ifaces.values()], vsock: this.vsock };
    writeFileSync(this.host(b.snapshot_path), JSON.stringify({ magic: SNAPSHOT_MAGIC, id: this.id, config }));
    writeFileSync(this.host(b.mem_file_path), Buffer.alloc(4096));
    return undefined;
  }

  private get version(): string {
    return this.options.vmmVersion ?? DEFAULT_VERSION;
  }

  /** Firecracker binds and listens on uds_path for host-initiated connections: the path must be free. */
  private bindVsock(udsPath: string, what: string): void {
    const host = this.host(udsPath);
    if (!existsSync(dirname(host))) throw new Fault(`${what}: Error binding to the host-side Unix socket: No such file or directory (os error 2): ${udsPath}`);
    if (this.vsockHostPath === host) return;
    if (existsSync(host)) throw new Fault(`${what}: Error binding to the host-side Unix socket: Address in use (os error 98): ${udsPath}`);
    this.vsockListener?.close();
    this.vsockListener = createNetServer((sock) => this.vsockConnection(sock)).listen(host);
    this.vsockHostPath = host;
  }

  /** Opens a drive's file as Firecracker does (the path as given, symlinks followed) and records which file it was. */
  private openDrive(id: string, path: string, what: string): void {
    this.mustBeFile(path, what);
    this.opened = { ...this.opened, [id]: realpathSync(this.host(path)) };
  }

  /**
   * Firecracker: pre-boot only, and only on a microVM nothing was configured on; exactly one memory backend. The
   * devices come back from the snapshot: every drive reopened at its recorded path, the vsock bound at its recorded
   * path (or vsock_override's, from 1.16 on), the TAPs by name (or network_overrides').
   */
  private snapshotLoad(body: unknown): undefined {
    const b = deserialize(SnapshotLoadParams, body);
    if (b.vsock_override && !versionAtLeast(this.version, 1, 16)) {
      throw new Fault('An error occurred when deserializing the json body of a request: unknown field `vsock_override`.');
    }
    this.preBoot();
    if (this.bootSource || this.drives.size || this.ifaces.size || this.vsock) throw new Fault('Loading a microVM snapshot not allowed after configuring boot-specific resources.');
    if ((b.mem_file_path === undefined) === (b.mem_backend === undefined)) {
      throw new Fault('An error occurred when deserializing the json body of a request: either `mem_backend` or `mem_file_path` must be present, not both.');
    }
    if (b.mem_backend?.backend_type === 'Uffd') throw new Fault('fake firecracker does not model the Uffd memory backend', 501);
    this.mustBeFile(b.snapshot_path, 'Load snapshot error: Cannot open snapshot file');
    this.mustBeFile(b.mem_file_path ?? b.mem_backend!.backend_path, 'Load snapshot error: Cannot open the memory file');
    let saved: { magic?: string; config?: { machineConfig: FakeFirecracker['machineConfig']; bootSource?: FakeFirecracker['bootSource']; drives: Array<z.infer<typeof Drive>>; ifaces: Array<z.infer<typeof NetworkInterface>>; vsock?: FakeFirecracker['vsock'] } };
    try {
      saved = JSON.parse(readFileSync(this.host(b.snapshot_path), 'utf8'));
    } catch {
      saved = {};
    }
    if (saved.magic !== SNAPSHOT_MAGIC || !saved.config) throw new Fault('Load snapshot error: Cannot deserialize the microVM state: invalid snapshot file.');
    const c = saved.config;
    for (const o of b.network_overrides ?? []) {
      const n = c.ifaces.find((i) => i.iface_id === o.iface_id);
      if (!n) throw new Fault(`Load snapshot error: Invalid network override: no interface ${o.iface_id} in the snapshot.`);
      n.host_dev_name = o.host_dev_name;
    }
    if (b.vsock_override && !c.vsock) throw new Fault('Load snapshot error: Invalid vsock override: the snapshot has no vsock device.');
    for (const d of c.drives) {
      if (d.path_on_host !== undefined) this.openDrive(d.drive_id, d.path_on_host, `Load snapshot error: Block: Virtio backend error: Error manipulating the backing file (drive ${d.drive_id})`);
    }
    const vsock = b.vsock_override && c.vsock ? { ...c.vsock, uds_path: b.vsock_override.uds_path } : c.vsock;
    if (vsock) {
      this.bindVsock(vsock.uds_path, 'Load snapshot error: Vsock');
      this.opened = { ...this.opened, vsock: this.host(vsock.uds_path) };
    }
    this.machineConfig = c.machineConfig;
    this.bootSource = c.bootSource;
    for (const d of c.drives) this.drives.set(d.drive_id, d);
    for (const n of c.ifaces) this.ifaces.set(n.iface_id, n);
    this.vsock = vsock;
    this.state = b.resume_vm ? 'Running' : 'Paused';
    return undefined;
  }

  private checkMachine(m: z.infer<typeof MachineConfiguration>): void {
    if (m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 !== 0) throw new Fault('The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.');
    if (m.huge_pages === '2M' && m.mem_size_mib % 2 !== 0) throw new Fault('The memory size (MiB) is either 0, or not a multiple of the configured page size.');
  }

  private putDrive(id: string, body: unknown): undefined {
    const b = deserialize(Drive, body);
    if (b.drive_id !== id) throw new Fault('The id from the path does not match the id from the body!');
    if (!ID_RE.test(id)) throw new Fault(`Invalid ID: ${id}: only alphanumeric characters and '_' are allowed, 64 at most.`);
    this.preBoot();
    if (b.socket !== undefined) {
      if (b.path_on_host !== undefined || b.is_read_only !== undefined) throw new Fault('Unable to create the block device: vhost-user-block takes neither path_on_host nor is_read_only.');
    } else {
      if (b.path_on_host === undefined) throw new Fault('Unable to create the block device: path_on_host is required for a virtio-block device.');
      if (b.is_read_only === undefined) throw new Fault('Unable to create the block device: is_read_only is required for a virtio-block device.');
      this.mustBeFile(b.path_on_host, 'Unable to create the block device: BackingFile(Os { code: 2, kind: NotFound, message: "No such file or directory" }');
    }
    if (b.is_root_device) {
      for (const [other, d] of this.drives) if (other !== id && d.is_root_device) throw new Fault('A root block device already exists!');
    }
    this.drives.set(id, b);
    return undefined;
  }

  private patchDrive(id: string, body: unknown): undefined {
    const b = deserialize(PartialDrive, body);
    if (b.drive_id !== id) throw new Fault('The id from the path does not match the id from the body!');
    this.postBoot();
    const d = this.drives.get(id);
    if (!d) throw new Fault(`Invalid block device ID: ${id}`);
    if (b.path_on_host !== undefined) {
      this.openDrive(id, b.path_on_host, 'Unable to patch the block device');
      d.path_on_host = b.path_on_host;
    }
    return undefined;
  }

  private putIface(id: string, body: unknown): undefined {
    const b = deserialize(NetworkInterface, body);
    if (b.iface_id !== id) throw new Fault('The id from the path does not match the id from the body!');
    if (!ID_RE.test(id)) throw new Fault(`Invalid ID: ${id}: only alphanumeric characters and '_' are allowed, 64 at most.`);
    this.preBoot();
    if (!b.host_dev_name || b.host_dev_name.length > 15) throw new Fault(`Could not create the network device: Open tap device failed: Invalid interface name: ${b.host_dev_name}`);
    if (b.guest_mac !== undefined && !/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/.test(b.guest_mac)) {
      throw new Fault(`An error occurred when deserializing the json body of a request: invalid MAC address: ${b.guest_mac}.`);
    }
    for (const [other, n] of this.ifaces) {
      if (other === id) continue;
      if (n.host_dev_name === b.host_dev_name) throw new Fault(`The host device name ${b.host_dev_name} is already in use.`);
      if (b.guest_mac && n.guest_mac?.toLowerCase() === b.guest_mac.toLowerCase()) throw new Fault(`The MAC address ${b.guest_mac} is already in use.`);
    }
    this.ifaces.set(id, b);
    return undefined;
  }

  private action(type: 'FlushMetrics' | 'InstanceStart' | 'SendCtrlAltDel'): undefined {
    switch (type) {
      case 'InstanceStart':
        this.preBoot();
        if (!this.bootSource) throw new Fault('Cannot start microvm that was not configured: the boot source (kernel) is missing.');
        this.mustBeFile(this.bootSource.kernel_image_path, 'Cannot start microvm: cannot open kernel image');
        if (this.bootSource.initrd_path !== undefined) this.mustBeFile(this.bootSource.initrd_path, 'Cannot start microvm: cannot open initrd image');
        for (const d of this.drives.values()) if (d.path_on_host !== undefined) this.mustBeFile(d.path_on_host, `Cannot start microvm: drive ${d.drive_id}`);
        this.state = 'Running';
        return undefined;
      case 'SendCtrlAltDel':
        this.postBoot();
        return undefined;
      case 'FlushMetrics':
        if (!this.metrics) throw new Fault('The metrics system was not initialized.');
        return undefined;
    }
  }

  /** Something in the guest listens on vsock `port`: host-initiated connections to it reach `handler`. */
  listenInGuest(port: number, handler: (sock: Socket) => void): void {
    this.guestListeners.set(port, handler);
  }

  /** A host-initiated connection: the CONNECT line, then OK and forwarding, or a close. */
  private vsockConnection(sock: Socket): void {
    let got = Buffer.alloc(0);
    sock.on('error', () => {});
    const onData = (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      const nl = got.indexOf(0x0a);
      if (nl < 0 && got.length < 32) return;
      sock.off('data', onData);
      const line = (nl < 0 ? got : got.subarray(0, nl)).toString('latin1');
      const m = nl >= 0 && nl < 32 ? /^\s*connect\s+(\d{1,10})\s*$/i.exec(line) : null;
      const port = m ? Number(m[1]) : NaN;
      const handler = port <= 0xffffffff && this.state === 'Running' ? this.guestListeners.get(port) : undefined;
      this.vsockConnects.push({ line, forwarded: !!handler });
      if (!handler) {
        sock.destroy();
        return;
      }
      sock.pause();
      sock.write(`OK ${this.nextHostPort++}\n`);
      const rest = got.subarray(nl + 1);
      if (rest.length) sock.unshift(rest);
      handler(sock);
    };
    sock.on('data', onData);
  }

  /** Remove the sockets this server made (what a clean Firecracker exit would leave behind is up to the caller). */
  unlinkSockets(): void {
    for (const p of [this.options.socketPath, this.vsockHostPath]) {
      if (!p) continue;
      try {
        unlinkSync(p);
      } catch {
        /* gone */
      }
    }
  }
}

export async function startFakeFirecracker(options: FakeFirecrackerOptions): Promise<FakeFirecracker> {
  const f = new FakeFirecracker(options);
  await f.listen();
  return f;
}
