import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Runner } from '../../src/host/exec/runner.js';
import { LineDecoder } from '../../src/rpc/ndjson.js';
import { RootHelperClient } from '../../src/roothelper/client.js';
import { MAX_LINE_BYTES } from '../../src/roothelper/protocol.js';
import { startRootHelper, type HelperOps, type RootHelperServer } from '../../src/roothelper/server.js';

/**
 * Hostile frames against the root helper's real server on its socket. Nothing here needs root: every operation
 * is replaced by a recorder and every command goes to a recording runner, so "nothing ran" is checked on what
 * the helper asked for, not on the host's devices. Every complete line must get exactly one answer with its id
 * (null when the envelope is unreadable), no operation may run for a bad frame, and the helper keeps serving.
 */

const FRAMES = 4000;
const INHERITED = ['toString', 'constructor', '__proto__', 'hasOwnProperty', 'valueOf', 'isPrototypeOf', 'toLocaleString', '__defineSetter__'];

let dir: string;
let stateDir: string;
let socketPath: string;
let helper: RootHelperServer;
const opCalls: string[] = [];
const commands: string[][] = [];
const logs: string[] = [];

function recordingOps(): HelperOps {
  const record = (name: string) => {
    opCalls.push(name);
  };
  return {
    createTap: async (_caller, name) => (record('createTap'), { name, created: true }),
    deleteTap: async (_caller, name) => (record('deleteTap'), { name, deleted: true }),
    listTaps: async () => (record('listTaps'), { taps: [] }),
    ensureBridge: async () => (record('ensureBridge'), { name: 'banger0', cidr: '172.30.0.1/24', created: true, addressAdded: true }),
    jail: async () => {
      record('jail');
      throw new Error('jail must not run in this test');
    },
    unjail: async () => (record('unjail'), { removed: [] }),
    firewall: {
      set: async (vm) => (record('firewall.set'), { installed: true, vms: [vm] }),
      clear: async () => (record('firewall.clear'), { installed: false, vms: [] }),
      status: async () => (record('firewall.status'), { installed: false, vms: [] }),
    },
  };
}

const recordingRunner: Runner = async (file, args) => {
  commands.push([file, ...args]);
  return { exitCode: 0, stdout: '[]', stderr: '' };
};

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
  return { int, pick };
}
type Rand = ReturnType<typeof prng>;

/** A frame (no newline) and what answers it: this id (null: envelope unreadable) and error kind, or ok. */
interface Frame {
  data: string | Buffer;
  id: number | string | null;
  kind?: string;
  op?: string;
}

const line = (id: unknown, verb: unknown, args?: unknown) => JSON.stringify({ id, verb, ...(args === undefined ? {} : { args }) });

function badArgs(): Array<[string, unknown]> {
  return [
    ['tap.create', { name: 'eth0', uid: 1000 }],
    ['tap.create', { name: 'bgtap0;rm -rf /', uid: 1000 }],
    ['tap.create', { name: 'bgtap$(id)', uid: 1000 }],
    ['tap.create', { name: 'bgtap0', uid: -1 }],
    ['tap.create', { name: 'bgtap0', uid: '0' }],
    ['tap.create', { name: 'bgtap0', uid: 2 ** 40 }],
    ['tap.create', { name: ['bgtap0'], uid: 1 }],
    ['tap.create', {}],
    ['tap.create', { name: 'bgtap0' }], // not this owner's tag
    ['tap.delete', { name: 'bgtapzzzz0' }],
    ['tap.delete', { name: 'lo' }],
    ['bridge.ensure', { name: 'banger0', cidr: '8.8.8.1/24', nat: true }],
    ['bridge.ensure', { name: 'docker0' }],
    ['bridge.ensure', { nat: 'yes' }],
    ['firecracker.unjail', { id: '../../etc' }],
    ['firecracker.jail', { id: 'x', uid: 0, gid: 0 }],
    ['firecracker.jail', { id: 'x', vmDir: '/etc', binary: '/bin/sh', kernel: '/k', rootDisk: '/r', workDisk: '/w' }],
    ['firecracker.jail', { id: 'x', vmDir: `${stateDir}/vms/../../`, binary: '/bin/sh', kernel: '/k', rootDisk: '/r', workDisk: '/w' }],
    ['firecracker.jail', { id: 'x', vmDir: 'relative/path', binary: '/bin/sh', kernel: '/k', rootDisk: '/r', workDisk: '/w' }],
    ['firecracker.jail', { id: 'x', vmDir: `${stateDir}/vms/nope\u0000`, binary: '/bin/sh', kernel: '/k', rootDisk: '/r', workDisk: '/w' }],
  ];
}

