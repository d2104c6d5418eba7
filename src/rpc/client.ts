/**
 * JSON-RPC client over the daemon socket (an NdjsonConnection: answers read in time linear in their size, a
 * connection that closes rejects every pending request).
 */
import { connect, type Socket } from 'node:net';
import { BangerError, type ErrorKind } from '../errors.js';
import { NdjsonConnection, type NdjsonAdapter } from './connection.js';
import { PROGRESS_METHOD, STREAM_METHOD } from './wire.js';
import type { MethodName, ParamsOf, ProgressParams, ResultOf, RpcErrorObject, StreamOf } from './protocol.js';

/** What a pending call keeps for the notifications that name it. */
interface CallContext {
  onProgress?: (p: ProgressParams) => void;
  onStream?: (data: unknown) => void;
}

/** A line from the daemon, as far as the client looks into it before trusting it. */
interface Incoming {
  id?: unknown;
  method?: unknown;
  params?: { requestId?: unknown; data?: unknown };
  result?: unknown;
  error?: RpcErrorObject;
}

/** The longest answer line read (V8 strings end a little above 2^29 characters); a longer one ends the connection. */
const MAX_ANSWER_LINE = 2 ** 28;

export interface CallOptions<M extends MethodName = MethodName> {
  onProgress?: (p: ProgressParams) => void;
  /** The method's `stream` notifications (inspect.subscribe, vm.logs with follow). */
  onStream?: (data: StreamOf<M>) => void;
  timeoutMs?: number;
}

type Request = { method: string; params: unknown };

/** JSON-RPC 2.0 on an NdjsonConnection: numeric ids, {result} or {error: {message, data: {kind, hint}}}. */
const rpcAdapter: NdjsonAdapter<Request> = {
  id: (n) => n,
  encode: (id, req) => ({ jsonrpc: '2.0', id, method: req.method, params: req.params }),
  decode: (msg) => {
    const m = msg as Incoming;
    if (m.method === PROGRESS_METHOD || m.method === STREAM_METHOD) return { notification: msg };
    if (typeof m.id !== 'number' && typeof m.id !== 'string') return undefined;
    const error = m.error;
    if (error) return { answers: Number(m.id), error: () => new BangerError((error.data?.kind as ErrorKind) ?? 'internal', error.message, error.data?.hint) };
    return { answers: Number(m.id), result: m.result };
  },
  errors: {
    closed: () => new BangerError('host', 'the daemon connection is closed'),
    lost: (_method, why) => new BangerError('host', `lost the connection to the banger daemon (${why})`, 'see `banger daemon status` and the daemon log in $BANGER_HOME/daemon.log'),
    timeout: (method, ms) => new BangerError('timeout', `${method} did not answer within ${ms} ms`),
    aborted: (method) => new BangerError('aborted', `${method}: aborted`),
  },
};

export class RpcClient {
  private readonly conn: NdjsonConnection<Request>;

  private constructor(sock: Socket) {
    this.conn = new NdjsonConnection(sock, { adapter: rpcAdapter, maxLine: MAX_ANSWER_LINE, onNotification: (msg) => this.onNotification(msg as Incoming) });
  }

  static connect(path: string, timeoutMs = 5000): Promise<RpcClient> {
    return new Promise((resolve, reject) => {
      const sock = connect(path);
      const t = setTimeout(() => {
        sock.destroy();
        reject(new BangerError('timeout', `timed out connecting to the daemon at ${path}`));
      }, timeoutMs);
      sock.once('connect', () => {
        clearTimeout(t);
        resolve(new RpcClient(sock));
      });
      sock.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
    });
  }

  /** Call one method; resolves with its result (the daemon's answer, typed by the protocol, not re-validated here). */
  call<M extends MethodName>(method: M, params: ParamsOf<M>, opts: CallOptions<M> = {}): Promise<ResultOf<M>> {
    const context: CallContext = { onProgress: opts.onProgress, onStream: opts.onStream as ((data: unknown) => void) | undefined };
    return this.conn.request<ResultOf<M>>({ method, params }, { label: method, timeoutMs: opts.timeoutMs || undefined, context });
  }

  close(): void {
    this.conn.close();
  }

  /** Progress and stream notifications go to the call they name (params.requestId). */
  private onNotification(msg: Incoming): void {
    const ctx = this.conn.contextOf<CallContext>(Number(msg.params?.requestId));
    if (msg.method === PROGRESS_METHOD) ctx?.onProgress?.(msg.params as ProgressParams);
    else ctx?.onStream?.(msg.params?.data);
  }
}
