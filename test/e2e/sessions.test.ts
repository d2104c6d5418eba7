/**
 * Sessions, exec and health against one real guest (issue 11): exec with stdin an open pipe that carries nothing
 * (as under CI) or data, concurrent send lands exactly 1,000 whole lines, attach is exclusive and detaching leaves
 * the session running, a SIGKILLed daemon finds its sessions still running, a stopped VM reports them ended with
 * the reason. One boot for all of it.
 */
import { execa } from 'execa';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { waitUntil } from '../support/wait.js';
import { connect } from '../../src/index.js';
import { Banger, BIN, describeE2E } from './harness.js';

/** Deterministic line lengths in [200, 4000]. */
function lineOf(sender: number, i: number): string {
  const len = 200 + ((sender * 7919 + i * 104729) % 3801);
  const head = JSON.stringify({ s: sender, i, pad: '' });
  return head.slice(0, -2) + 'x'.repeat(len - head.length) + '"}';
}

describeE2E('guest sessions, exec and health', () => {
  let b: Banger;
  beforeAll(async () => {
    // A loaded 2-core host boots a TCG guest slowly: the boot wait is bounded at 10 minutes here, not 3.
    b = await Banger.create({ BANGER_BOOT_TIMEOUT_MS: '600000' });
    await b.ok(['vm', 'create', '--name', 'agents'], { timeoutMs: 900_000 });
  }, 960_000);
  afterAll(async () => {
    await b?.cleanup();
  });

  it('vm exec: separate stdout and stderr, stdin, --cwd/--env, --timeout, the exit status', async () => {
    // No input: the CLI's stdin is a pipe that stays open and carries nothing (execa's default, as under CI).
    const r = await b.run(['vm', 'exec', 'agents', '--', 'sh', '-c', 'echo out; echo err >&2; exit 5'], { timeoutMs: 120_000 });
    expect(r).toMatchObject({ exitCode: 5, stdout: 'out\n' });
    expect(r.stderr).toContain('err\n');
    const big = 'line of stdin\n'.repeat(20_000);
    expect((await b.run(['vm', 'exec', 'agents', '--', 'wc', '-c'], { input: big, timeoutMs: 120_000 })).stdout).toBe(`${big.length}\n`);
    expect((await b.run(['vm', 'exec', 'agents', '--', 'cat'], { input: 'from stdin', timeoutMs: 120_000 })).stdout).toBe('from stdin');
    const env = await b.ok(['vm', 'exec', 'agents', '--cwd', '/tmp', '--env', 'GREETING=a b;c', '--', 'sh', '-c', 'pwd; echo "$GREETING"'], { timeoutMs: 120_000 });
    expect(env.stdout).toBe('/tmp\na b;c\n');
    const late = await b.run(['vm', 'exec', 'agents', '--timeout', '1', '--', 'sleep', '600'], { timeoutMs: 120_000 });
    expect(late.exitCode).toBe(124);
    expect(late.stderr).toContain('did not finish within 1 s and was stopped');
    expect((await b.ok(['vm', 'exec', 'agents', '--', 'sh', '-c', 'pgrep -x sleep || echo none'], { timeoutMs: 120_000 })).stdout).toBe('none\n');
  }, 600_000);

  it('vm health answers from the guest agent over virtio-serial; vm.wait healthy; the typed client', async () => {
    const client = await connect({ env: b.env });
    try {
      // The agent starts when udev sees the port, which may be after sshd answers: wait for it, bounded.
      await client.call('vm.wait', { vm: 'agents', state: 'healthy', timeoutMs: 180_000 });
      const typed = await client.health('agents');
      expect(typed).toMatchObject({ ok: true, via: 'agent', transport: 'virtio-serial' });
    } finally {
      client.close();
    }
    const h = await b.json(['vm', 'health', 'agents']);
    expect(h).toMatchObject({ ok: true, via: 'agent', transport: 'virtio-serial', sessionsRunning: 0 });
    expect(h.memory.totalKiB).toBeGreaterThan(h.memory.availableKiB);
    expect(Object.keys(h.disk)).toEqual(['/', '/root']);
    expect(h.disk['/root'].totalBytes).toBeGreaterThan(0);
    expect(h.disk['/'].totalBytes).not.toBe(h.disk['/root'].totalBytes);
    expect(h.uptimeSeconds).toBeGreaterThan(0);
    const text = await b.ok(['vm', 'health', 'agents']);
    expect(text.stdout).toContain('ok: true (the guest agent, over virtio-serial)');
    // What the agent costs in the guest: its size on disk and the resident memory of its running shell.
    const cost = await b.ok(['vm', 'exec', 'agents', '--', 'sh', '-c', 'stat -c %s /usr/local/sbin/banger-agent; ps -o rss= -C banger-agent || systemctl show -p MainPID --value banger-agent-port | xargs -I{} ps -o rss= -p {}'], { timeoutMs: 120_000 });
    process.stderr.write(`guest agent: size bytes, RSS KiB:\n${cost.stdout}`);
  }, 300_000);

  it('bad input: metacharacters in a name, unknown session, plain-mode send, an existing name, the size limit', async () => {
    const meta = await b.run(['vm', 'session', 'start', 'agents', '--name', 'a;rm', '--', 'true']);
    expect(meta.exitCode).not.toBe(0);
    expect(meta.stderr).toMatch(/session name/);
    const unknown = await b.run(['vm', 'session', 'show', 'agents', 'nope']);
    expect(unknown.exitCode).not.toBe(0);
    expect(unknown.stderr).toContain('has no session named nope');
    await b.ok(['vm', 'session', 'start', 'agents', '--name', 'plain', '--', 'sleep', '1000']);
    const again = await b.run(['vm', 'session', 'start', 'agents', '--name', 'plain', '--', 'true']);
    expect(again.stderr).toContain('a session named plain already exists');
    const plain = await b.run(['vm', 'session', 'send', 'agents', 'plain', 'hi']);
    expect(plain.stderr).toContain('not in pipe mode');
    const killed = await b.json(['vm', 'session', 'kill', 'agents', 'plain', '--signal', 'KILL']);
    expect(killed).toMatchObject({ state: 'ended', endReason: 'killed by signal KILL' });
    const ended = await b.run(['vm', 'session', 'send', 'agents', 'plain', 'hi']);
    expect(ended.stderr).toContain('session plain has ended (killed by signal KILL)');
  });

  it('four concurrent senders × 250 lines of 200-4000 bytes: exactly 1,000 whole lines', async () => {
    await b.ok(['vm', 'session', 'start', 'agents', '--name', 'echo', '--pipe', '--', 'cat']);
    const over = await b.run(['vm', 'session', 'send', 'agents', 'echo'], { input: 'y'.repeat(600_000) });
    expect(over.stderr).toContain('over the send limit of 524288 bytes');
    const sender = async (s: number) => {
      for (let batch = 0; batch < 5; batch++) {
        const lines = Array.from({ length: 50 }, (_, k) => lineOf(s, batch * 50 + k));
        const r = await b.run(['vm', 'session', 'send', 'agents', 'echo'], { input: lines.join('\n') + '\n' });
        expect(r.stderr).toBe('');
        expect(r.exitCode).toBe(0);
      }
    };
    await Promise.all([0, 1, 2, 3].map(sender));
    const total = [0, 1, 2, 3].flatMap((s) => Array.from({ length: 250 }, (_, i) => lineOf(s, i).length + 1)).reduce((a, n) => a + n, 0);
    await waitUntil('the echo session wrote everything', async () => (await b.json(['vm', 'session', 'show', 'agents', 'echo'])).stdoutBytes >= total, 120_000, 500);
    const out = (await b.ok(['vm', 'session', 'logs', 'agents', 'echo'])).stdout;
    const lines = out.split('\n');
    expect(lines.pop()).toBe('');
    expect(lines).toHaveLength(1000);
    const seen = new Set(lines.map((l) => {
      const o = JSON.parse(l) as { s: number; i: number };
      expect(l).toBe(lineOf(o.s, o.i));
      return `${o.s}/${o.i}`;
    }));
    expect(seen.size).toBe(1000);
  }, 300_000);

  it('attach is exclusive, forwards input from a pipe, and detaching leaves the session running', async () => {
    // stdin is a pipe (not a terminal), as under CI, carrying the lines written below.
    const first = execa(process.execPath, [BIN, 'vm', 'session', 'attach', 'agents', 'echo'], { env: b.env, reject: false, timeout: 300_000 });
    let firstOut = '';
    first.stdout!.on('data', (c: Buffer) => (firstOut += c.toString()));
    await waitUntil('the first attach holds the session', async () => (await b.json(['vm', 'session', 'show', 'agents', 'echo'])).attachedBy !== null, 120_000, 300);
    const second = await b.run(['vm', 'session', 'attach', 'agents', 'echo'], { input: '' });
    expect(second.exitCode).not.toBe(0);
    expect(second.stderr).toContain(`already attached by`);
    expect(second.stderr).toContain(`pid ${first.pid}`);
    first.stdin!.write('through at');
    first.stdin!.write('tach\nand a second line\n');
    await waitUntil('the attached client sees its own lines echoed', () => firstOut.includes('through attach\nand a second line\n'), 120_000);
    first.stdin!.write('\x1dd');
    const r = await first;
    expect(r.exitCode).toBe(0);
    expect(r.stderr).toContain('detached');
    await waitUntil('the attach is released', async () => (await b.json(['vm', 'session', 'show', 'agents', 'echo'])).attachedBy === null, 60_000, 300);
    expect(await b.json(['vm', 'session', 'show', 'agents', 'echo'])).toMatchObject({ state: 'running', attachedBy: null });
  }, 420_000);

  it('a SIGKILLed daemon: the session still runs, is listed, and send works', async () => {
    process.kill(b.daemonPid()!, 'SIGKILL');
    const list = await b.json(['vm', 'session', 'list', 'agents'], { timeoutMs: 120_000 });
    expect(list.find((s: { name: string }) => s.name === 'echo')).toMatchObject({ state: 'running', pipe: true });
    await b.ok(['vm', 'session', 'send', 'agents', 'echo', 'after the restart']);
    await waitUntil('the line sent after the restart is echoed', async () => (await b.ok(['vm', 'session', 'logs', 'agents', 'echo'])).stdout.endsWith('after the restart\n'), 60_000, 500);
    const shown = await b.json(['vm', 'show', 'agents']);
    expect(shown.health).toMatchObject({ ok: true, sessionsRunning: 1 });
    expect(shown.sessions.map((s: { name: string; state: string }) => `${s.name}:${s.state}`)).toEqual(['plain:ended', 'echo:running']);
  }, 180_000);

  it('vm stop: sessions are reported ended, with the reason; exec and send name the state', async () => {
    await b.ok(['vm', 'stop', 'agents'], { timeoutMs: 240_000 });
    const list = await b.json(['vm', 'session', 'list', 'agents']);
    expect(list.find((s: { name: string }) => s.name === 'echo')).toMatchObject({ state: 'ended', endReason: 'the VM is stopped' });
    const exec = await b.run(['vm', 'exec', 'agents', '--', 'true'], { timeoutMs: 60_000 });
    expect(exec.exitCode).not.toBe(0);
    expect(exec.stderr).toContain('vm agents is stopped, not running');
    const send = await b.run(['vm', 'session', 'send', 'agents', 'echo', 'x']);
    expect(send.stderr).toContain('session echo has ended (the VM is stopped)');
  }, 300_000);

});
