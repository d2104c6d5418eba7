import { mkdtemp, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../src/errors.js';
import { LineDecoder } from '../../src/rpc/ndjson.js';
import { methods, type MethodName } from '../../src/rpc/protocol.js';
import { MAX_REQUEST_LINE, MAX_UNREAD_BYTES, RpcServer, type Handlers } from '../../src/rpc/server.js';

/**
 * Hostile frames against a real RpcServer on a Unix socket. Every complete line must get exactly one answer with
 * the right id (null when none can be read), no handler may run for a bad frame, and the server keeps serving.
 * The frames come from a seeded PRNG: a failure reproduces.
 */

const FRAMES_PER_CONNECTION = 1500;
const CONNECTIONS = 4;
const INHERITED = ['toString', 'constructor', '__proto__', 'hasOwnProperty', 'valueOf', 'isPrototypeOf', 'propertyIsEnumerable', 'toLocaleString', '__defineGetter__', '__lookupSetter__'];

let dir: string;
let socketPath: string;
let server: RpcServer;
const calls: Array<{ method: string; params: unknown }> = [];
const serverLog: string[] = [];
const BIG_ANSWER = 'x'.repeat(1024 * 1024);

function recordingHandlers(): Handlers {
  const record = (method: MethodName) => async (params: unknown): Promise<unknown> => {
    calls.push({ method, params });
    if (method === 'daemon.status') return { pid: process.pid, ok: true };
    if (method === 'image.list') return BIG_ANSWER; // for the client that never reads
    return { method };
  };
  // The answers are markers this test compares on the wire, not the protocol's result shapes.
  return Object.fromEntries((Object.keys(methods) as MethodName[]).map((m) => [m, record(m)])) as unknown as Handlers;
}

/** mulberry32: small, seeded, good enough to pick frames. */
function prng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  return { next, int, pick };
}
type Rand = ReturnType<typeof prng>;

/** One frame (without its newline) and what must answer it: this id (null: none readable) with this code. */
interface Frame {
  data: string | Buffer;
  id: number | string | null;
  code: number;
  good?: boolean;
}

const req = (id: unknown, method: unknown, params?: unknown) =>
  JSON.stringify({ jsonrpc: '2.0', id, method, ...(params === undefined ? {} : { params }) });

const WRONG_PARAMS: Array<[MethodName, unknown]> = [
  ['vm.show', { vm: 5 }],
  ['vm.show', { vm: '' }],
  ['vm.show', { vm: 'v'.repeat(200) }],
  ['vm.show', {}],
  ['vm.create', { vcpus: '2' }],
  ['vm.create', { vcpus: 0 }],
  ['vm.create', { memoryMiB: 1.5 }],
  ['vm.create', { vmm: 'xen' }],
  ['image.pull', { name: 5 }],
  ['vm.wait', { vm: 'a', state: 'exploded' }],
  ['vm.logs', { vm: 'a', afterSeq: 'yesterday' }],
  ['vm.workspace.prepare', { vm: 'a' }],
];
const NOT_OBJECTS: unknown[] = [null, [], [1, 2], 'params', 7, true];
const BAD_IDS: unknown[] = [null, { a: 1 }, [1], true, 'i'.repeat(129)];
const BAD_METHODS: unknown[] = [7, null, true, { name: 'daemon.status' }, ['daemon.status']];
const TOP_LEVEL: string[] = ['[]', '[{"jsonrpc":"2.0","id":1,"method":"daemon.status"}]', 'null', '42', '"daemon.status"', 'true', '{}'];
const MALFORMED: string[] = ['{', '}', '{"jsonrpc":', '{"jsonrpc":"2.0","id":1,"method":"daemon.status"', "{'a':1}", 'undefined', 'NaN', '{"a":1,}', '\u0000', 'nul'];

