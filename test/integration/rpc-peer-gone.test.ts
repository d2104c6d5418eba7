import { mkdtemp, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { methods, type MethodName } from '../../src/rpc/protocol.js';
import { RpcServer, type Handlers } from '../../src/rpc/server.js';
import { waitUntil } from '../support/wait.js';

/**
 * A long call (a follow, an attach, an exec) whose client went away must be aborted even when it streams nothing:
 * the server learns it by writing to the half-closed peer. A peer that half-closes but still reads keeps its answer.
 */
let dir: string;
let server: RpcServer;
let aborted: number;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bg-rpc-gone-'));
  aborted = 0;
  // vm.logs here waits, silently, until its client is gone or afterSeq ms have passed, then answers.
  const handlers = Object.fromEntries(
    (Object.keys(methods) as MethodName[]).map((m) => [
      m,
      async (p: { afterSeq?: number }, ctx: { signal: AbortSignal }) => {
        if (m !== 'vm.logs') return { m };
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, p.afterSeq);
          ctx.signal.addEventListener('abort', () => (aborted++, clearTimeout(t), resolve()), { once: true });
        });
        return { waited: true };
      },
    ]),
  ) as unknown as Handlers;
  server = new RpcServer(handlers);
  await server.listen(join(dir, 's.sock'));
});
afterEach(async () => {
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

const request = (waitMs: number) => `${JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'vm.logs', params: { vm: 'x', follow: true, afterSeq: waitMs } })}\n`;

it('a client that disconnects during a silent call aborts it', async () => {
  const sock = connect(join(dir, 's.sock'));
  await new Promise((r) => sock.once('connect', r));
  sock.write(request(60_000));
  await new Promise((r) => setTimeout(r, 100));
  sock.destroy();
  await waitUntil('the handler saw its client go', () => aborted === 1, 5000, 50);
});

it('a client that only half-closes still gets its answer (blank probe lines are all it sees besides)', async () => {
  const sock = connect(join(dir, 's.sock'), () => sock.end(request(2500)));
  let got = '';
  sock.on('data', (c) => (got += c.toString()));
  await new Promise((r) => sock.once('close', r));
  expect(aborted).toBe(0);
  const lines = got.split('\n').filter((l) => l.trim());
  expect(lines.map((l) => JSON.parse(l))).toEqual([{ jsonrpc: '2.0', id: 1, result: { waited: true } }]);
});
