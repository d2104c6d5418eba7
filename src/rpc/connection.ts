/**
 * One request/response connection over newline-delimited JSON, shared by the daemon's RPC client, the root
 * helper's client and QEMU's QMP client: a pending map keyed by id, a timeout per request, every pending request
 * rejected when the connection closes (vscode-jsonrpc's rule), and the messages that answer no request routed
 * to a notification handler. Framing is LineDecoder's. What differs between the three protocols (where the id
 * goes, what an answer and an error look like, how errors are worded) is the adapter's business.
 */
import type { Socket } from 'node:net';
import { errorMessage } from '../errors.js';
import { LineDecoder } from './ndjson.js';

export type WireId = string | number;

/** What one incoming message is, as far as the connection needs to know. */
export type Incoming =
  | { answers: WireId; result: unknown }
  | { answers: WireId; error: (label: string) => Error }
  | { notification: Record<string, unknown> }
  | undefined;

export interface NdjsonAdapter<Req> {
  /** The wire id of the n-th request (1, 2, ...). */
  id(n: number): WireId;
  /** The message sent for `req` under `id` (JSON-encoded by the connection, one line). */
  encode(id: WireId, req: Req): unknown;
  /** Classifies a parsed message (a non-null object). */
  decode(msg: Record<string, unknown>): Incoming;
  errors: {
    /** A request was sent on a connection already closed. */
    closed(label: string): Error;
    /** The connection closed (`why`) while the request waited. */
    lost(label: string, why: string): Error;
    timeout(label: string, ms: number): Error;
    aborted(label: string): Error;
  };
}

export interface ConnectionOptions<Req> {
  adapter: NdjsonAdapter<Req>;
  /** The longest line read; a longer one ends the connection. */
  maxLine: number;
  /** Messages that answer no request (events, progress, greetings). A throw ends the connection. */
  onNotification?: (msg: Record<string, unknown>) => void;
}

export interface RequestOptions<X = unknown> {
  /** Names the request in errors (a method, a verb, a QMP command). */
  label: string;
  /** No timeout when absent. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Kept with the pending request, for notifications that name it (see `contextOf`). */
  context?: X;
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  label: string;
  context?: unknown;
  dispose: () => void;
}

export class NdjsonConnection<Req> {
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private readonly lines: LineDecoder;
  private readonly closeListeners = new Set<() => void>();
  private isClosed = false;
  private lastError?: Error;
  /** Resolves when the connection is closed (by either side). */
  readonly closed: Promise<void>;
  private markClosed!: () => void;

  constructor(
    private readonly sock: Socket,
    private readonly opts: ConnectionOptions<Req>,
  ) {
    this.closed = new Promise((r) => (this.markClosed = r));
    this.lines = new LineDecoder({ maxLine: opts.maxLine, onOverflow: (n) => this.fail(`the other end sent a line of ${n} characters, more than ${opts.maxLine}`) });
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => this.onData(chunk));
    sock.on('error', (e) => (this.lastError = e));
    sock.on('close', () => this.fail(this.lastError?.message ?? 'connection closed'));
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  /** Sends `req`; resolves with the answer's result, rejects with the adapter's error. */
  request<T = unknown, X = unknown>(req: Req, opts: RequestOptions<X>): Promise<T> {
    const { errors } = this.opts.adapter;
    if (this.isClosed) return Promise.reject(errors.closed(opts.label));
    if (opts.signal?.aborted) return Promise.reject(errors.aborted(opts.label));
    const id = this.opts.adapter.id(this.nextId++);
    const key = String(id);
    return new Promise<T>((resolve, reject) => {
      const timer = opts.timeoutMs === undefined ? undefined : setTimeout(() => this.settle(key, (p) => p.reject(errors.timeout(p.label, opts.timeoutMs!))), opts.timeoutMs);
      const onAbort = () => this.settle(key, (p) => p.reject(errors.aborted(p.label)));
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      const dispose = () => {
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
      };
      this.pending.set(key, { resolve: resolve as (v: unknown) => void, reject, label: opts.label, context: opts.context, dispose });
      this.sock.write(`${JSON.stringify(this.opts.adapter.encode(id, req))}\n`);
    });
  }

  /** The context of the pending request `id`, if it is still pending. */
  contextOf<X>(id: WireId): X | undefined {
    return this.pending.get(String(id))?.context as X | undefined;
  }

  /** Calls fn once when the connection closes (at once if it already has); returns the unsubscribe function. */
  onClose(fn: () => void): () => void {
    if (this.isClosed) {
      queueMicrotask(fn);
      return () => {};
    }
    this.closeListeners.add(fn);
    return () => this.closeListeners.delete(fn);
  }

  /** Sends a raw line as is (tests: malformed input). */
  writeRaw(line: string): void {
    this.sock.write(line);
  }

  close(): void {
    this.sock.destroy();
  }

  private settle(key: string, fn: (p: Pending) => void): void {
    const p = this.pending.get(key);
    if (!p) return;
    this.pending.delete(key);
    p.dispose();
    fn(p);
  }

  private onData(chunk: string): void {
    try {
      for (const line of this.lines.push(chunk)) if (line.trim()) this.onLine(line);
    } catch (e) {
      // A notification handler threw: reported to every pending request rather than lost.
      this.fail(`a message could not be handled: ${errorMessage(e)}`);
    }
  }

  private onLine(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) return;
    const incoming = this.opts.adapter.decode(msg as Record<string, unknown>);
    if (!incoming) return;
    if ('notification' in incoming) this.opts.onNotification?.(incoming.notification);
    else if ('error' in incoming) this.settle(String(incoming.answers), (p) => p.reject(incoming.error(p.label)));
    else this.settle(String(incoming.answers), (p) => p.resolve(incoming.result));
  }

  /** Ends the connection: every pending request is rejected with `why`, close listeners run once. */
  private fail(why: string): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const key of [...this.pending.keys()]) this.settle(key, (p) => p.reject(this.opts.adapter.errors.lost(p.label, why)));
    this.sock.destroy();
    this.markClosed();
    for (const l of [...this.closeListeners]) l();
    this.closeListeners.clear();
  }
}
