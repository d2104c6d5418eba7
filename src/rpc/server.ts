/**
 * JSON-RPC 2.0 over a Unix socket, one JSON object per line. No frame can hurt the daemon: every complete line
 * gets exactly one answer (a JSON-RPC error with data {kind, hint} for a bad one, id null when no id could be
 * read), methods are looked up among the protocol's own names only (never through the prototype: `toString` is
 * not a method), params are validated against src/rpc/protocol.ts before a handler runs, an over-long line gets
 * one error and the connection goes on, and a client that leaves too many answers unread is cut off.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { chmodSync, mkdirSync, rmSync, chmodSync as chmod } from 'node:fs';
import { dirname } from 'node:path';
import { z } from 'zod';
import { BangerError, ErrorCodes, errorMessage, type ErrorKind } from '../errors.js';
import { LineDecoder } from './ndjson.js';
import { methods, PROGRESS_METHOD, STREAM_METHOD, type MethodName, type ParamsOf, type ProgressParams, type ResultOf, type RpcResponse, type StreamOf } from './protocol.js';

export interface CallContext<M extends MethodName = MethodName> {
  requestId: number | string;
  progress(p: Omit<ProgressParams, 'requestId'>): void;
  /** Send a notification tied to this request (the streams of inspect.subscribe and vm.logs --follow). */
  stream(data: StreamOf<M>): void;
  /** Aborted when the client disconnects. */
  signal: AbortSignal;
}

export type Handler<M extends MethodName> = (params: ParamsOf<M>, ctx: CallContext<M>) => Promise<ResultOf<M>>;
/** One handler for every method of the protocol, each typed by its params, result and stream. */
export type Handlers = { [M in MethodName]: Handler<M> };

/** How the server calls a handler once the method's own schema has checked the params. */
type CheckedHandler = (params: unknown, ctx: CallContext) => Promise<unknown>;

/** The longest request line read, in characters; a longer one is answered with one error and skipped. */
export const MAX_REQUEST_LINE = 1024 * 1024;
/** Answers queued for a client that does not read them; a connection with more than this unread is cut. */
export const MAX_UNREAD_BYTES = 16 * 1024 * 1024;
const MAX_ID_LENGTH = 128;
const REQUEST_SHAPE = 'send one JSON-RPC 2.0 request per line: {"jsonrpc":"2.0","id":1,"method":"daemon.status","params":{}}';

type Id = number | string | null;
type Message = RpcResponse | { jsonrpc: '2.0'; method: string; params: unknown } | typeof PROBE;
/** An empty line, which every reader of this protocol skips: written to a half-closed peer to learn whether it is gone. */
const PROBE = Symbol('probe');
const PROBE_INTERVAL_MS = 1000;

export function toRpcError(e: unknown): RpcResponse['error'] {
  if (e instanceof BangerError) return { code: e.code, message: e.message, data: { kind: e.kind, hint: e.hint } };
  return { code: ErrorCodes.Internal, message: errorMessage(e), data: { kind: 'internal', hint: 'see the daemon log ($BANGER_HOME/daemon.log)' } };
}

export function formatZodError(err: z.ZodError): string {
  return err.issues
    .map((i) => {
      const path = i.path.length ? i.path.join('.') : 'params';
      if (i.code === 'unrecognized_keys') return `unknown field(s) ${(i as { keys: string[] }).keys.map((k) => JSON.stringify(k)).join(', ')}`;
      return `${path}: ${i.message}`;
    })
    .join('; ');
}

function errorAnswer(id: Id, kind: ErrorKind, message: string, hint: string): RpcResponse {
  return { jsonrpc: '2.0', id, error: toRpcError(new BangerError(kind, message, hint)) };
}

const clip = (s: string, n = 64) => JSON.stringify(s.length > n ? `${s.slice(0, n)}…` : s);
const isPlainObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isId = (v: unknown): v is number | string => typeof v === 'number' || (typeof v === 'string' && v.length <= MAX_ID_LENGTH);

