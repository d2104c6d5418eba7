/**
 * The guest agent's protocol, both ends: the host's answer parser and client against hostile guests (oversize,
 * garbage, slow, endless, stale answers), the Firecracker CONNECT handshake's failures, and the real agent script
 * (bash, as the image installs it) against hostile requests.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { AGENT_LIMITS, agentHealth, agentRefreshIdentity, agentRequest, AnswerParser, firecrackerVsockChannel, parseHealthz, unixChannel } from '../../src/host/guest/agent.js';
import { AGENT_SCRIPT } from '../../src/host/image/agent.js';

const HEALTH = { ok: true, uptimeSeconds: 12.5, load: [0.1, 0, 0], memory: { totalKiB: 1000, availableKiB: 600 }, disk: { '/': { freeBytes: 5, totalBytes: 9 }, '/root': { freeBytes: 7, totalBytes: 10 } }, sessionsRunning: 1 };

const answer = (body: string, id: string, status = '200 OK') =>
  Buffer.from(`HTTP/1.1 ${status}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nX-Banger-Request: ${id}\r\n\r\n${body}`);

let dir: string;
let servers: Server[] = [];
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'bga-'));
});
afterEach(async () => {
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
/** A fake guest end on a Unix socket: `onRequest` gets each connection and the request's tag once its head is in. */
async function guest(onRequest: (sock: Socket, id: string) => void): Promise<string> {
  const path = join(dir, `g${++n}.sock`);
  const server = createServer((sock) => {
    let got = '';
    sock.on('error', () => {});
    sock.on('data', (c) => {
      got += c.toString('latin1');
      if (got.includes('\r\n\r\n')) {
        const id = /X-Banger-Request: (\S+)\r\n/.exec(got)?.[1] ?? '';
        got = '';
        onRequest(sock, id);
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  servers.push(server);
  return path;
}

async function failure(p: Promise<unknown>): Promise<BangerError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(BangerError);
    return e as BangerError;
  }
  throw new Error('expected a failure');
}

describe('AnswerParser', () => {
  it('reads answers byte by byte, and two in one chunk', () => {
    const p = new AnswerParser();
    const bytes = answer('{"a":1}', 'x1');
    const seen = [];
    for (const b of bytes) seen.push(...p.push(Buffer.from([b])));
    expect(seen).toHaveLength(1);
    expect(seen[0]).toMatchObject({ status: 200, headers: { 'x-banger-request': 'x1', 'content-length': '7' } });
    expect(seen[0].body.toString()).toBe('{"a":1}');
    // The empty line that greets a virtio-serial connection, and any between answers, are skipped.
    const two = new AnswerParser().push(Buffer.concat([Buffer.from('\n'), answer('a', 'p'), Buffer.from('\r\n\n'), answer('bc', 'q', '404 Not Found')]));
    expect(two.map((a) => [a.status, a.body.toString()])).toEqual([[200, 'a'], [404, 'bc']]);
  });

  it('refuses garbage, a head without end, a huge body, a missing length, and a flood', () => {
    const push = (text: string | Buffer) => () => new AnswerParser().push(Buffer.isBuffer(text) ? text : Buffer.from(text));
    expect(push('garbage\r\n\r\n')).toThrow(/bad status line/);
    expect(push('HTTP/1.1 200 OK\r\nno colon here\r\n\r\n')).toThrow(/bad header line/);
    expect(push('HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx')).toThrow(/given twice/);
    expect(push('HTTP/1.1 200 OK\r\nX: y\r\n\r\n')).toThrow(/no Content-Length/);
    expect(push('HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n')).toThrow(/bad Content-Length/);
    expect(push(`HTTP/1.1 200 OK\r\nContent-Length: ${AGENT_LIMITS.bodyBytes + 1}\r\n\r\n`)).toThrow(/over the limit of 65536/);
    expect(push(`HTTP/1.1 200 OK\r\nX: ${'a'.repeat(AGENT_LIMITS.headBytes)}`)).toThrow(/head is over 8192 bytes/);
    expect(push(`HTTP/1.1 200 OK\r\n${'X-A: b\r\n'.repeat(AGENT_LIMITS.headers + 1)}\r\n`)).toThrow(/more than 32 header lines/);
    const flood = new AnswerParser();
    expect(() => {
      for (let i = 0; i < 100; i++) flood.push(answer('x'.repeat(60_000), 'other'));
    }).toThrow(/more than 262144 bytes in one call/);
  });
});

describe('agentRequest against hostile guests', () => {
  it('returns the answer with its own tag, skipping a stale one', async () => {
    const path = await guest((sock, id) => sock.write(Buffer.concat([answer('{"stale":true}', 'someone-else'), answer(JSON.stringify(HEALTH), id)])));
    expect(await agentHealth(unixChannel(path), 5000)).toEqual(HEALTH);
  });

  it('stops waiting on a silent guest when the signal aborts, long before the deadline', async () => {
    const silent = await guest(() => {});
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 50);
    const t0 = Date.now();
    const e = await failure(agentRequest(unixChannel(silent), 'POST', '/identity', 30_000, ac.signal));
    expect(e.kind).toBe('aborted');
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('gives up on a silent guest and on one that drips bytes, at the deadline', async () => {
    const silent = await guest(() => {});
    expect((await failure(agentRequest(unixChannel(silent), 'GET', '/healthz', 300))).kind).toBe('timeout');
    const drip = await guest((sock) => {
      const t = setInterval(() => (sock.destroyed ? clearInterval(t) : sock.write('H')), 20);
    });
    const e = await failure(agentRequest(unixChannel(drip), 'GET', '/healthz', 300));
    expect(e.kind).toBe('timeout');
    expect(e.message).toContain('did not answer GET /healthz within 300 ms');
  });

  it('stops reading an endless stream at the cap, and reports garbage and early closes', async () => {
    const endless = await guest((sock) => {
      const chunk = Buffer.alloc(16 * 1024, 'A');
      const more = () => {
        while (!sock.destroyed && sock.write(chunk));
        if (!sock.destroyed) sock.once('drain', more);
      };
      more();
    });
    expect((await failure(agentRequest(unixChannel(endless), 'GET', '/healthz', 5000))).message).toMatch(/head is over 8192 bytes/);
    const garbage = await guest((sock) => sock.write('SSH-2.0-OpenSSH\r\n\r\n'));
    expect((await failure(agentRequest(unixChannel(garbage), 'GET', '/healthz', 5000))).message).toMatch(/bad status line "SSH-2.0-OpenSSH"/);
    const closes = await guest((sock) => sock.end());
    expect((await failure(agentRequest(unixChannel(closes), 'GET', '/healthz', 5000))).message).toContain('closed before it answered');
    expect((await failure(agentRequest(unixChannel(join(dir, 'none.sock')), 'GET', '/healthz', 5000))).message).toContain('ENOENT');
  });

  it('parseHealthz refuses an error status, non-JSON, and a body that does not fit', () => {
    const a = (body: string, status = 200) => ({ status, headers: {}, body: Buffer.from(body) });
    expect(() => parseHealthz(a('{"ok":false}', 500))).toThrow(/HTTP 500/);
    expect(() => parseHealthz(a('{nope'))).toThrow(/not JSON/);
    expect(() => parseHealthz(a(JSON.stringify({ ...HEALTH, extra: 1 })))).toThrow(/does not fit/);
    expect(() => parseHealthz(a(JSON.stringify({ ...HEALTH, load: [1, 2] })))).toThrow(/load/);
    expect(() => parseHealthz(a(JSON.stringify({ ...HEALTH, memory: { totalKiB: -1, availableKiB: 0 } })))).toThrow(/memory.totalKiB/);
  });
});

describe("Firecracker's CONNECT handshake, when it goes wrong", () => {
  const vsock = async (reply: (sock: Socket) => void) => {
    const path = join(dir, `v${++n}.sock`);
    const server = createServer((sock) => {
      sock.on('error', () => {});
      sock.once('data', () => reply(sock));
    });
    await new Promise<void>((r) => server.listen(path, r));
    servers.push(server);
    return path;
  };

  it('refuses an answer that is not OK <port>, one without a line end, and silence', async () => {
    const nope = await vsock((s) => s.write('NOPE\n'));
    expect((await failure(firecrackerVsockChannel(nope, 52)(2000))).message).toContain('was answered "NOPE", not OK <port>');
    const long = await vsock((s) => s.write('O'.repeat(200)));
    expect((await failure(firecrackerVsockChannel(long, 52)(2000))).message).toContain('and no line end');
    const silent = await vsock(() => {});
    expect((await failure(firecrackerVsockChannel(silent, 52)(300))).message).toContain('no answer to CONNECT 52 within 300 ms');
  });

  it('keeps the bytes that follow OK for the request', async () => {
    const path = await vsock((s) => {
      s.once('data', (req) => {
        const id = /X-Banger-Request: (\S+)/.exec(req.toString())![1];
        s.write(answer(JSON.stringify(HEALTH), id));
      });
      s.write('OK 1073741824\n');
    });
    expect(await agentHealth(firecrackerVsockChannel(path, 52), 5000)).toEqual(HEALTH);
  });
});

describe('the agent script (bash, as in the image)', () => {
  /** The agent serving one connection on its stdin/stdout, as banger-agent@.service runs it. */
  async function agentSocket(identityScript?: string): Promise<string> {
    const script = join(dir, 'banger-agent');
    writeFileSync(script, AGENT_SCRIPT, { mode: 0o755 });
    const path = join(dir, `a${++n}.sock`);
    const env = { ...process.env, BANGER_IDENTITY_SCRIPT: identityScript ?? join(dir, 'no-such-identity-script') };
    const server = createServer((sock) => {
      const child = spawn('bash', [script], { stdio: ['pipe', 'pipe', 'inherit'], env });
      child.stdin.on('error', () => {});
      sock.on('error', () => {});
      sock.pipe(child.stdin);
      child.stdout.pipe(sock);
      sock.on('close', () => child.kill());
    });
    await new Promise<void>((r) => server.listen(path, r));
    servers.push(server);
    return path;
  }

  /** Raw bytes to the agent; its answers, parsed, once `count` are in. */
  async function exchange(path: string, bytes: string, count: number): Promise<Array<{ status: number; id?: string; body: string }>> {
    const sock = await unixChannel(path)(5000);
    const parser = new AnswerParser();
    const got: Array<{ status: number; id?: string; body: string }> = [];
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`only ${got.length} answers`)), 20_000);
      sock.on('data', (c: Buffer) => {
        for (const a of parser.push(c)) got.push({ status: a.status, id: a.headers['x-banger-request'], body: a.body.toString() });
        if (got.length >= count) {
          clearTimeout(t);
          sock.destroy();
          resolve(got);
        }
      });
      sock.write(bytes);
    });
  }

  it('answers /healthz with a body the host accepts, tagged with the request', async () => {
    const h = await agentHealth(unixChannel(await agentSocket()), 20_000);
    expect(h.ok).toBe(true);
    expect(h.memory.totalKiB).toBeGreaterThan(0);
    expect(h.disk['/'].totalBytes).toBeGreaterThan(0);
  }, 30_000);

  it('answers hostile requests with an error, one after another on one connection', async () => {
    const path = await agentSocket();
    const got = await exchange(
      path,
      [
        `GET /${'a'.repeat(3000)} HTTP/1.1\r\n`,
        'POST /healthz HTTP/1.1\r\nX-Banger-Request: p1\r\n\r\n',
        `GET /healthz HTTP/1.1\r\n${'X-A: b\r\n'.repeat(40)}\r\n`,
        'GET /etc/passwd HTTP/1.1\r\nx-banger-request: q2\r\n\r\n',
        'GET /healthz SMTP\r\nX-Banger-Request: r3;rm -rf /\r\n\r\n',
        'GET /healthz HTTP/1.1\r\nX-Banger-Request: ok4\r\n\r\n',
      ].join(''),
      6,
    );
    expect(got.map((a) => [a.status, a.id])).toEqual([
      [400, '-'],
      [405, 'p1'],
      [431, '-'],
      [404, 'q2'],
      [400, '-'],
      [200, 'ok4'],
    ]);
    expect(got[0].body).toContain('request line too long');
    expect(JSON.parse(got[5].body).ok).toBe(true);
  }, 30_000);

  it('POST /identity runs the identity script with --refresh and says whether it worked', async () => {
    const marker = join(dir, 'refreshed');
    const ok = join(dir, 'identity-ok');
    writeFileSync(ok, `#!/bin/sh\necho "$@" > ${marker}\n`, { mode: 0o755 });
    await agentRefreshIdentity(unixChannel(await agentSocket(ok)), 20_000);
    expect(readFileSync(marker, 'utf8')).toBe('--refresh\n');
    const failing = join(dir, 'identity-fails');
    writeFileSync(failing, '#!/bin/sh\nexit 3\n', { mode: 0o755 });
    const e = await failure(agentRefreshIdentity(unixChannel(await agentSocket(failing)), 20_000));
    expect(e.message).toMatch(/POST \/identity with HTTP 500: .*--refresh failed/);
    const got = await exchange(await agentSocket(ok), 'GET /identity HTTP/1.1\r\nX-Banger-Request: g1\r\n\r\n', 1);
    expect(got.map((a) => [a.status, a.id])).toEqual([[405, 'g1']]);
  }, 30_000);
});