const BAD_IDS: unknown[] = [-1, 1.5, null, { a: 1 }, [1], true, 'i'.repeat(65)];
const NOT_OBJECT_ARGS: unknown[] = [[], ['bgtap0'], 'bgtap0', 5, true];
const MALFORMED = ['{', '{"id":1,"verb":"ping"', "{'id':1}", 'ping', '{"id":1,}', 'NaN'];
const TOP_LEVEL = ['[]', '[{"id":1,"verb":"ping"}]', 'null', '42', '"ping"', '{}'];

function hostileFrame(rand: Rand, id: number): Frame {
  switch (rand.int(12)) {
    case 0:
      return { data: rand.pick(MALFORMED), id: null, kind: 'parse' };
    case 1:
      return { data: line(id, rand.pick(INHERITED), {}), id, kind: 'method_not_found' };
    case 2:
      return { data: line(id, rand.pick(['exec', 'sh', 'tap.create ', 'TAP.CREATE', '', 'ping\u0000', `x${rand.int(1e6)}`]), {}), id, kind: 'method_not_found' };
    case 3: {
      const [verb, args] = rand.pick(badArgs());
      return { data: line(id, verb, args), id, kind: 'invalid_params' };
    }
    case 4:
      return { data: line(id, rand.pick(['ping', 'tap.list', 'tap.delete']), { name: 'bgtap0', [`netns${rand.int(9)}`]: '/proc/1/ns/net' }), id, kind: 'invalid_params' };
    case 5:
      return { data: line(id, 'tap.create', rand.pick(NOT_OBJECT_ARGS)), id, kind: 'invalid_params' };
    case 6:
      return { data: line(rand.pick(BAD_IDS), 'ping', {}), id: null, kind: 'invalid_request' };
    case 7:
      return { data: rand.pick([JSON.stringify({ id, verb: 'ping', sudo: true }), line(id, 7, {}), line(id, null), line(id, 'v'.repeat(65)), JSON.stringify({ verb: 'ping' })]), id: null, kind: 'invalid_request' };
    case 8:
      return { data: rand.pick(TOP_LEVEL), id: null, kind: 'invalid_request' };
    case 9: {
      const bytes = Buffer.from(Array.from({ length: 1 + rand.int(300) }, () => rand.int(256)).map((b) => (b === 0x0a ? 0x0b : b)));
      return { data: Buffer.concat([Buffer.from('x'), bytes]), id: null, kind: 'parse' };
    }
    case 10:
      return rand.int(2) ? { data: line(id, 'ping', {}), id } : { data: line(`s${id}`, 'tap.list', {}), id: `s${id}`, op: 'listTaps' };
    default:
      // an args object whose key is __proto__: an unknown field, never a prototype
      return { data: `{"id":${id},"verb":"tap.create","args":{"__proto__":{"name":"bgtap0","uid":1000}}}`, id, kind: 'invalid_params' };
  }
}

/** Deep nesting, as deep as the 64 KiB line allows. */
function deepFrames(id: number): Frame[] {
  const deep = 30_000;
  return [
    { data: '['.repeat(deep), id: null, kind: 'parse' },
    { data: `${'['.repeat(deep)}${']'.repeat(deep)}`, id: null, kind: 'invalid_request' },
    { data: line(id, 'tap.create', { name: 0, uid: 1 }).replace('"name":0', `"name":${'['.repeat(deep)}${']'.repeat(deep)}`), id, kind: 'invalid_params' },
  ];
}

async function rawClient(): Promise<{ sock: Socket; answers: any[]; closed: Promise<void> }> {
  const sock = connect(socketPath);
  await new Promise<void>((res, rej) => sock.once('connect', res).once('error', rej));
  const answers: any[] = [];
  const decoder = new LineDecoder();
  sock.setEncoding('utf8');
  sock.on('data', (c: string) => {
    for (const l of decoder.push(c)) answers.push(JSON.parse(l));
  });
  sock.on('error', () => {});
  const closed = new Promise<void>((res) => sock.once('close', () => res()));
  return { sock, answers, closed };
}

async function until(cond: () => boolean, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function checkAnswers(frames: Frame[], answers: any[]): void {
  const byId = new Map<number | string, Frame>();
  for (const f of frames) if (f.id !== null) byId.set(f.id, f);
  const seen = new Set<number | string>();
  const nullKinds: string[] = [];
  for (const a of answers) {
    if (a.id === null) {
      expect(a.ok).toBe(false);
      nullKinds.push(a.error.kind);
      continue;
    }
    const f = byId.get(a.id);
    expect(f, `answer for an id never sent: ${JSON.stringify(a.id)}`).toBeDefined();
    expect(seen.has(a.id), `two answers for ${JSON.stringify(a.id)}`).toBe(false);
    seen.add(a.id);
    const what = `${String(f!.data).slice(0, 200)} → ${JSON.stringify(a).slice(0, 300)}`;
    if (f!.kind) {
      expect(a.ok, what).toBe(false);
      expect(a.error.kind, what).toBe(f!.kind);
      expect(typeof a.error.message).toBe('string');
    } else expect(a.ok, what).toBe(true);
  }
  expect(seen.size).toBe(byId.size);
  const expectedNullKinds = frames.filter((f) => f.id === null).map((f) => f.kind!);
  expect(nullKinds.sort()).toEqual(expectedNullKinds.sort());
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'brhfuzz-'));
  stateDir = join(dir, 'state');
  await mkdir(join(stateDir, 'vms', 'vm1'), { recursive: true });
  socketPath = join(dir, 'helper.sock');
  helper = await startRootHelper({ socketPath, stateDir, owner: { uid: process.getuid!(), gid: process.getgid!() }, runner: recordingRunner, ops: recordingOps(), log: (l) => logs.push(l) });
});