/** One hostile frame of a random kind, using `id` when it carries one; about one in fourteen is a good request. */
function hostileFrame(rand: Rand, id: number): Frame {
  const methodsList = Object.keys(methods) as MethodName[];
  switch (rand.int(14)) {
    case 0: {
      const text = rand.pick(MALFORMED);
      return { data: `${text}${rand.int(2) ? 'x' : ''}`, id: null, code: ErrorCodes.ParseError };
    }
    case 1:
      return { data: req(id, rand.pick(INHERITED), {}), id, code: ErrorCodes.MethodNotFound };
    case 2:
      return { data: req(id, `no.such.${rand.int(1e6)}`, {}), id, code: ErrorCodes.MethodNotFound };
    case 3: {
      const [method, params] = rand.pick(WRONG_PARAMS);
      return { data: req(id, method, params), id, code: ErrorCodes.InvalidParams };
    }
    case 4:
      return { data: req(id, rand.pick(methodsList), { [`bogus${rand.int(100)}`]: rand.int(5) }), id, code: ErrorCodes.InvalidParams };
    case 5:
      return { data: req(id, 'daemon.status', rand.pick(NOT_OBJECTS)), id, code: ErrorCodes.InvalidParams };
    case 6:
      return { data: req(rand.pick(BAD_IDS), 'daemon.status', {}), id: null, code: ErrorCodes.InvalidRequest };
    case 7:
      return { data: JSON.stringify({ jsonrpc: '2.0', method: 'daemon.status', params: {} }), id: null, code: ErrorCodes.InvalidRequest };
    case 8:
      return { data: req(id, rand.pick(BAD_METHODS), {}), id, code: ErrorCodes.InvalidRequest };
    case 9:
      return { data: JSON.stringify({ jsonrpc: rand.pick(['1.0', 2, null]), id, method: 'daemon.status' }), id, code: ErrorCodes.InvalidRequest };
    case 10:
      return { data: rand.pick(TOP_LEVEL), id: null, code: ErrorCodes.InvalidRequest };
    case 11: {
      // binary noise: never a newline, never blank (a blank line is not a frame)
      const bytes = Buffer.from(Array.from({ length: 1 + rand.int(300) }, () => rand.int(256)).map((b) => (b === 0x0a ? 0x0b : b)));
      return { data: Buffer.concat([Buffer.from('x'), bytes]), id: null, code: ErrorCodes.ParseError };
    }
    case 12:
      // an id string with a quote and unicode, and a __proto__ key in params
      return { data: `{"jsonrpc":"2.0","id":"é\\"${id}","method":"daemon.status","params":{"__proto__":{"x":1}}}`, id: `é"${id}`, code: ErrorCodes.InvalidParams };
    default:
      return { data: req(id, 'daemon.status', {}), id, code: 0, good: true };
  }
}

/** Rare, big frames: deep nesting and lines over the limit. */
function bigFrames(id: number): Frame[] {
  const deep = 100_000;
  return [
    { data: '['.repeat(deep), id: null, code: ErrorCodes.ParseError },
    { data: `${'['.repeat(deep)}${']'.repeat(deep)}`, id: null, code: ErrorCodes.InvalidRequest },
    { data: req(id, 'daemon.status', { x: 0 }).replace('{"x":0}', `{"x":${'['.repeat(deep)}${']'.repeat(deep)}}`), id, code: ErrorCodes.InvalidParams },
    { data: req(id + 1, 'a'.repeat(MAX_REQUEST_LINE + 10), {}), id: null, code: ErrorCodes.InvalidRequest },
    { data: req(id + 2, 'daemon.status', { blob: 'b'.repeat(2 * MAX_REQUEST_LINE) }), id: null, code: ErrorCodes.InvalidRequest },
  ];
}

/** A raw connection that collects every answer line. */
async function rawClient(): Promise<{ sock: Socket; answers: any[]; closed: Promise<void> }> {
  const sock = connect(socketPath);
  await new Promise<void>((res, rej) => sock.once('connect', res).once('error', rej));
  const answers: any[] = [];
  const decoder = new LineDecoder();
  sock.setEncoding('utf8');
  sock.on('data', (c: string) => {
    for (const line of decoder.push(c)) answers.push(JSON.parse(line));
  });
  const closed = new Promise<void>((res) => sock.once('close', () => res()));
  sock.on('error', () => {});
  return { sock, answers, closed };
}