type Request = { id: number | string; method: MethodName; handler: CheckedHandler; params: unknown };

/** One line to a request ready to run, or the error that answers it. Never throws. */
export function parseRequest(line: string, handlers: Handlers): Request | { answer: RpcResponse } {
  let msg: unknown;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    return { answer: errorAnswer(null, 'parse', `parse error: the request is not valid JSON (${errorMessage(e)})`, REQUEST_SHAPE) };
  }
  if (Array.isArray(msg)) return { answer: errorAnswer(null, 'invalid_request', 'invalid request: batches (JSON arrays) are not accepted', REQUEST_SHAPE) };
  if (!isPlainObject(msg)) return { answer: errorAnswer(null, 'invalid_request', `invalid request: expected a JSON object, got ${msg === null ? 'null' : typeof msg}`, REQUEST_SHAPE) };
  if (!isId(msg.id)) {
    const why = msg.id === undefined || msg.id === null ? 'has no id (notifications are not accepted)' : `has an id that is not a number or a string of ${MAX_ID_LENGTH} characters at most`;
    return { answer: errorAnswer(null, 'invalid_request', `invalid request: it ${why}`, REQUEST_SHAPE) };
  }
  const id = msg.id;
  if (msg.jsonrpc !== '2.0') return { answer: errorAnswer(id, 'invalid_request', 'invalid request: "jsonrpc" must be "2.0"', REQUEST_SHAPE) };
  const method = msg.method;
  if (typeof method !== 'string') return { answer: errorAnswer(id, 'invalid_request', `invalid request: "method" must be a string, got ${method === null ? 'null' : typeof method}`, REQUEST_SHAPE) };
  // Own properties only: a name like "toString" or "__proto__" must not reach Object.prototype.
  const found: unknown = Object.hasOwn(methods, method) && Object.hasOwn(handlers, method) ? handlers[method as MethodName] : undefined;
  if (typeof found !== 'function') {
    return { answer: errorAnswer(id, 'method_not_found', `unknown method ${clip(method)}`, `known methods: ${Object.keys(methods).join(', ')}`) };
  }
  const params = Object.hasOwn(msg, 'params') ? msg.params : {};
  if (!isPlainObject(params)) {
    return { answer: errorAnswer(id, 'invalid_params', `invalid params for ${method}: params must be an object, got ${Array.isArray(params) ? 'an array' : params === null ? 'null' : typeof params}`, 'pass named params as a JSON object') };
  }
  const parsed = (methods[method as MethodName] as z.ZodType).safeParse(params);
  if (!parsed.success) {
    return { answer: errorAnswer(id, 'invalid_params', `invalid params for ${method}: ${formatZodError(parsed.error)}`, `see the params of ${method} in src/rpc/protocol.ts`) };
  }
  // The params were just checked against this method's schema: this handler's own params type.
  return { id, method: method as MethodName, handler: found as CheckedHandler, params: parsed.data };
}

export class RpcServer {
  private server?: Server;
  private sockets = new Set<Socket>();
  constructor(
    private handlers: Handlers,
    private log: (line: string) => void = () => {},
  ) {}

