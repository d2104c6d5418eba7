/** JSON-RPC client over the daemon socket. A connection that closes rejects every pending request. */
import { connect, type Socket } from 'node:net';
import { BangerError, type ErrorKind } from '../errors.js';
import { PROGRESS_METHOD, STREAM_METHOD, type MethodName, type ParamsOf, type ProgressParams, type RpcResponse } from './protocol.js';

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  onProgress?: (p: ProgressParams) => void;
  onStream?: (data: unknown) => void;
}

export interface CallOptions {
  onProgress?: (p: ProgressParams) => void;
  onStream?: (data: unknown) => void;
  timeoutMs?: number;
}

export class RpcClient {
  private nextId = 1;
  private pending = new Map<number, Pending>();
  private buf = '';
  private closed = false;
  private constructor(private sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (c: string) => this.onData(c));
    const fail = (why: string) => {
      if (this.closed) return;
      this.closed = true;
      for (const p of this.pending.values()) p.reject(new BangerError('host', `lost the connection to the banger daemon (${why})`, 'see `banger daemon status` and the daemon log in $BANGER_HOME/daemon.log'));
      this.pending.clear();
    };
    sock.on('close', () => fail('connection closed'));
    sock.on('error', (e) => fail(e.message));
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

  call<M extends MethodName>(method: M, params: ParamsOf<M>, opts: CallOptions = {}): Promise<any> {
    if (this.closed) return Promise.reject(new BangerError('host', 'the daemon connection is closed'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const done = (f: (v: any) => void) => (v: unknown) => {
        if (timer) clearTimeout(timer);
        this.pending.delete(id);
        f(v);
      };
      this.pending.set(id, { resolve: done(resolve), reject: done(reject), onProgress: opts.onProgress, onStream: opts.onStream });
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
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      if (!line.trim()) continue;
      let msg: any;
      try {
        msg = JSON.parse(line);
      } catch {
        continue;
      }
      if (msg.method === PROGRESS_METHOD) {
        this.pending.get(Number(msg.params?.requestId))?.onProgress?.(msg.params);
      } else if (msg.method === STREAM_METHOD) {
        this.pending.get(Number(msg.params?.requestId))?.onStream?.(msg.params.data);
      } else if (msg.id !== undefined) {
        const p = this.pending.get(Number(msg.id));
        if (!p) continue;
        const r = msg as RpcResponse;
        if (r.error) p.reject(new BangerError((r.error.data?.kind as ErrorKind) ?? 'internal', r.error.message, r.error.data?.hint));
        else p.resolve(r.result);
      }
    }
  }
}
