import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RpcClient } from '../../src/rpc/client.js';
import { RpcServer } from '../../src/rpc/server.js';
import { fakeStatus, stubHandlers } from '../support/rpc-stubs.js';

/**
 * One 64 MiB answer through the real server and client. Reading it used to cost time quadratic in its size
 * (`buf += chunk; buf.slice()`: 32 MB took 56 s). No duration is asserted here (timing goals belong to the
 * benchmark); the test's timeout is what fails quadratic reading.
 */

const SIZE = 64 * 1024 * 1024;

/** 64 MiB of text with multibyte characters all through it, so chunk boundaries fall inside them too. */
function bigText(): string {
  const unit = 'logs line é 🚀 ✓ 0123456789 abcdefghijklmnopqrstuvwxyz\n';
  const whole = unit.repeat(Math.ceil(SIZE / unit.length));
  return whole.slice(0, SIZE - 1) + '$';
}

let dir: string;
let server: RpcServer;
let socket: string;
let text: string;

beforeAll(async () => {
  text = bigText();
  dir = await mkdtemp(join(tmpdir(), 'blarge-'));
  socket = join(dir, 'daemon.sock');
  server = new RpcServer(stubHandlers({ 'vm.logs': async () => ({ serial: text }), 'daemon.status': async () => fakeStatus() }));
  await server.listen(socket);
});

afterAll(async () => {
  await server?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('a large answer', () => {
  it('reaches the RpcClient whole, in time linear in its size', { timeout: 20_000 }, async () => {
    const client = await RpcClient.connect(socket);
    try {
      const started = performance.now();
      const r = await client.call('vm.logs', { vm: 'big', serial: true });
      const ms = performance.now() - started;
      console.log(`large-response: read a ${SIZE / 1024 / 1024} MiB answer (${Buffer.byteLength(JSON.stringify(r))} bytes of JSON) in ${ms.toFixed(0)} ms`);
      const serial = 'serial' in r ? r.serial : '';
      expect(serial.length).toBe(text.length);
      expect(serial === text).toBe(true);
      // the connection carries on afterwards
      expect(await client.call('daemon.status', {})).toEqual(fakeStatus());
    } finally {
      client.close();
    }
  });
});
