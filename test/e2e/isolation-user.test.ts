/**
 * A user-net guest's sandbox, with ONE guest booted in a network namespace this test makes (so nothing leaves the
 * machine): the namespace's uplink is a veth pair whose far end, in a second namespace, plays "the outside" (the
 * gateway 10.77.0.1 and an outside address 198.51.100.7). Checked against that guest (config userNet "isolated":
 * QEMU's slirp in a namespace of its own, egress through slirp4netns):
 * - a TCP service on the host's loopback (through 10.0.2.2 and directly) and one on another host address
 *   (10.77.0.2) are unreachable, while a service at the outside address is reached (so the refusals mean something);
 * - a published port (`--publish 127.0.0.1:PORT:8080`) reaches a service the guest starts, still does after the
 *   daemon is killed and comes back (adoption), and is gone after stop, with no slirp4netns left;
 * - `vm ssh` hands the guest no SSH agent even with `ForwardAgent yes` in the user's ssh config and an agent running.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { waitUntil } from '../support/wait.js';
import { Banger, BIN, describeE2E, pidAlive } from './harness.js';

const NS = `bgu${randomBytes(3).toString('hex')}`;
const OUTSIDE_NS = `${NS}o`;
const PUBLISHED = 18080;

/** A TCP server that prints its port, then CONN for each connection it accepts. */
const server = (host: string) =>
  `const s=require('net').createServer(c=>{console.log('CONN');c.end()});s.listen(0,'${host}',()=>console.log('PORT '+s.address().port))`;

/** Connects to 127.0.0.1:PORT inside the namespace and prints what it reads, or ERR <code>. */
const CLIENT = `const c=require('net').connect(+process.argv[1],'127.0.0.1');let d='';c.on('data',x=>d+=x);c.on('end',()=>console.log(d));c.on('error',e=>console.log('ERR '+e.code));setTimeout(()=>{console.log('TIMEOUT '+d);process.exit()},15000)`;

/** A one-line HTTP-ish server in the guest (its image has perl-base, not python or nc). */
const GUEST_SERVER =
  "perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8080,Listen=>5,ReuseAddr=>1) or die; while($c=$s->accept){print $c \"HTTP/1.0 200 OK\\r\\n\\r\\nhello-from-guest\\n\"; close $c}'";

/** In the guest (perl-base only): for each HOST:PORT argument, `HOST:PORT OPEN` or `HOST:PORT CLOSED`. */
const GUEST_PROBE = 'for (@ARGV) { my ($h, $p) = split /:/; my $s = IO::Socket::INET->new(PeerAddr => $h, PeerPort => $p, Timeout => 10); print "$_ ", ($s ? "OPEN" : "CLOSED"), "\\n" }';

/** The same probe on the host side (node). */
const PROBE = `const [h,p]=process.argv[1].split(':');const c=require('net').connect(+p,h,()=>{console.log(process.argv[1]+' OPEN');c.destroy()});c.on('error',()=>console.log(process.argv[1]+' CLOSED'));setTimeout(()=>process.exit(),10000).unref()`;

const count = (out: string) => out.split('\n').filter((l) => l === 'CONN').length;

function listener(ns: string, host: string) {
  const p = execa('ip', ['netns', 'exec', ns, process.execPath, '-e', server(host)], { reject: false });
  const state = { out: '', p };
  p.stdout!.on('data', (d: Buffer) => (state.out += d.toString()));
  return state;
}

const portOf = (out: string) => Number(/PORT (\d+)/.exec(out)![1]);

/** What a client in the namespace reads from 127.0.0.1:port there. */
async function fetchInNs(port: number): Promise<string> {
  const r = await execa('ip', ['netns', 'exec', NS, process.execPath, '-e', CLIENT, String(port)], { reject: false, timeout: 30_000 });
  return String(r.stdout);
}

/** passt or slirp4netns processes still serving this home's sockets. */
function userNetHelpersOf(runDir: string): number[] {
  return readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        const argv = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
        return argv.some((a) => a.startsWith(`${runDir}/`) && (a.endsWith('.passt') || a.endsWith('.s4n'))) && pidAlive(Number(p));
      } catch {
        return false;
      }
    })
    .map(Number);
}

