/**
 * The host side of the guest agent (src/host/image/agent.ts): one HTTP/1.1-style request over a channel to the
 * guest, and its answer. The guest is not trusted: every call has a deadline, an answer's head and body have caps,
 * and anything that is not a well-formed answer is an error naming what was wrong — never a hang, never unbounded
 * memory. Channels: a Unix socket to QEMU's virtio-serial port, or Firecracker's vsock Unix socket after the
 * `CONNECT <port>` handshake.
 */
import { randomBytes } from 'node:crypto';
import { createConnection, type Socket } from 'node:net';
import { z } from 'zod';
import { BangerError } from '../../errors.js';
import { aborted } from '../exec/wait.js';

/** Caps on what the guest may send back. */
export const AGENT_LIMITS = {
  /** Status line and headers of one answer. */
  headBytes: 8 * 1024,
  headers: 32,
  /** One answer's body. */
  bodyBytes: 64 * 1024,
  /** All bytes read in one call, stale answers skipped on the way included. */
  totalBytes: 256 * 1024,
  /** Firecracker's `OK <port>` line. */
  handshakeBytes: 64,
} as const;

export interface AgentAnswer {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

const protocolError = (what: string) => new BangerError('host', `the guest agent's answer is not valid: ${what}`);

/**
 * Reads answers from bytes as they come. `push` returns the answers completed so far; it throws a `host` error on
 * a malformed or oversized answer. Bytes after the last complete answer wait for the next push.
 */
export class AnswerParser {
  private buf = Buffer.alloc(0);
  private total = 0;

  push(chunk: Buffer): AgentAnswer[] {
    this.total += chunk.length;
    if (this.total > AGENT_LIMITS.totalBytes) throw protocolError(`more than ${AGENT_LIMITS.totalBytes} bytes in one call`);
    this.buf = Buffer.concat([this.buf, chunk]);
    const out: AgentAnswer[] = [];
    for (;;) {
      const a = this.next();
      if (!a) return out;
      out.push(a);
    }
  }

  private next(): AgentAnswer | undefined {
    // Empty lines between answers are skipped: the agent greets each virtio-serial connection with one.
    let skip = 0;
    while (skip < this.buf.length && (this.buf[skip] === 0x0a || this.buf[skip] === 0x0d)) skip++;
    this.buf = this.buf.subarray(skip);
    const end = this.buf.indexOf('\r\n\r\n');
    if (end < 0) {
      if (this.buf.length > AGENT_LIMITS.headBytes) throw protocolError(`its head is over ${AGENT_LIMITS.headBytes} bytes`);
      return undefined;
    }
    if (end > AGENT_LIMITS.headBytes) throw protocolError(`its head is over ${AGENT_LIMITS.headBytes} bytes`);
    const { status, headers } = parseHead(this.buf.subarray(0, end).toString('latin1'));
    const length = contentLength(headers);
    const start = end + 4;
    if (this.buf.length < start + length) return undefined;
    const body = Buffer.from(this.buf.subarray(start, start + length));
    this.buf = this.buf.subarray(start + length);
    return { status, headers, body };
  }
}

function parseHead(head: string): { status: number; headers: Record<string, string> } {
  const [statusLine, ...lines] = head.split('\r\n');
  const m = /^HTTP\/1\.[01] ([1-5]\d\d)(?: [\x20-\x7e]*)?$/.exec(statusLine);
  if (!m) throw protocolError(`bad status line ${JSON.stringify(statusLine.slice(0, 80))}`);
  if (lines.length > AGENT_LIMITS.headers) throw protocolError(`more than ${AGENT_LIMITS.headers} header lines`);
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const h = /^([A-Za-z0-9-]{1,64}):[ \t]*([\x20-\x7e]*?)[ \t]*$/.exec(line);
    if (!h) throw protocolError(`bad header line ${JSON.stringify(line.slice(0, 80))}`);
    const name = h[1].toLowerCase();
    if (name in headers) throw protocolError(`header ${name} given twice`);
    headers[name] = h[2];
  }
  return { status: Number(m[1]), headers };
}