async function until(cond: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Every frame answered exactly once, with its id and code; bad frames carry data {kind, hint}. */
function checkAnswers(frames: Frame[], answers: any[]): void {
  const byId = new Map<number | string, Frame>();
  for (const f of frames) if (f.id !== null) byId.set(f.id, f);
  const seen = new Set<number | string>();
  let nulls = 0;
  for (const a of answers) {
    expect(a.jsonrpc).toBe('2.0');
    if (a.id === null) {
      nulls++;
      expect([ErrorCodes.ParseError, ErrorCodes.InvalidRequest]).toContain(a.error?.code);
    } else {
      const f = byId.get(a.id);
      expect(f, `answer for an id never sent: ${JSON.stringify(a.id)}`).toBeDefined();
      expect(seen.has(a.id), `two answers for id ${JSON.stringify(a.id)}`).toBe(false);
      seen.add(a.id);
      if (f!.good) expect(a.result, JSON.stringify(a)).toEqual({ pid: process.pid, ok: true });
      else expect(a.error?.code, `${String(f!.data).slice(0, 200)} → ${JSON.stringify(a).slice(0, 300)}`).toBe(f!.code);
    }
    if (a.error) {
      expect(typeof a.error.message).toBe('string');
      expect(typeof a.error.data?.kind).toBe('string');
      expect(typeof a.error.data?.hint).toBe('string');
    }
  }
  expect(seen.size).toBe(byId.size);
  expect(nulls).toBe(frames.filter((f) => f.id === null).length);
  // null-id frames: the codes add up too
  const nullCodes = (fs: Array<{ code?: number }>) => fs.reduce((m, f) => m.set(f.code!, (m.get(f.code!) ?? 0) + 1), new Map<number, number>());
  expect(nullCodes(answers.filter((a) => a.id === null).map((a) => ({ code: a.error.code })))).toEqual(nullCodes(frames.filter((f) => f.id === null)));
}

/** Send frames in random pieces (cut anywhere, multibyte characters included), or all in one write. */
async function sendFrames(sock: Socket, frames: Frame[], rand: Rand, oneWrite: boolean): Promise<void> {
  const all = Buffer.concat(frames.flatMap((f) => [Buffer.isBuffer(f.data) ? f.data : Buffer.from(f.data), Buffer.from('\n')]));
  if (oneWrite) {
    await new Promise<void>((r) => sock.write(all, () => r()));
    return;
  }
  for (let at = 0; at < all.length; ) {
    const n = 1 + rand.int(rand.int(4) === 0 ? 200_000 : 2000);
    const piece = all.subarray(at, at + n);
    at += n;
    if (!sock.write(piece)) await new Promise((r) => sock.once('drain', r));
  }
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'brpcfuzz-'));
  socketPath = join(dir, 'run', 'daemon.sock');
  server = new RpcServer(recordingHandlers(), (l) => serverLog.push(l));
  await server.listen(socketPath);
});