describeE2E('isolation: a user-net guest', () => {
  let b: Banger;
  let tmp: string;
  let loop: ReturnType<typeof listener>;
  let hostAddr: ReturnType<typeof listener>;
  let outside: ReturnType<typeof listener>;
  const servers: ResultPromise[] = [];

  beforeAll(async () => {
    if (process.getuid?.() !== 0) throw new Error('this e2e test needs root (ip netns, a mount namespace)');
    tmp = mkdtempSync('/tmp/bgiso-');
    await execa('ip', ['netns', 'add', NS]);
    await execa('ip', ['netns', 'add', OUTSIDE_NS]);
    await execa('ip', ['link', 'add', 'up0', 'netns', NS, 'type', 'veth', 'peer', 'name', 'up1', 'netns', OUTSIDE_NS]);
    for (const [ns, args] of [
      [NS, ['link', 'set', 'lo', 'up']],
      [NS, ['addr', 'add', '10.77.0.2/24', 'dev', 'up0']],
      [NS, ['link', 'set', 'up0', 'up']],
      [NS, ['route', 'add', 'default', 'via', '10.77.0.1']],
      [OUTSIDE_NS, ['link', 'set', 'lo', 'up']],
      [OUTSIDE_NS, ['addr', 'add', '10.77.0.1/24', 'dev', 'up1']],
      [OUTSIDE_NS, ['addr', 'add', '198.51.100.7/32', 'dev', 'lo']],
      [OUTSIDE_NS, ['link', 'set', 'up1', 'up']],
    ] as const) await execa('ip', ['-n', ns, ...args]);
    loop = listener(NS, '127.0.0.1');
    hostAddr = listener(NS, '10.77.0.2');
    outside = listener(OUTSIDE_NS, '0.0.0.0');
    servers.push(loop.p, hostAddr.p, outside.p);
    // a loaded 2-core CI machine can take minutes to boot under TCG: the boot wait is bounded, but generously
    b = await Banger.create({ BANGER_BOOT_TIMEOUT_MS: '1100000' });
    b.wrap = ['ip', 'netns', 'exec', NS];
    // stated, not inherited from the default: the guest's user net is the isolated one
    writeFileSync(join(b.home, 'config.json'), JSON.stringify({ userNet: 'isolated' }));
    await waitUntil('the listeners print their ports', () => [loop, hostAddr, outside].every((l) => /PORT \d+/.test(l.out)), 15_000);
    await b.ok(['vm', 'create', '--name', 'iso', '--net', 'user', '--publish', `127.0.0.1:${PUBLISHED}:8080`], { timeoutMs: 1_150_000 });
  }, 1_200_000);

  afterAll(async () => {
    await b?.cleanup();
    for (const s of servers) s.kill('SIGKILL');
    await execa('ip', ['netns', 'del', NS], { reject: false });
    await execa('ip', ['netns', 'del', OUTSIDE_NS], { reject: false });
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it("reaches neither the host's loopback nor another host address, and does reach the outside", async () => {
    const targets = {
      gatewayToLoopback: `10.0.2.2:${portOf(loop.out)}`,
      loopback: `127.0.0.1:${portOf(loop.out)}`,
      hostAddress: `10.77.0.2:${portOf(hostAddr.out)}`,
      outside: `198.51.100.7:${portOf(outside.out)}`,
    };
    // control: both host services answer a client in the test's namespace (the "host")
    for (const t of [targets.loopback, targets.hostAddress]) {
      const r = await execa('ip', ['netns', 'exec', NS, process.execPath, '-e', PROBE, t], { reject: false, timeout: 30_000 });
      expect(String(r.stdout), t).toContain(`${t} OPEN`);
    }
    const before = { loop: count(loop.out), hostAddr: count(hostAddr.out), outside: count(outside.out) };
    const r = await b.run(['vm', 'ssh', 'iso', '--', 'perl', '-MIO::Socket::INET', '-e', GUEST_PROBE, ...Object.values(targets)], { timeoutMs: 180_000 });
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout).toContain(`${targets.outside} OPEN`);
    for (const t of [targets.gatewayToLoopback, targets.loopback, targets.hostAddress]) expect(r.stdout).toContain(`${t} CLOSED`);
    await waitUntil('the outside saw the guest', () => count(outside.out) > before.outside, 15_000);
    expect(count(loop.out)).toBe(before.loop);
    expect(count(hostAddr.out)).toBe(before.hostAddr);
    const doctor = await b.run(['doctor'], { timeoutMs: 120_000 });
    expect(doctor.stdout).toMatch(/user\.net.*isolated/);
  }, 300_000);

  it('vm ssh forwards no agent even with ForwardAgent yes in the ssh config and an agent running', async () => {
    // ssh reads its config from the passwd home, not $HOME: give it a private one in a mount namespace.
    const home = join(tmp, 'home');
    mkdirSync(join(home, '.ssh'), { recursive: true, mode: 0o700 });
    writeFileSync(join(home, '.ssh', 'config'), 'Host *\n  ForwardAgent yes\n  ForwardX11 yes\n', { mode: 0o600 });
    const agentSock = join(tmp, 'agent.sock');
    const agent = await execa('ssh-agent', ['-a', agentSock]);
    const agentPid = Number(/SSH_AGENT_PID=(\d+)/.exec(agent.stdout)?.[1]);
    try {
      const pwHome = (await execa('getent', ['passwd', String(process.getuid!())])).stdout.split(':')[5];
      const viaConfig = (extra: string[]) =>
        execa('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', 'mount --bind "$1" "$2" && shift 2 && exec "$@"', 'sh', home, pwHome, ...b.wrap, ...extra], {
          env: { ...b.env, SSH_AUTH_SOCK: agentSock },
          reject: false,
          timeout: 120_000,
        });
      // control: plain ssh under the same config forwards the agent, so the config is read and the guest allows it
      const keyFile = join(b.home, 'keys', 'id_ed25519');
      const sshPort = String((await b.json<{ sshPort: number }>(['vm', 'show', 'iso'])).sshPort);
      const control = await viaConfig([
        'ssh', '-i', keyFile, '-p', sshPort, '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
        'root@127.0.0.1', 'echo "AGENT=${SSH_AUTH_SOCK:-none}"',
      ]);
      expect(control.exitCode, String(control.stderr)).toBe(0);
      expect(String(control.stdout)).toMatch(/AGENT=\/tmp\/ssh-/);
      const r = await viaConfig([process.execPath, BIN, 'vm', 'ssh', 'iso', '--', 'sh', '-c', 'echo "AGENT=${SSH_AUTH_SOCK:-none} DISPLAY=${DISPLAY:-none}"']);
      expect(r.exitCode, String(r.stderr)).toBe(0);
      expect(String(r.stdout)).toContain('AGENT=none DISPLAY=none');
    } finally {
      if (agentPid) process.kill(agentPid, 'SIGTERM');
    }
  }, 300_000);

  it('a published port reaches the guest, survives a daemon kill, and is gone after stop', async () => {
    const shown = await b.json<{ publish: string[] }>(['vm', 'show', 'iso']);
    expect(shown.publish).toEqual([`127.0.0.1:${PUBLISHED}:8080`]);
    // nothing listens in the guest yet: the published port answers nothing useful
    expect(await fetchInNs(PUBLISHED)).not.toContain('hello-from-guest');
    const start = await b.run(['vm', 'ssh', 'iso', '--', 'sh', '-c', `setsid ${GUEST_SERVER} </dev/null >/dev/null 2>&1 &`], { timeoutMs: 120_000 });
    expect(start.exitCode, start.stderr).toBe(0);
    let got = '';
    await waitUntil('the guest service answers on the published port', async () => (got = await fetchInNs(PUBLISHED)).includes('hello-from-guest'), 120_000, 1000).catch((e) => {
      throw new Error(`${(e as Error).message}; last read: ${got}`);
    });

    // the daemon dies: the VM and its published port stay, and a new daemon adopts the VM
    const daemon = b.daemonPid();
    expect(daemon).toBeGreaterThan(0);
    process.kill(daemon!, 'SIGKILL');
    await waitUntil('the daemon is gone', () => !pidAlive(daemon!), 15_000);
    expect(await fetchInNs(PUBLISHED)).toContain('hello-from-guest');
    expect((await b.json<{ state: string; publish: string[] }>(['vm', 'show', 'iso'], { timeoutMs: 120_000 })).state).toBe('running');

    await b.ok(['vm', 'stop', 'iso'], { timeoutMs: 300_000 });
    expect(await fetchInNs(PUBLISHED)).toMatch(/ERR ECONNREFUSED/);
    await waitUntil('no passt or slirp4netns is left', () => userNetHelpersOf(b.runDir).length === 0, 15_000);
  }, 600_000);
});
