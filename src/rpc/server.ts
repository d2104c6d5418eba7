/**
 * JSON-RPC 2.0 over a Unix socket, one JSON object per line. A malformed line gets a parse error and the
 * connection (and everyone else) keeps being served. Params are validated against src/rpc/protocol.ts.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { chmodSync, mkdirSync, rmSync, chmodSync as chmod } from 'node:fs';
import { dirname } from 'node:path';
import { z } from 'zod';
import { BangerError, ErrorCodes } from '../errors.js';
import { methods, PROGRESS_METHOD, STREAM_METHOD, type MethodName, type ProgressParams, type RpcResponse } from './protocol.js';

export interface CallContext {
  requestId: number | string;
  progress(p: Omit<ProgressParams, 'requestId'>): void;
  /** Send an arbitrary notification tied to this request (used for streams like inspect and logs --follow). */
  stream(data: unknown): void;
  /** Aborted when the client disconnects. */
  signal: AbortSignal;
}

export type Handler = (params: any, ctx: CallContext) => Promise<unknown>;
export type Handlers = Partial<Record<MethodName, Handler>>;

const MAX_LINE = 1024 * 1024;

export function toRpcError(e: unknown): RpcResponse['error'] {
  if (e instanceof BangerError) return { code: e.code, message: e.message, data: { kind: e.kind, hint: e.hint } };
  return { code: ErrorCodes.Internal, message: e instanceof Error ? e.message : String(e), data: { kind: 'internal' } };
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
    this.server = createServer((sock) => this.onConnection(sock));
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
    let buf = '';
    const send = (obj: unknown) => {
      if (!sock.destroyed) sock.write(JSON.stringify(obj) + '\n');
    };
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > MAX_LINE && !buf.includes('\n')) {
        send({ jsonrpc: '2.0', id: null, error: { code: ErrorCodes.InvalidRequest, message: 'request line too long', data: { kind: 'invalid_request', hint: `keep each request under ${MAX_LINE} bytes` } } });
        buf = '';
        return;
      }
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line) void this.onLine(line, send, abort.signal);
      }
    });
    const done = () => {
      this.sockets.delete(sock);
      abort.abort(new BangerError('aborted', 'client disconnected'));
    };
    sock.on('close', done);
    sock.on('error', () => sock.destroy());
  }

  private async onLine(line: string, send: (o: unknown) => void, signal: AbortSignal): Promise<void> {
    let msg: any;
    try {
      msg = JSON.parse(line);
    } catch {
      send({ jsonrpc: '2.0', id: null, error: { code: ErrorCodes.ParseError, message: 'parse error: the request is not valid JSON', data: { kind: 'parse', hint: 'send one JSON-RPC 2.0 object per line' } } });
      return;
    }
    const id = msg && typeof msg === 'object' && (typeof msg.id === 'number' || typeof msg.id === 'string') ? msg.id : null;
    if (!msg || typeof msg !== 'object' || Array.isArray(msg) || msg.jsonrpc !== '2.0' || typeof msg.method !== 'string') {
      send({ jsonrpc: '2.0', id, error: { code: ErrorCodes.InvalidRequest, message: 'invalid request: expected {"jsonrpc":"2.0","id":…,"method":…,"params":{…}}', data: { kind: 'invalid_request' } } });
      return;
    }
    const method = msg.method as string;
    const schema = (methods as Record<string, z.ZodTypeAny>)[method];
    const handler = (this.handlers as Record<string, Handler | undefined>)[method];
    if (!schema || !handler) {
      send({ jsonrpc: '2.0', id, error: { code: ErrorCodes.MethodNotFound, message: `unknown method ${JSON.stringify(method)}`, data: { kind: 'method_not_found', hint: `known methods: ${Object.keys(methods).join(', ')}` } } });
      return;
    }
    const parsed = schema.safeParse(msg.params ?? {});
    if (!parsed.success) {
      send({ jsonrpc: '2.0', id, error: { code: ErrorCodes.InvalidParams, message: `invalid params for ${method}: ${formatZodError(parsed.error)}`, data: { kind: 'invalid_params' } } });
      return;
    }
    const requestId = id ?? 0;
    const ctx: CallContext = {
      requestId,
      signal,
      progress: (p) => send({ jsonrpc: '2.0', method: PROGRESS_METHOD, params: { requestId, ...p } }),
      stream: (data) => send({ jsonrpc: '2.0', method: STREAM_METHOD, params: { requestId, data } }),
    };
    try {
      const result = await handler(parsed.data, ctx);
      if (id !== null) send({ jsonrpc: '2.0', id, result: result ?? null });
    } catch (e) {
      if (!(e instanceof BangerError)) this.log(`internal error in ${method}: ${(e as Error)?.stack ?? e}`);
      if (id !== null) send({ jsonrpc: '2.0', id, error: toRpcError(e) });
    }
  }
}