afterAll(async () => {
  await server?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('RPC server under hostile frames', () => {
  it('answers inherited method names with method not found (-32601), and runs nothing', async () => {
    const c = await rawClient();
    const names = ['toString', 'constructor', '__proto__', 'hasOwnProperty', 'valueOf'];
    names.forEach((m, i) => c.sock.write(`${req(i + 1, m, {})}\n`));
    await until(() => c.answers.length === names.length, 'answers');
    for (const a of c.answers) {
      expect(a.error).toMatchObject({ code: ErrorCodes.MethodNotFound, data: { kind: 'method_not_found' } });
      expect(a.error.message).toBe(`unknown method ${JSON.stringify(names[a.id - 1])}`);
    }
    expect(calls).toEqual([]);
    c.sock.destroy();
  });

  it('answers every frame of thousands exactly once, runs handlers only for good ones, and keeps serving', { timeout: 120_000 }, async () => {
    calls.length = 0;
    const rand = prng(20240611);
    let nextId = 1;
    let sent = 0;
    let goodSent = 0;
    await Promise.all(
      Array.from({ length: CONNECTIONS }, async (_, conn) => {
        const frames: Frame[] = [];
        for (let i = 0; i < FRAMES_PER_CONNECTION; i++) frames.push(hostileFrame(rand, nextId++));
        frames.splice(rand.int(frames.length), 0, ...bigFrames(nextId));
        nextId += 3;
        sent += frames.length;
        goodSent += frames.filter((f) => f.good).length;
        const c = await rawClient();
        await sendFrames(c.sock, frames, rand, conn === 0);
        await until(() => c.answers.length >= frames.length, `${frames.length} answers on connection ${conn} (have ${c.answers.length})`);
        await new Promise((r) => setTimeout(r, 100)); // nothing more may come
        checkAnswers(frames, c.answers);
        // the same connection still works after all that
        c.sock.write(`${req('after', 'daemon.status', {})}\n`);
        await until(() => c.answers.length === frames.length + 1, 'the answer after the fuzz');
        expect(c.answers.at(-1)).toEqual({ jsonrpc: '2.0', id: 'after', result: { pid: process.pid, ok: true } });
        c.sock.destroy();
      }),
    );
    console.log(`rpc-fuzz: sent ${sent} frames on ${CONNECTIONS} connections (${goodSent} good ones among them)`);
    expect(sent).toBeGreaterThan(5000);
    expect(calls).toHaveLength(goodSent + CONNECTIONS);
    for (const call of calls) expect(call).toEqual({ method: 'daemon.status', params: {} });
  });

  it('drops half frames at close without answering or running them', async () => {
    calls.length = 0;
    for (const half of ['{"jsonrpc":"2.0","id":1,"method":"daemon.status","params":{}}', '{"jsonrpc":"2.0","id":2,"meth', 'é'.repeat(1000)]) {
      const c = await rawClient();
      c.sock.end(half); // no newline: not a complete frame
      await c.closed;
      expect(c.answers).toEqual([]);
    }
    // a client that ends after its last complete frame still gets its answer
    const c = await rawClient();
    c.sock.end(`${req(9, 'daemon.status', {})}\n`);
    await c.closed;
    expect(c.answers).toEqual([{ jsonrpc: '2.0', id: 9, result: { pid: process.pid, ok: true } }]);
    expect(calls).toHaveLength(1);
  });

  it('cuts off a client that sends requests but never reads the answers', async () => {
    calls.length = 0;
    const sock = connect(socketPath);
    await new Promise<void>((res, rej) => sock.once('connect', res).once('error', rej));
    sock.pause(); // never reads: the answers (1 MiB each) pile up on the server
    let cut = false;
    sock.on('error', () => (cut = true));
    sock.on('close', () => (cut = true));
    const limit = 4 * (MAX_UNREAD_BYTES / BIG_ANSWER.length);
    let sent = 0;
    for (; sent < limit && !cut; sent++) {
      sock.write(`${req(sent + 1, 'image.list', {})}\n`);
      await new Promise((r) => setTimeout(r, 5));
    }
    await until(() => cut || serverLog.some((l) => l.includes('unread')), 'the server to cut the connection', 5000);
    sock.destroy();
    console.log(`rpc-fuzz: a client that never reads was cut off after ${sent} requests (${calls.length} answered, 1 MiB each)`);
    expect(serverLog.some((l) => /left \d+ bytes of answers unread/.test(l))).toBe(true);
    // what stayed queued was bounded by the cap: the cut came within a few answers past it
    expect(calls.length).toBeGreaterThanOrEqual(MAX_UNREAD_BYTES / BIG_ANSWER.length);
    expect(calls.length).toBeLessThan(limit);
    // and everyone else is still served
    const c = await rawClient();
    c.sock.write(`${req(1, 'daemon.status', {})}\n`);
    await until(() => c.answers.length === 1, 'daemon.status after the cut');
    expect(c.answers[0].result).toEqual({ pid: process.pid, ok: true });
    c.sock.destroy();
  });
});