function contentLength(headers: Record<string, string>): number {
  const v = headers['content-length'];
  if (v === undefined) throw protocolError('no Content-Length');
  if (!/^\d{1,9}$/.test(v)) throw protocolError(`bad Content-Length ${JSON.stringify(v)}`);
  const n = Number(v);
  if (n > AGENT_LIMITS.bodyBytes) throw protocolError(`a body of ${n} bytes is over the limit of ${AGENT_LIMITS.bodyBytes}`);
  return n;
}

/** A channel to the agent: opens a connection, ready for a request (a handshake, if any, done). */
export type AgentChannel = (timeoutMs: number) => Promise<Socket>;

/** The request's tag: the answer must carry it back. */
export const newRequestId = () => randomBytes(9).toString('base64url');

export type AgentMethod = 'GET' | 'POST';

export function requestBytes(method: AgentMethod, path: string, id: string): Buffer {
  return Buffer.from(`${method} ${path} HTTP/1.1\r\nHost: banger-agent\r\nX-Banger-Request: ${id}\r\n\r\n`, 'latin1');
}

/**
 * One request to the agent over a fresh connection, answered within `timeoutMs` (connecting included) unless
 * `signal` aborts it first. Answers that carry another request's tag (left over from a client that gave up) are
 * skipped. No request has a body.
 */
export async function agentRequest(channel: AgentChannel, method: AgentMethod, path: string, timeoutMs: number, signal?: AbortSignal): Promise<AgentAnswer> {
  const deadline = Date.now() + timeoutMs;
  if (signal?.aborted) throw aborted(`${method} ${path} to the guest agent`, signal);
  const sock = await channel(timeoutMs);
  const id = newRequestId();
  return new Promise<AgentAnswer>((resolve, reject) => {
    const parser = new AnswerParser();
    const onAbort = () => finish(aborted(`${method} ${path} to the guest agent`, signal));
    signal?.addEventListener('abort', onAbort, { once: true });
    const finish = (err: Error | undefined, a?: AgentAnswer) => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      sock.removeAllListeners('data');
      sock.destroy();
      if (err) reject(err);
      else resolve(a!);
    };
    const timer = setTimeout(() => finish(new BangerError('timeout', `the guest agent did not answer ${method} ${path} within ${timeoutMs} ms`)), Math.max(1, deadline - Date.now()));
    sock.on('data', (chunk: Buffer) => {
      try {
        const mine = parser.push(chunk).find((a) => a.headers['x-banger-request'] === id);
        if (mine) finish(undefined, mine);
      } catch (e) {
        finish(e as Error);
      }
    });
    sock.once('error', (e) => finish(new BangerError('host', `the guest agent's channel failed: ${e.message}`)));
    sock.once('close', () => finish(new BangerError('host', `the guest agent's channel closed before it answered ${method} ${path}`)));
    sock.write(requestBytes(method, path, id));
    sock.resume();
  });
}

/** Connects to a Unix socket within `timeoutMs`. */
export function connectUnix(path: string, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const sock = createConnection(path);
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new BangerError('timeout', `connecting to ${path} took more than ${timeoutMs} ms`));
    }, timeoutMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.removeAllListeners('error');
      resolve(sock);
    });
    sock.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new BangerError('host', `cannot reach the guest agent's socket ${path} (${e.code ?? e.message})`));
    });
  });
}

/** QEMU: the virtio-serial port's host side is a plain Unix socket. */
export const unixChannel = (path: string): AgentChannel => (timeoutMs) => connectUnix(path, timeoutMs);

/**
 * Firecracker's vsock: connect to its Unix socket, send `CONNECT <port>\n`, and read `OK <host port>\n` (Firecracker
 * closes the connection instead when nothing in the guest listens on the port). Bytes after the OK line belong to
 * the guest's stream and are put back.
 */
