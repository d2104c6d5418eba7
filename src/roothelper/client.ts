import { createConnection, type Socket } from 'node:net';
import { BangerError, type ErrorKind } from '../errors.js';
import type { JailLauncher } from '../host/vmm/firecracker/firecracker.js';
import { LineDecoder } from '../rpc/ndjson.js';
import type { Response, Verb, VerbArgs, VerbResults } from './protocol.js';

/**
 * A client of the root helper: one connection, request ids, a timeout per request, and every pending request
 * rejected when the connection closes (vscode-jsonrpc's rule). Reconnecting with backoff is the rootHelper
 * actor's job: it watches `closed`.
 */

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  timer: NodeJS.Timeout;
  verb: string;
  cleanup: () => void;
}

export interface RequestOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

const MAX_ANSWER_LINE = 16 * 1024 * 1024;

const KINDS: ReadonlySet<string> = new Set<ErrorKind>([
  'parse', 'invalid_request', 'method_not_found', 'invalid_params', 'internal', 'not_found', 'invalid_state', 'conflict',
  'host', 'timeout', 'unsupported', 'aborted', 'usage',
]);

export class RootHelperClient {
  private nextId = 1;
  /** Answers are small; a line longer than this means the other end is not the helper: the connection ends. */
  private readonly lines = new LineDecoder({ maxLine: MAX_ANSWER_LINE, onOverflow: () => this.sock.destroy() });
  private readonly pending = new Map<number, Pending>();
  private isClosed = false;
  /** Resolves when the connection is gone (either side closed it). */
  readonly closed: Promise<void>;
  private markClosed!: () => void;

  private constructor(
    private readonly sock: Socket,
    readonly socketPath: string,
    private readonly defaultTimeoutMs: number,
  ) {
    this.closed = new Promise((r) => (this.markClosed = r));
    sock.setEncoding('utf8');
    sock.on('data', (c: string) => this.onData(c));
    sock.on('error', () => {
      /* reported through close */
    });
    sock.on('close', () => this.onClose());
  }

  /** Connect to the helper's socket. `timeoutMs` bounds the connect; `requestTimeoutMs` is the default per request (30 s). */
  static connect(socketPath: string, opts: { timeoutMs?: number; requestTimeoutMs?: number; signal?: AbortSignal } = {}): Promise<RootHelperClient> {
    const timeoutMs = opts.timeoutMs ?? 3000;
    return new Promise((resolve, reject) => {
      if (opts.signal?.aborted) return reject(new BangerError('aborted', 'connecting to the root helper: aborted'));
      const sock = createConnection({ path: socketPath });
      const done = (fn: () => void) => {
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        sock.off('connect', onConnect);
        sock.off('error', onError);
        fn();
      };
      const onConnect = () => done(() => resolve(new RootHelperClient(sock, socketPath, opts.requestTimeoutMs ?? 30_000)));
      const onError = (e: NodeJS.ErrnoException) =>
        done(() =>
          reject(
            new BangerError(
              'host',
              `cannot reach the root helper at ${socketPath} (${e.code ?? e.message})`,
              e.code === 'EACCES'
                ? 'your user is not in the helper\'s group; add it (usermod -aG <group> $USER) and log in again'
                : 'start it: sudo systemctl start banger-roothelper (installed by banger system install)',
              { cause: e },
            ),
          ),
        );
      const onAbort = () =>
        done(() => {
          sock.destroy();
          reject(new BangerError('aborted', 'connecting to the root helper: aborted'));
        });
      const timer = setTimeout(
        () =>
          done(() => {
            sock.destroy();
            reject(new BangerError('timeout', `the root helper at ${socketPath} did not accept a connection within ${timeoutMs} ms`));
          }),
        timeoutMs,
      );
      sock.once('connect', onConnect);
      sock.once('error', onError);
      opts.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  /** Send one request; resolves with its result, rejects with the helper's error as a BangerError. */
  request<V extends Verb>(verb: V, args: VerbArgs<V>, opts?: RequestOptions): Promise<VerbResults[V]>;
  /** Any verb, unchecked (tests send hostile requests this way). */
  request(verb: string, args: unknown, opts?: RequestOptions): Promise<unknown>;
  request(verb: string, args: unknown, opts: RequestOptions = {}): Promise<unknown> {
    if (this.isClosed) return Promise.reject(new BangerError('host', `root helper ${verb}: the connection is closed`));
    if (opts.signal?.aborted) return Promise.reject(new BangerError('aborted', `root helper ${verb}: aborted`));
    const id = this.nextId++;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    return new Promise((resolve, reject) => {
      const onAbort = () => this.settle(id, (p) => p.reject(new BangerError('aborted', `root helper ${verb}: aborted`)));
      const timer = setTimeout(
        () => this.settle(id, (p) => p.reject(new BangerError('timeout', `root helper ${verb}: no answer within ${timeoutMs} ms`))),
        timeoutMs,
      );
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      this.pending.set(id, { resolve, reject, timer, verb, cleanup: () => opts.signal?.removeEventListener('abort', onAbort) });
      this.sock.write(`${JSON.stringify({ id, verb, args })}\n`);
    });
  }

  /** Send a raw line (tests: malformed input). */
  writeRaw(line: string): void {
    this.sock.write(line);
  }

  close(): void {
    this.sock.destroy();
  }

  private settle(id: number, fn: (p: Pending) => void): void {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    p.cleanup();
    fn(p);
  }

  private onData(chunk: string): void {
    try {
      for (const line of this.lines.push(chunk)) if (line.trim()) this.onLine(line);
    } catch (e) {
      this.sock.destroy(new Error(`an answer could not be handled: ${(e as Error)?.message ?? e}`));
    }
  }

  private onLine(line: string): void {
    let msg: Response;
    try {
      msg = JSON.parse(line) as Response;
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object' || typeof msg.id !== 'number') return;
    this.settle(msg.id, (p) => {
      if (msg.ok) p.resolve(msg.result);
      else {
        const e = msg.error ?? { kind: 'internal', message: 'malformed error' };
        const kind = (KINDS.has(e.kind) ? e.kind : 'internal') as ErrorKind;
        p.reject(new BangerError(kind, e.message, e.hint));
      }
    });
  }

  private onClose(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const id of [...this.pending.keys()]) {
      this.settle(id, (p) => p.reject(new BangerError('host', `root helper ${p.verb}: the connection closed before an answer`)));
    }
    this.markClosed();
  }
}

/** A Firecracker jail launcher that goes through the root helper (for FirecrackerDriverOptions.jailer.launch). */
export function helperJailLauncher(client: () => RootHelperClient | Promise<RootHelperClient>): JailLauncher {
  return async (req, opts) => (await client()).request('firecracker.jail', req, { signal: opts?.signal, timeoutMs: 30_000 });
}

/** Removes an exited instance's jail through the root helper (for FirecrackerDriverOptions.jailer.unjail). */
export function helperUnjail(client: () => RootHelperClient | Promise<RootHelperClient>): (fcId: string) => Promise<unknown> {
  return async (fcId) => (await client()).request('firecracker.unjail', { id: fcId });
}
