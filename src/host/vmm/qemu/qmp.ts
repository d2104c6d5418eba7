import { createConnection, type Socket } from 'node:net';
import { BangerError } from '../../../errors.js';
import { NdjsonConnection, type NdjsonAdapter } from '../../../rpc/connection.js';
import { aborted } from '../../exec/wait.js';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** QMP on an NdjsonConnection: its ids are the "id" member, answers are {"return"} or {"error": {class, desc}}. */
const qmpAdapter: NdjsonAdapter<{ execute: string; arguments?: Record<string, unknown> }> = {
  id: (n) => `b${n}`,
  encode: (id, req) => (req.arguments ? { execute: req.execute, arguments: req.arguments, id } : { execute: req.execute, id }),
  decode: (msg) => {
    if ('QMP' in msg || typeof msg.event === 'string') return { notification: msg };
    if (msg.id === undefined || (typeof msg.id !== 'string' && typeof msg.id !== 'number')) return undefined;
    if (!('error' in msg)) return { answers: msg.id, result: msg.return };
    const err = msg.error as { class?: string; desc?: string } | undefined;
    return { answers: msg.id, error: (command) => new BangerError('host', `QMP ${command}: ${err?.class ?? 'Error'}: ${err?.desc ?? 'unknown error'}`) };
  },
  errors: {
    closed: (command) => new BangerError('host', `QMP ${command}: connection is closed`),
    lost: (command) => new BangerError('host', `QMP ${command}: connection closed (QEMU exited?)`),
    timeout: (command, ms) => new BangerError('timeout', `QMP ${command}: no reply within ${ms} ms`),
    aborted: (command) => new BangerError('aborted', `QMP ${command}: aborted`),
  },
};

/**
 * A QMP client: JSON objects, one per line, over a Unix socket. connect() waits for the greeting and
 * negotiates capabilities; execute() matches replies by id. Every wait has a timeout.
 */
export class QmpClient {
  private readonly conn: NdjsonConnection<{ execute: string; arguments?: Record<string, unknown> }>;
  private readonly listeners = new Set<(e: QmpEvent) => void>();
  private greetingWaiter?: (g: unknown) => void;
  /** Every event received, in order. */
  readonly events: QmpEvent[] = [];
  greeting: unknown;
  /** Resolves when the connection is closed (by either side, e.g. because QEMU exited). */
  readonly closed: Promise<void>;

  private constructor(
    sock: Socket,
    readonly path: string,
  ) {
    // Newline framing linear in what it reads; a line over 64 MiB is not QEMU talking: the connection ends.
    this.conn = new NdjsonConnection(sock, { adapter: qmpAdapter, maxLine: 64 * 1024 * 1024, onNotification: (msg) => this.onNotification(msg) });
    this.closed = this.conn.closed;
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

  private onNotification(msg: Record<string, unknown>): void {
    if ('QMP' in msg) {
      this.greeting = msg.QMP;
      const w = this.greetingWaiter;
      this.greetingWaiter = undefined;
      w?.(msg.QMP);
      return;
    }
    const ev = msg as unknown as QmpEvent;
    this.events.push(ev);
    for (const l of [...this.listeners]) l(ev);
  }

  /** Calls fn once when the connection closes (at once if it already has); returns the unsubscribe function. */
  onClose(fn: () => void): () => void {
    return this.conn.onClose(fn);
  }

  get isOpen(): boolean {
    return this.conn.isOpen;
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    return this.conn.request<T>({ execute: command, arguments: args }, { label: command, timeoutMs: opts.timeoutMs ?? 5000 });
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
    this.conn.close();
  }
}