export function firecrackerVsockChannel(udsPath: string, port: number): AgentChannel {
  if (!Number.isInteger(port) || port < 0 || port > 0xffffffff) throw new BangerError('internal', `invalid vsock port ${port}`);
  return async (timeoutMs) => {
    const sock = await connectUnix(udsPath, timeoutMs);
    return new Promise<Socket>((resolve, reject) => {
      let got = Buffer.alloc(0);
      const fail = (msg: string) => {
        clearTimeout(timer);
        sock.removeAllListeners('data');
        sock.destroy();
        reject(new BangerError('host', `Firecracker's vsock at ${udsPath}: ${msg}`));
      };
      const timer = setTimeout(() => fail(`no answer to CONNECT ${port} within ${timeoutMs} ms`), timeoutMs);
      sock.on('data', (chunk: Buffer) => {
        got = Buffer.concat([got, chunk]);
        const nl = got.indexOf(0x0a);
        if (nl < 0) {
          if (got.length > AGENT_LIMITS.handshakeBytes) fail(`CONNECT ${port} was answered with ${got.length} bytes and no line end`);
          return;
        }
        const line = got.subarray(0, nl).toString('latin1');
        if (!/^OK \d{1,10}$/.test(line)) return fail(`CONNECT ${port} was answered ${JSON.stringify(line.slice(0, 64))}, not OK <port>`);
        clearTimeout(timer);
        sock.pause();
        for (const ev of ['data', 'close', 'error']) sock.removeAllListeners(ev);
        const rest = got.subarray(nl + 1);
        if (rest.length) sock.unshift(rest);
        resolve(sock);
      });
      sock.once('error', (e) => fail(`the connection failed after CONNECT ${port}: ${e.message}`));
      sock.once('close', () => fail(`the connection closed after CONNECT ${port}: nothing in the guest listens on vsock port ${port} (yet)`));
      sock.write(`CONNECT ${port}\n`);
    });
  };
}

const count = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const diskOf = z.strictObject({ freeBytes: count, totalBytes: count });

/** `GET /healthz`'s body, as the guest agent writes it. */
export const HealthzSchema = z.strictObject({
  ok: z.literal(true),
  uptimeSeconds: z.number().nonnegative().finite(),
  load: z.tuple([z.number().nonnegative().finite(), z.number().nonnegative().finite(), z.number().nonnegative().finite()]),
  memory: z.strictObject({ totalKiB: count, availableKiB: count }),
  disk: z.strictObject({ '/': diskOf, '/root': diskOf }),
  sessionsRunning: count,
});

export type Healthz = z.infer<typeof HealthzSchema>;

/** The health an answer carries; a `host` error naming what is wrong with it otherwise. */
export function parseHealthz(a: AgentAnswer): Healthz {
  const text = a.body.toString('utf8');
  if (a.status !== 200) throw new BangerError('host', `the guest agent answered GET /healthz with HTTP ${a.status}: ${JSON.stringify(text.slice(0, 200))}`);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw protocolError(`its /healthz body is not JSON: ${JSON.stringify(text.slice(0, 200))}`);
  }
  const r = HealthzSchema.safeParse(json);
  if (!r.success) throw protocolError(`its /healthz body does not fit: ${r.error.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ')}`);
  return r.data;
}

/** GET /healthz over `channel`, bounded by `timeoutMs`. */
export async function agentHealth(channel: AgentChannel, timeoutMs: number): Promise<Healthz> {
  return parseHealthz(await agentRequest(channel, 'GET', '/healthz', timeoutMs));
}

/**
 * POST /identity: the guest applies its identity disk again, network and MAC included (image builder 5 and later).
 * Resolves once it has; a `host` error with the agent's words otherwise.
 */
export async function agentRefreshIdentity(channel: AgentChannel, timeoutMs: number, signal?: AbortSignal): Promise<void> {
  const a = await agentRequest(channel, 'POST', '/identity', timeoutMs, signal);
  if (a.status !== 200) throw new BangerError('host', `the guest agent answered POST /identity with HTTP ${a.status}: ${JSON.stringify(a.body.toString('utf8').slice(0, 200))}`);
}
