/**
 * The sandbox toward the host, with one user-net guest in a network namespace this test makes (a veth pair
 * with a default route gives passt an uplink; nothing leaves the namespace): a TCP service on the host's
 * loopback is unreachable from the guest through its gateway (slirp's 10.0.2.2 mapped it to the host's
 * 127.0.0.1), SSH still works, and `vm ssh` hands the guest no SSH agent even when the user's ssh config says
 * `ForwardAgent yes` and an agent runs.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { waitUntil } from '../support/wait.js';
import { Banger, BIN, describeE2E } from './harness.js';

const NS = `bgs${randomBytes(3).toString('hex')}`;

/** A TCP server on the namespace's 127.0.0.1 that prints its port, then one line per connection it accepts. */
const SERVER = `const s=require('net').createServer(c=>{console.log('CONN');c.end()});s.listen(0,'127.0.0.1',()=>console.log('PORT '+s.address().port))`;

describeE2E('sandbox: user networking and ssh hygiene', () => {
  let b: Banger;
  let server: ResultPromise | undefined;
  let out = '';
  let tmp: string;
  beforeAll(async () => {
    if (process.getuid?.() !== 0) throw new Error('the sandbox e2e test needs root (ip netns, mount namespace)');
    tmp = mkdtempSync('/tmp/bgsbx-');
    await execa('ip', ['netns', 'add', NS]);
    for (const args of [
      ['link', 'set', 'lo', 'up'],
      // an uplink whose far end answers nothing: a veth pair with both ends in this namespace
      ['link', 'add', 'up0', 'type', 'veth', 'peer', 'name', 'up1'],
      ['addr', 'add', '10.77.0.2/24', 'dev', 'up0'],
      ['link', 'set', 'up0', 'up'],
      ['link', 'set', 'up1', 'up'],
      ['route', 'add', 'default', 'via', '10.77.0.1'],
    ]) await execa('ip', ['-n', NS, ...args]);
    server = execa('ip', ['netns', 'exec', NS, process.execPath, '-e', SERVER], { reject: false });
    server.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    // a loaded 2-core CI machine can take minutes to boot under TCG: the boot wait is bounded, but generously
    b = await Banger.create({ BANGER_BOOT_TIMEOUT_MS: '600000' });
    b.wrap = ['ip', 'netns', 'exec', NS];
  });
  afterAll(async () => {
    await b?.cleanup();
    server?.kill('SIGKILL');
    await execa('ip', ['netns', 'del', NS], { reject: false });
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it("a user-net guest cannot reach the host's loopback through its gateway, and SSH works", async () => {
    await waitUntil('the loopback service listens', () => /PORT \d+/.test(out), 10_000);
    const port = /PORT (\d+)/.exec(out)![1];
    await b.ok(['vm', 'create', '--name', 'sbx', '--net', 'user'], { timeoutMs: 660_000 });
    const probe = [
      'gw=$(ip -4 route show default | awk "{print \\$3; exit}")',
      'echo "GW=$gw"',
      `for a in "$gw" 10.0.2.2; do if timeout 5 bash -c "exec 3<>/dev/tcp/$a/${port}"; then echo "REACHED $a"; else echo "BLOCKED $a"; fi; done`,
    ].join('; ');
    const r = await b.run(['vm', 'ssh', 'sbx', '--', 'bash', '-c', probe], { timeoutMs: 60_000 });
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/GW=\d+\.\d+\.\d+\.\d+/);
    expect(r.stdout).toMatch(/BLOCKED \S+\nBLOCKED 10\.0\.2\.2/);
    expect(r.stdout).not.toContain('REACHED');
    expect(out).not.toContain('CONN');
  }, 900_000);

  it('vm ssh forwards no agent even with ForwardAgent yes in the ssh config and an agent running', async () => {
    // ssh reads the config from the passwd home, not $HOME: give it a private one in a mount namespace.
    const home = join(tmp, 'home');
    mkdirSync(join(home, '.ssh'), { recursive: true, mode: 0o700 });
    writeFileSync(join(home, '.ssh', 'config'), 'Host *\n  ForwardAgent yes\n  ForwardX11 yes\n', { mode: 0o600 });
    const agentSock = join(tmp, 'agent.sock');
    const agent = await execa('ssh-agent', ['-a', agentSock]);
    const agentPid = Number(/SSH_AGENT_PID=(\d+)/.exec(agent.stdout)?.[1]);
    try {
      const pwHome = (await execa('getent', ['passwd', String(process.getuid!())])).stdout.split(':')[5];
      const cmd = ['vm', 'ssh', 'sbx', '--', 'sh', '-c', 'echo "AGENT=${SSH_AUTH_SOCK:-none} DISPLAY=${DISPLAY:-none}"'];
      const viaConfig = (extra: string[]) =>
        execa(
          'unshare',
          ['--mount', '--propagation', 'private', 'sh', '-c', 'mount --bind "$1" "$2" && shift 2 && exec "$@"', 'sh', home, pwHome, ...b.wrap, ...extra],
          { env: { ...b.env, SSH_AUTH_SOCK: agentSock }, reject: false, timeout: 60_000 },
        );
      // control: plain ssh under the same config forwards the agent, so the config is read and the guest allows it
      const keyFile = join(b.home, 'keys', 'id_ed25519');
      const sshPort = String((await b.json<{ sshPort: number }>(['vm', 'show', 'sbx'])).sshPort);
      const control = await viaConfig([
        'ssh', '-i', keyFile, '-p', sshPort, '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
        'root@127.0.0.1', 'echo "AGENT=${SSH_AUTH_SOCK:-none}"',
      ]);
      expect(control.exitCode, String(control.stderr)).toBe(0);
      expect(String(control.stdout)).toMatch(/AGENT=\/tmp\/ssh-/);
      const r = await viaConfig([process.execPath, BIN, ...cmd]);
      expect(r.exitCode, String(r.stderr)).toBe(0);
      expect(String(r.stdout)).toContain('AGENT=none DISPLAY=none');
    } finally {
      if (agentPid) process.kill(agentPid, 'SIGTERM');
    }
  });
});
