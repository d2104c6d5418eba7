import { createConnection, type Socket } from 'node:net';
import { BangerError, errorMessage } from '../../../errors.js';
import { LineDecoder } from '../../../rpc/ndjson.js';
import { aborted } from '../../exec/wait.js';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  timer: NodeJS.Timeout;
  command: string;
}

/**
 * A QMP client: JSON objects, one per line, over a Unix socket. connect() waits for the greeting and
 * negotiates capabilities; execute() matches replies by id. Every wait has a timeout.
 */
export class QmpClient {
  /** Newline framing linear in what it reads; a line over 64 MiB is not QEMU talking: the connection ends. */
  private readonly lines = new LineDecoder({ maxLine: 64 * 1024 * 1024, onOverflow: () => this.sock.destroy() });
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private readonly listeners = new Set<(e: QmpEvent) => void>();
  private readonly closeListeners = new Set<() => void>();
  private greetingWaiter?: (g: unknown) => void;
  private isClosed = false;
  /** Every event received, in order. */
  readonly events: QmpEvent[] = [];
  greeting: unknown;
  /** Resolves when the connection is closed (by either side, e.g. because QEMU exited). */
  readonly closed: Promise<void>;
  private markClosed!: () => void;

  private constructor(private readonly sock: Socket, readonly path: string) {
    this.closed = new Promise((r) => (this.markClosed = r));
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => this.onData(chunk));
    sock.on('error', () => {
      /* reported through close */
    });
    sock.on('close', () => this.handleClose());
  }

  static async connect(path: string, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 3000;
    const { signal } = opts;
    if (signal?.aborted) throw aborted(`QMP connect ${path}`, signal);
    const sock = createConnection({ path });
    const client = new QmpClient(sock, path);
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    try {
      await new Promise<void>((res, rej) => {
        timer = setTimeout(
          () => rej(new BangerError('timeout', `QMP ${path}: no greeting within ${timeoutMs} ms (another client may hold the monitor)`)),
          timeoutMs,
        );
        onAbort = () => rej(aborted(`QMP connect ${path}`, signal));
        signal?.addEventListener('abort', onAbort, { once: true });
        sock.once('error', (e) => rej(new BangerError('host', `QMP ${path}: ${e.message}`, undefined, { cause: e })));
        sock.once('close', () => rej(new BangerError('host', `QMP ${path}: connection closed before the greeting`)));
        client.greetingWaiter = () => res();
      });
      clearTimeout(timer);
      await client.execute('qmp_capabilities', undefined, { timeoutMs: Math.max(1000, timeoutMs) });
      return client;
    } catch (e) {
      client.close();
      throw e;
    } finally {
      clearTimeout(timer);
      if (onAbort) signal?.removeEventListener('abort', onAbort);
    }
  }

  private onData(chunk: string): void {
    try {
      for (const line of this.lines.push(chunk)) if (line.trim()) this.onLine(line);
    } catch (e) {
      this.sock.destroy(new Error(`QMP ${this.path}: a message could not be handled: ${errorMessage(e)}`));
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    if ('QMP' in msg) {
      this.greeting = msg.QMP;
      const w = this.greetingWaiter;
      this.greetingWaiter = undefined;
      w?.(msg.QMP);
    } else if (typeof msg.event === 'string') {
      const ev = msg as unknown as QmpEvent;
      this.events.push(ev);
      for (const l of [...this.listeners]) l(ev);
    } else if (msg.id !== undefined) {
      const p = this.pending.get(String(msg.id));
      if (!p) return;
      this.pending.delete(String(msg.id));
      clearTimeout(p.timer);
      if ('error' in msg) {
        const err = msg.error as { class?: string; desc?: string };
        p.reject(new BangerError('host', `QMP ${p.command}: ${err?.class ?? 'Error'}: ${err?.desc ?? 'unknown error'}`));
      } else p.resolve(msg.return);
    }
  }

  private handleClose(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new BangerError('host', `QMP ${p.command}: connection closed (QEMU exited?)`));
    }
    this.pending.clear();
    this.markClosed();
    for (const l of [...this.closeListeners]) l();
    this.closeListeners.clear();
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

  get isOpen(): boolean {
    return !this.isClosed;
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.isClosed) return Promise.reject(new BangerError('host', `QMP ${command}: connection is closed`));
    const id = `b${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? 5000;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new BangerError('timeout', `QMP ${command}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer, command });
      this.sock.write(`${JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id })}\n`);
    });
  }

  /** Subscribes to events; returns the unsubscribe function. */
  onEvent(fn: (e: QmpEvent) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Resolves with the first event (already received or future) that matches. */
  waitEvent(match: string | ((e: QmpEvent) => boolean), opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QmpEvent> {
    const pred = typeof match === 'string' ? (e: QmpEvent) => e.event === match : match;
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    const what = typeof match === 'string' ? match : 'event';
    return new Promise<QmpEvent>((resolve, reject) => {
      const done = (fn: () => void) => {
        clearTimeout(timer);
        off();
        offClose();
        opts.signal?.removeEventListener('abort', onAbort);
        fn();
      };
      const off = this.onEvent((e) => {
        if (pred(e)) done(() => resolve(e));
      });
      const timer = setTimeout(() => done(() => reject(new BangerError('timeout', `QMP: no ${what} within ${opts.timeoutMs} ms`))), opts.timeoutMs);
      const onAbort = () => done(() => reject(aborted(`waiting for QMP ${what}`, opts.signal)));
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      const offClose = this.onClose(() => done(() => reject(new BangerError('host', `QMP: connection closed before ${what}`))));
    });
  }

  close(): void {
    this.sock.destroy();
  }
}
