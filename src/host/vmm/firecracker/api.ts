/**
 * Firecracker's HTTP API on a Unix socket: the request and answer types of its swagger spec
 * (src/firecracker/swagger/firecracker.yaml), a small client, and a probe for "is anything serving this socket".
 */
import { request as httpRequest } from 'node:http';
import { createConnection } from 'node:net';
import { BangerError, errorMessage } from '../../../errors.js';
import { errnoCode as errno } from '../../exec/errno.js';

export interface MachineConfiguration {
  vcpu_count: number;
  mem_size_mib: number;
  smt?: boolean;
  track_dirty_pages?: boolean;
  huge_pages?: 'None' | 'Transparent' | '2M';
}
export interface BootSource {
  kernel_image_path: string;
  boot_args?: string;
  initrd_path?: string;
}
export interface Drive {
  drive_id: string;
  is_root_device: boolean;
  path_on_host?: string;
  is_read_only?: boolean;
  cache_type?: 'Unsafe' | 'Writeback';
  io_engine?: 'Sync' | 'Async';
  partuuid?: string;
}
export interface NetworkInterface {
  iface_id: string;
  host_dev_name: string;
  guest_mac?: string;
  mtu?: number;
}
export interface Vsock {
  guest_cid: number;
  uds_path: string;
}
export interface InstanceActionInfo {
  action_type: 'InstanceStart' | 'SendCtrlAltDel' | 'FlushMetrics';
}
/** PATCH /vm: pause or resume a running guest. */
export interface Vm {
  state: 'Paused' | 'Resumed';
}
/** PUT /snapshot/create (the guest must be paused). */
export interface SnapshotCreateParams {
  snapshot_path: string;
  mem_file_path: string;
  snapshot_type?: 'Full' | 'Diff';
}
export interface MemoryBackend {
  backend_type: 'File' | 'Uffd';
  backend_path: string;
}
/** PUT /snapshot/load (pre-boot only, on a Firecracker nothing was configured on). Exactly one of the mem_* fields. */
export interface SnapshotLoadParams {
  snapshot_path: string;
  mem_backend?: MemoryBackend;
  /** Deprecated by Firecracker in favour of mem_backend. */
  mem_file_path?: string;
  track_dirty_pages?: boolean;
  resume_vm?: boolean;
  network_overrides?: Array<{ iface_id: string; host_dev_name: string }>;
  vsock_override?: { uds_path: string };
  clock_realtime?: boolean;
}
export interface InstanceInfo {
  id: string;
  state: 'Not started' | 'Running' | 'Paused';
  vmm_version: string;
  app_name: string;
}

// ───────────────────────────── HTTP over a Unix socket ─────────────────────────────

export interface ApiRequestOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/**
 * A minimal client for Firecracker's API. A non-2xx answer becomes a BangerError that carries Firecracker's
 * `fault_message`; an unreachable socket becomes a `host` error, a slow one a `timeout`.
 */
export class FirecrackerApi {
  constructor(
    readonly socketPath: string,
    private readonly defaults: { timeoutMs?: number } = {},
  ) {}

  request<T = unknown>(method: 'GET' | 'PUT' | 'PATCH', path: string, body?: unknown, opts: ApiRequestOptions = {}): Promise<T | undefined> {
    const timeoutMs = opts.timeoutMs ?? this.defaults.timeoutMs ?? 5000;
    const what = `${method} ${path}`;
    return new Promise<T | undefined>((resolvePromise, reject) => {
      if (opts.signal?.aborted) return reject(new BangerError('aborted', `Firecracker ${what}: aborted`));
      const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
      let settled = false;
      const finish = (fn: () => void) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        fn();
      };
      const req = httpRequest({
        socketPath: this.socketPath,
        path,
        method,
        agent: false,
        headers: {
          Host: 'localhost',
          Accept: 'application/json',
          ...(payload ? { 'Content-Type': 'application/json', 'Content-Length': payload.length } : {}),
        },
      });
      const timer = setTimeout(() => {
        finish(() => reject(new BangerError('timeout', `Firecracker ${what}: no answer within ${timeoutMs} ms on ${this.socketPath}`)));
        req.destroy();
      }, timeoutMs);
      const onAbort = () => {
        finish(() => reject(new BangerError('aborted', `Firecracker ${what}: aborted`)));
        req.destroy();
      };
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      req.on('error', (e: NodeJS.ErrnoException) =>
        finish(() =>
          reject(new BangerError('host', `cannot reach the Firecracker API at ${this.socketPath} (${e.code ?? e.message})`, undefined, { cause: e })),
        ),
      );
      req.on('response', (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (e) => finish(() => reject(new BangerError('host', `Firecracker ${what}: ${e.message}`))));
        res.on('end', () =>
          finish(() => {
            const answer = parseAnswer(method, path, res.statusCode ?? 0, Buffer.concat(chunks).toString('utf8'));
            if (answer instanceof FirecrackerApiError) reject(answer);
            else resolvePromise(answer as T | undefined);
          }),
        );
      });
      if (payload) req.end(payload);
      else req.end();
    });
  }

  describe(opts?: ApiRequestOptions): Promise<InstanceInfo> {
    return this.request<InstanceInfo>('GET', '/', undefined, opts).then((r) => {
      if (!r || typeof r !== 'object' || typeof r.state !== 'string') throw new BangerError('host', `Firecracker GET /: unexpected answer ${JSON.stringify(r)}`);
      return r;
    });
  }

  async put(path: string, body: unknown, opts?: ApiRequestOptions): Promise<void> {
    await this.request('PUT', path, body, opts);
  }

  async patch(path: string, body: unknown, opts?: ApiRequestOptions): Promise<void> {
    await this.request('PATCH', path, body, opts);
  }
}