afterAll(async () => {
  await helper?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('root helper under hostile frames', () => {
  it('refuses inherited verb names as unknown verbs, and runs nothing', async () => {
    const client = await RootHelperClient.connect(socketPath);
    try {
      for (const verb of ['toString', 'constructor', '__proto__', 'hasOwnProperty', 'valueOf']) {
        const e = await client.request(verb, {}).then(
          () => undefined,
          (err) => err,
        );
        expect(e?.kind, verb).toBe('method_not_found');
        expect(e.message).toBe(`refused verb ${JSON.stringify(verb)}: not one the root helper accepts`);
      }
      expect(await client.request('ping', {})).toMatchObject({ version: 2 });
    } finally {
      client.close();
    }
    expect(opCalls).toEqual([]);
    expect(commands).toEqual([]);
  });

  it('answers every frame of thousands exactly once, runs an operation only for good ones, and keeps serving', { timeout: 120_000 }, async () => {
    opCalls.length = 0;
    logs.length = 0;
    const rand = prng(7_000_001);
    const frames: Frame[] = Array.from({ length: FRAMES }, (_, i) => hostileFrame(rand, i + 1));
    frames.splice(rand.int(frames.length), 0, ...deepFrames(FRAMES + 1));
    const c = await rawClient();
    const all = Buffer.concat(frames.flatMap((f) => [Buffer.isBuffer(f.data) ? f.data : Buffer.from(f.data), Buffer.from('\n')]));
    for (let at = 0; at < all.length; ) {
      const n = 1 + rand.int(rand.int(4) === 0 ? 60_000 : 1500);
      if (!c.sock.write(all.subarray(at, at + n))) await new Promise((r) => c.sock.once('drain', r));
      at += n;
    }
    await until(() => c.answers.length >= frames.length, `${frames.length} answers (have ${c.answers.length})`);
    await new Promise((r) => setTimeout(r, 100));
    checkAnswers(frames, c.answers);
    const bad = frames.filter((f) => f.kind).length;
    console.log(`roothelper-fuzz: sent ${frames.length} frames (${bad} hostile, ${frames.length - bad} good)`);
    expect(opCalls).toEqual(frames.filter((f) => f.op).map((f) => f.op));
    expect(commands).toEqual([]);
    expect(logs.filter((l) => l.includes('REFUSED'))).toHaveLength(bad);
    for (const l of logs) expect(l.includes('\n')).toBe(false);
    // the same connection still answers
    c.sock.write(`${line('after', 'ping', {})}\n`);
    await until(() => c.answers.length === frames.length + 1, 'the ping after the fuzz');
    expect(c.answers.at(-1)).toMatchObject({ id: 'after', ok: true, result: { version: 2 } });
    c.sock.destroy();
  });

  it('refuses a complete line over the limit (in characters or in UTF-8 bytes) once, closes, and runs what came with it never', async () => {
    opCalls.length = 0;
    const tooLong = [`${line(1, 'tap.list', { pad: 'p'.repeat(MAX_LINE_BYTES) })}`, `${line(2, 'tap.list', { pad: '€'.repeat(MAX_LINE_BYTES / 2) })}`];
    for (const long of tooLong) {
      const c = await rawClient();
      // the long line, then a request that must not run
      c.sock.write(`${long}\n${line(3, 'tap.list', {})}\n`);
      await c.closed;
      expect(c.answers).toEqual([{ id: null, ok: false, error: { kind: 'invalid_request', message: `refused request: line longer than ${MAX_LINE_BYTES} bytes` } }]);
    }
    expect(opCalls).toEqual([]);
    // half a frame, then close: nothing answered, nothing run
    const half = await rawClient();
    half.sock.end(line(4, 'tap.list', {}));
    await half.closed;
    expect(half.answers).toEqual([]);
    expect(opCalls).toEqual([]);
    // and the helper still serves
    const client = await RootHelperClient.connect(socketPath);
    expect(await client.request('tap.list', {})).toEqual({ taps: [] });
    client.close();
    expect(opCalls).toEqual(['listTaps']);
  });
});
