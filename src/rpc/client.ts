/**
 * JSON-RPC client over the daemon socket, reading answers in time linear in their size (LineDecoder). A connection
 * that closes rejects every pending request.
 */
import { connect, type Socket } from 'node:net';
import { BangerError, type ErrorKind } from '../errors.js';
import { LineDecoder } from './ndjson.js';
import { PROGRESS_METHOD, STREAM_METHOD, type MethodName, type ParamsOf, type ProgressParams, type ResultOf, type RpcErrorObject, type StreamOf } from './protocol.js';

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
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

export class RpcClient {
  private nextId = 1;
  private pending = new Map<number, Pending>();
  private closed = false;
  private readonly lines = new LineDecoder({
    maxLine: MAX_ANSWER_LINE,
    onOverflow: () => {
      this.fail(`the daemon sent a line longer than ${MAX_ANSWER_LINE} characters`);
      this.sock.destroy();
    },
  });

  private constructor(private sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (c: string) => this.onData(c));
    sock.on('close', () => this.fail('connection closed'));
    sock.on('error', (e) => this.fail(e.message));
  }

  private fail(why: string): void {
    if (this.closed) return;
    this.closed = true;
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(new BangerError('host', `lost the connection to the banger daemon (${why})`, 'see `banger daemon status` and the daemon log in $BANGER_HOME/daemon.log'));
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
    if (this.closed) return Promise.reject(new BangerError('host', 'the daemon connection is closed'));
    const id = this.nextId++;
    return new Promise<ResultOf<M>>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const done = <T>(f: (v: T) => void) => (v: T) => {
        if (timer) clearTimeout(timer);
        this.pending.delete(id);
        f(v);
      };
      const onStream = opts.onStream as ((data: unknown) => void) | undefined;
      this.pending.set(id, { resolve: done((v: unknown) => resolve(v as ResultOf<M>)), reject: done(reject), onProgress: opts.onProgress, onStream });
      if (opts.timeoutMs) {
        timer = setTimeout(() => this.pending.get(id)?.reject(new BangerError('timeout', `${method} did not answer within ${opts.timeoutMs} ms`)), opts.timeoutMs);
      }
      this.sock.write(JSON.stringify({ jsonrpc: '2.0', id, method, params }) + '\n');
    });
  }

  close(): void {
    this.closed = true;
    this.sock.end();
    this.sock.destroy();
  }

  private onData(chunk: string): void {
    try {
      for (const line of this.lines.push(chunk)) if (line.trim()) this.onLine(line);
    } catch (e) {
      // A progress or stream callback threw: the caller's bug, reported to every pending call rather than lost.
      this.fail(`an answer could not be handled: ${(e as Error)?.message ?? e}`);
      this.sock.destroy();
    }
  }

  private onLine(line: string): void {
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      return;
    }
    if (parsed === null || typeof parsed !== 'object') return;
    const msg = parsed as Incoming;
    if (msg.method === PROGRESS_METHOD) {
      this.pending.get(Number(msg.params?.requestId))?.onProgress?.(msg.params as ProgressParams);
    } else if (msg.method === STREAM_METHOD) {
      this.pending.get(Number(msg.params?.requestId))?.onStream?.(msg.params?.data);
    } else if (msg.id !== undefined) {
      const p = this.pending.get(Number(msg.id));
      if (!p) return;
      if (msg.error) p.reject(new BangerError((msg.error.data?.kind as ErrorKind) ?? 'internal', msg.error.message, msg.error.data?.hint));
      else p.resolve(msg.result);
    }
  }
}