/** A 2xx answer's JSON (undefined when empty or not JSON), or the error carrying Firecracker's fault_message. */
function parseAnswer(method: string, path: string, status: number, text: string): unknown {
  let json: unknown;
  if (text.trim()) {
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
  }
  if (status >= 200 && status < 300) return json;
  const fault =
    json && typeof json === 'object' && typeof (json as { fault_message?: unknown }).fault_message === 'string'
      ? (json as { fault_message: string }).fault_message
      : text.trim() || `HTTP ${status}`;
  return new FirecrackerApiError(method, path, status, fault);
}

/** Firecracker refused a request; `faultMessage` is its own words. */
export class FirecrackerApiError extends BangerError {
  constructor(
    readonly method: string,
    readonly path: string,
    readonly status: number,
    readonly faultMessage: string,
  ) {
    super('host', `Firecracker refused ${method} ${path} (HTTP ${status}): ${faultMessage}`);
  }
}

/** Connect errors that mean nobody listens on a Unix socket path (absent, a socket file left behind, a plain file). */
const NOBODY_LISTENS = new Set(['ENOENT', 'ECONNREFUSED', 'ENOTSOCK']);

/**
 * Is something serving the API socket at `socketPath`? Not when the path is absent or nothing listens on it (a
 * socket file left behind by a Firecracker that exited, or a plain file): then it may be removed. The verdict
 * rests on connect(), which on a Unix socket succeeds or fails at once, never on a timer: on a busy machine a live
 * Firecracker can be slow to answer, and this process slow to see the answer, and neither means nobody is there.
 * Once connected, GET / (bounded by `timeoutMs`) only says who it is.
 */
export async function probeApiSocket(socketPath: string, timeoutMs: number, signal?: AbortSignal): Promise<{ serving: false } | { serving: true; info?: InstanceInfo; detail: string }> {
  if (signal?.aborted) throw new BangerError('aborted', `probing ${socketPath}: aborted`);
  const connectBoundMs = Math.max(timeoutMs, 30_000); // a safety net only: connect() on a Unix socket does not wait
  const connected = await new Promise<true | string>((res) => {
    const sock = createConnection(socketPath);
    const timer = setTimeout(() => {
      sock.destroy();
      res(`connect did not complete within ${connectBoundMs} ms`);
    }, connectBoundMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.destroy();
      res(true);
    });
    sock.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      res(e.code ?? e.message);
    });
  });
  if (connected !== true) {
    if (NOBODY_LISTENS.has(connected)) return { serving: false };
    return { serving: true, detail: `cannot tell whether something listens on it (${connected})` };
  }
  try {
    const info = await new FirecrackerApi(socketPath).describe({ timeoutMs, signal });
    return { serving: true, info, detail: `instance ${info.id}, ${info.state}` };
  } catch (e) {
    if (e instanceof BangerError && e.kind === 'aborted') throw e;
    // it went away in between
    if (NOBODY_LISTENS.has(errno(e instanceof Error ? e.cause : undefined) ?? '')) return { serving: false };
    if (e instanceof BangerError && e.kind === 'timeout') return { serving: true, detail: `it accepted a connection but did not answer GET / within ${timeoutMs} ms` };
    return { serving: true, detail: errorMessage(e) };
  }
}