  async listen(path: string): Promise<void> {
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    chmod(dirname(path), 0o700);
    rmSync(path, { force: true });
    // Half-open: a client may end its side after its last request and still read the answers.
    this.server = createServer({ allowHalfOpen: true }, (sock) => this.onConnection(sock));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      // Create the socket with a umask-independent 0600 mode.
      const old = process.umask(0o177);
      this.server!.listen(path, () => {
        process.umask(old);
        resolve();
      });
    });
    chmodSync(path, 0o600);
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }

  private onConnection(sock: Socket): void {
    this.sockets.add(sock);
    const abort = new AbortController();
    const send = (m: Message) => this.send(sock, m);
    let inFlight = 0;
    let peerEnded = false;
    const endWhenAnswered = () => {
      if (peerEnded && inFlight === 0 && !sock.destroyed) sock.end();
    };
    const decoder = new LineDecoder({
      maxLine: MAX_REQUEST_LINE,
      onOverflow: (n) => send(errorAnswer(null, 'invalid_request', `invalid request: line longer than ${MAX_REQUEST_LINE} characters (${n} so far); skipped`, `keep each request under ${MAX_REQUEST_LINE} characters`)),
    });
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      try {
        for (const line of decoder.push(chunk)) {
          if (!line.trim()) continue;
          inFlight++;
          this.answer(line, send, abort.signal)
            .catch((e) => this.log(`rpc: internal error answering a request: ${(e as Error)?.stack ?? e}`))
            .finally(() => {
              inFlight--;
              endWhenAnswered();
            });
        }
      } catch (e) {
        this.log(`rpc: dropping a connection after an unexpected error reading it: ${(e as Error)?.stack ?? e}`);
        sock.destroy();
      }
    });
    let probe: NodeJS.Timeout | undefined;
    sock.on('end', () => {
      peerEnded = true;
      endWhenAnswered();
      // A half-closed peer may still read its answers, or may be gone: a peer that is gone makes a write fail.
      // Long calls (a follow, an attach, an exec) learn that through their signal instead of running on forever.
      if (!sock.destroyed && inFlight > 0) probe = setInterval(() => (inFlight > 0 ? this.send(sock, PROBE) : clearInterval(probe)), PROBE_INTERVAL_MS);
    });
    sock.on('close', () => {
      clearInterval(probe);
      this.sockets.delete(sock);
      abort.abort(new BangerError('aborted', 'client disconnected'));
    });
    sock.on('error', () => sock.destroy());
  }

  /** Write one message, unless the client has left more than MAX_UNREAD_BYTES unread: then cut it off. Never throws. */
  private send(sock: Socket, m: Message): void {
    if (sock.destroyed || !sock.writable) return;
    if (sock.writableLength > MAX_UNREAD_BYTES) {
      this.log(`rpc: a client left ${sock.writableLength} bytes of answers unread (limit ${MAX_UNREAD_BYTES}); closing its connection`);
      sock.destroy();
      return;
    }
    if (m === PROBE) {
      sock.write('\n');
      return;
    }
    let text: string;
    try {
      text = JSON.stringify(m);
    } catch (e) {
      if (!('id' in m)) return this.log(`rpc: dropped a ${m.method} notification that cannot be encoded: ${errorMessage(e)}`);
      text = JSON.stringify(errorAnswer(m.id, 'internal', `the answer could not be encoded as JSON: ${errorMessage(e)}`, 'see the daemon log ($BANGER_HOME/daemon.log)'));
    }
    sock.write(`${text}\n`);
  }

  /** Answer one line exactly once, whatever it holds and whatever its handler does. */
  private async answer(line: string, send: (m: Message) => void, signal: AbortSignal): Promise<void> {
    let req: ReturnType<typeof parseRequest>;
    try {
      req = parseRequest(line, this.handlers);
    } catch (e) {
      this.log(`rpc: internal error reading a request: ${(e as Error)?.stack ?? e}`);
      return send(errorAnswer(null, 'internal', `internal error reading the request: ${errorMessage(e)}`, 'see the daemon log ($BANGER_HOME/daemon.log)'));
    }
    if ('answer' in req) return send(req.answer);
    const { id: requestId, method, handler, params } = req;
    const ctx: CallContext = {
      requestId,
      signal,
      progress: (p) => send({ jsonrpc: '2.0', method: PROGRESS_METHOD, params: { requestId, ...p } }),
      stream: (data) => send({ jsonrpc: '2.0', method: STREAM_METHOD, params: { requestId, data } }),
    };
    try {
      const result = await handler(params, ctx);
      send({ jsonrpc: '2.0', id: requestId, result: result ?? null });
    } catch (e) {
      if (!(e instanceof BangerError)) this.log(`internal error in ${method}: ${(e as Error)?.stack ?? e}`);
      send({ jsonrpc: '2.0', id: requestId, error: toRpcError(e) });
    }
  }
}
