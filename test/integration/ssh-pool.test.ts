/**
 * The pooled SSH connections against a real SSH server (ssh2's, on loopback) that refuses channels past 10 per
 * connection as sshd's default MaxSessions does: 20 commands at once all run, on ceil(20 / 8) connections; stdin, exit statuses and a death by signal come through.
 * The boot's SSH wait hands its connection to the pool, so the first command after a boot opens none.
 */
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import ssh2 from 'ssh2';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { CHANNELS_PER_CONNECTION, SshPool } from '../../src/host/guest/pool.js';
import { newEd25519KeyPair } from '../../src/host/guest/keys.js';
import { waitForSsh, type SshTarget } from '../../src/host/guest/ssh.js';

const { Server } = ssh2;
const MAX_SESSIONS = 10;
const hostKey = newEd25519KeyPair('host');
const clientKey = newEd25519KeyPair('client');
let server: InstanceType<typeof Server>;
let port = 0;
let connections = 0;

beforeAll(async () => {
  server = new Server({ hostKeys: [hostKey.privateKey] }, (conn) => {
    connections++;
    let open = 0;
    conn.on('authentication', (ctx) => (ctx.method === 'publickey' ? ctx.accept() : ctx.reject(['publickey'])));
    conn.on('session', (accept, reject) => {
      if (open >= MAX_SESSIONS) return reject();
      open++;
      const session = accept();
      session.once('close', () => open--);
      session.on('exec', (acceptExec, _reject, info) => {
        const channel = acceptExec();
        const child = spawn('sh', ['-c', info.command], { stdio: ['pipe', 'pipe', 'pipe'] });
        channel.pipe(child.stdin);
        child.stdout.pipe(channel, { end: false });
        child.on('close', (code, signal) => {
          if (signal) channel.exit(signal.replace(/^SIG/, ''), false, '');
          else channel.exit(code ?? 1);
          channel.end();
        });
      });
    });
    conn.on('error', () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as ReturnType<ReturnType<typeof createServer>['address']> & { port: number }).port;
});

afterAll(() => server.close());

it(`20 commands at once all run, ${CHANNELS_PER_CONNECTION} channels per connection at most`, async () => {
  const pool = new SshPool();
  const target: SshTarget = { host: '127.0.0.1', port, privateKey: Buffer.from(clientKey.privateKey), hostPublicKey: hostKey.publicKey, label: 'pool-test' };
  try {
    const runs = Array.from({ length: 20 }, (_, i) => pool.exec('vm1#1', target, `sleep 0.5; echo ${i}`, { timeoutMs: 20_000 }));
    const results = await Promise.all(runs);
    expect(results.map((r) => r.stdout.toString().trim())).toEqual(Array.from({ length: 20 }, (_, i) => String(i)));
    expect(connections).toBe(Math.ceil(20 / CHANNELS_PER_CONNECTION));
    const again = await pool.exec('vm1#1', target, 'echo warm');
    expect(again.stdout.toString()).toBe('warm\n');
    expect(connections).toBe(Math.ceil(20 / CHANNELS_PER_CONNECTION));
    expect((await pool.exec('vm1#1', target, 'cat', { stdin: 'fed\n' })).stdout.toString()).toBe('fed\n');
    expect((await pool.exec('vm1#1', target, 'exit 7')).exitCode).toBe(7);
    const killed = await pool.exec('vm1#1', target, 'kill -TERM $$');
    expect([killed.exitCode, killed.signal]).toEqual([143, 'SIGTERM']);
  } finally {
    pool.closeAll();
  }
});

it('the connection that proved SSH up is adopted: the next command on that VM opens none; a new VMM pid dials again', async () => {
  const pool = new SshPool();
  const target: SshTarget = { host: '127.0.0.1', port, privateKey: Buffer.from(clientKey.privateKey), hostPublicKey: hostKey.publicKey, label: 'adopt-test' };
  try {
    const before = connections;
    await waitForSsh(target, { timeoutMs: 10_000, keep: (c) => pool.adopt('vm2#1', target, c) });
    expect(connections).toBe(before + 1);
    expect((await pool.exec('vm2#1', target, 'echo reused')).stdout.toString()).toBe('reused\n');
    expect(connections).toBe(before + 1);
    await waitForSsh(target, { timeoutMs: 10_000 }); // without keep: closed, not pooled
    expect(connections).toBe(before + 2);
    expect((await pool.exec('vm2#2', target, 'echo fresh')).stdout.toString()).toBe('fresh\n'); // the VM restarted
    expect(connections).toBe(before + 3);
  } finally {
    pool.closeAll();
  }
});
