import { createConnection, type Socket } from 'node:net';
import { BangerError, type ErrorKind } from '../errors.js';
import type { JailLauncher } from '../host/vmm/firecracker/firecracker.js';
import { NdjsonConnection, type NdjsonAdapter } from '../rpc/connection.js';
import type { Response, Verb, VerbArgs, VerbResults } from './protocol.js';

/**
 * A client of the root helper: one NdjsonConnection (request ids, a timeout per request, every pending request
 * rejected when the connection closes). Reconnecting with backoff is the rootHelper actor's job: it watches `closed`.
 */

export interface RequestOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

const MAX_ANSWER_LINE = 16 * 1024 * 1024;

const KINDS: ReadonlySet<string> = new Set<ErrorKind>([
  'parse', 'invalid_request', 'method_not_found', 'invalid_params', 'internal', 'not_found', 'invalid_state', 'conflict',
  'host', 'timeout', 'unsupported', 'aborted', 'usage',
]);

/** The helper's protocol on an NdjsonConnection: numeric ids, {ok: true, result} or {ok: false, error: {kind, message, hint}}. */
const helperAdapter: NdjsonAdapter<{ verb: string; args: unknown }> = {
  id: (n) => n,
  encode: (id, req) => ({ id, verb: req.verb, args: req.args }),
  decode: (msg) => {
    const m = msg as unknown as Response;
    if (typeof m.id !== 'number') return undefined;
    if (m.ok) return { answers: m.id, result: m.result };
    const e = m.error ?? { kind: 'internal', message: 'malformed error' };
    const kind = (KINDS.has(e.kind) ? e.kind : 'internal') as ErrorKind;
    return { answers: m.id, error: () => new BangerError(kind, e.message, e.hint) };
  },
  errors: {
    closed: (verb) => new BangerError('host', `root helper ${verb}: the connection is closed`),
    lost: (verb) => new BangerError('host', `root helper ${verb}: the connection closed before an answer`),
    timeout: (verb, ms) => new BangerError('timeout', `root helper ${verb}: no answer within ${ms} ms`),
    aborted: (verb) => new BangerError('aborted', `root helper ${verb}: aborted`),
  },
};

export class RootHelperClient {
  /** Answers are small; a line longer than MAX_ANSWER_LINE means the other end is not the helper: the connection ends. */
  private readonly conn: NdjsonConnection<{ verb: string; args: unknown }>;
  /** Resolves when the connection is gone (either side closed it). */
  readonly closed: Promise<void>;

  private constructor(
    sock: Socket,
    readonly socketPath: string,
    private readonly defaultTimeoutMs: number,
  ) {
    this.conn = new NdjsonConnection(sock, { adapter: helperAdapter, maxLine: MAX_ANSWER_LINE });
    this.closed = this.conn.closed;
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
                ? 'this socket belongs to another user: the helper serves each owner on a socket of its own (sudo banger system install --owner $USER)'
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
    return this.conn.isOpen;
  }

  /** Send one request; resolves with its result, rejects with the helper's error as a BangerError. */
  request<V extends Verb>(verb: V, args: VerbArgs<V>, opts?: RequestOptions): Promise<VerbResults[V]>;
  /** Any verb, unchecked (tests send hostile requests this way). */
  request(verb: string, args: unknown, opts?: RequestOptions): Promise<unknown>;
  request(verb: string, args: unknown, opts: RequestOptions = {}): Promise<unknown> {
    return this.conn.request({ verb, args }, { label: verb, timeoutMs: opts.timeoutMs ?? this.defaultTimeoutMs, signal: opts.signal });
  }

  /** Send a raw line (tests: malformed input). */
  writeRaw(line: string): void {
    this.conn.writeRaw(line);
  }

  close(): void {
    this.conn.close();
  }
}

/**
 * A Firecracker jail launcher that goes through the root helper (for FirecrackerDriverOptions.jailer.launch).
 * The uid and gid are not sent: the helper runs Firecracker as its socket's owner.
 */
export function helperJailLauncher(client: () => RootHelperClient | Promise<RootHelperClient>): JailLauncher {
  return async ({ uid: _uid, gid: _gid, ...req }, opts) => (await client()).request('firecracker.jail', req, { signal: opts?.signal, timeoutMs: 30_000 });
}

/** Removes an exited instance's jail through the root helper (for FirecrackerDriverOptions.jailer.unjail). */
export function helperUnjail(client: () => RootHelperClient | Promise<RootHelperClient>): (fcId: string) => Promise<unknown> {
  return async (fcId) => (await client()).request('firecracker.unjail', { id: fcId });
}
