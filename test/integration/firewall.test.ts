/**
 * The tap firewall's rules against a real kernel, without booting a guest: namespaces this test creates stand
 * in for the host (H: the bridge, NAT and a service on all its addresses), two guests (G1, G2: a veth whose
 * host end is named like a TAP and joins the bridge) and the outside (O: a public-looking address and a
 * private "LAN" one). The last check removes the tables and sees the host answer: the same probes can fail.
 */
import { randomBytes } from 'node:crypto';
import { execa, type ResultPromise } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBridge, ensureNat } from '../../src/host/net/net.js';
import { applyFirewall, firewallInstalled, removeFirewall } from '../../src/host/net/firewall.js';
import type { FirewallVm } from '../../src/host/net/firewall-rules.js';

const isRoot = process.getuid?.() === 0;
const inCi = process.env.CI === 'true';
const TAG = randomBytes(3).toString('hex');
const H = `bgfh${TAG}`;
const G1 = `bgf1${TAG}`;
const G2 = `bgf2${TAG}`;
const O = `bgfo${TAG}`;
const TAP1 = `bgtapf1${TAG.slice(0, 3)}`;
const TAP2 = `bgtapf2${TAG.slice(0, 3)}`;
const servers: ResultPromise[] = [];

const ip = (ns: string, ...args: string[]) => execa('ip', ['-n', ns, ...args]);

async function serve(ns: string, port: number, greeting: string): Promise<void> {
  const code = `require('node:net').createServer((s) => s.end(${JSON.stringify(`${greeting}\n`)})).listen(${port}, '0.0.0.0', () => console.log('up'))`;
  const p = execa('ip', ['netns', 'exec', ns, process.execPath, '-e', code], { reject: false });
  servers.push(p);
  await new Promise<void>((resolve, reject) => {
    p.stdout?.on('data', () => resolve());
    void p.then((r) => reject(new Error(`server in ${ns} exited: ${r.stderr}`)));
  });
}

/** What `from` reads from addr:port within 2 s, or null when it cannot connect. */
async function reads(from: string, addr: string, port: number): Promise<string | null> {
  const r = await execa('ip', ['netns', 'exec', from, 'timeout', '2', 'bash', '-c', `exec 3<>/dev/tcp/${addr}/${port} && head -c 16 <&3`], { reject: false });
  return r.exitCode === 0 ? r.stdout.trim() : null;
}

/** Drop `ns`'s neighbour (ARP) entries, failed and half-resolved ones included. */
async function forgetNeighbours(ns: string): Promise<void> {
  await ip(ns, 'neigh', 'flush', 'dev', 'eth0');
}

/** The guests' NIC MACs, as banger gives each VM its own. */
const MACS: Record<string, string> = { [TAP1]: '02:bf:00:00:00:01', [TAP2]: '02:bf:00:00:00:02' };

async function guest(ns: string, tap: string, addr: string): Promise<void> {
  await ip(H, 'link', 'add', tap, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
  await ip(ns, 'link', 'set', 'eth0', 'address', MACS[tap]);
  await ip(H, 'link', 'set', tap, 'master', 'banger0', 'up');
  await ip(ns, 'addr', 'add', `${addr}/24`, 'dev', 'eth0');
  await ip(ns, 'link', 'set', 'eth0', 'up');
  await ip(ns, 'route', 'add', 'default', 'via', '172.30.0.1');
}

const vm = (tap: string, addr: string, extra: Partial<FirewallVm> = {}): FirewallVm => ({ tap, ip: addr, mac: MACS[tap], egress: 'internet', allowPeers: false, allow: [], ...extra });

const reason = isRoot ? '' : inCi ? '' : 'needs root to create network namespaces (run as root, or with CI=true where root is required)';

describe.skipIf(!isRoot && !inCi)(`tap firewall in private namespaces${reason ? ` (skipped: ${reason})` : ''}`, () => {
  beforeAll(async () => {
    if (!isRoot) throw new Error('CI=true but not running as root: the firewall tests need root (network namespaces)');
    for (const ns of [H, G1, G2, O]) {
      await execa('ip', ['netns', 'add', ns]);
      await ip(ns, 'link', 'set', 'lo', 'up');
    }
    // Frames between two TAPs are switched: without br_netfilter (most hosts) only the bridge table sees them.
    // Where br_netfilter is loaded, turn its IP hooks off in H so that the bridge rules alone are tested.
    await execa('ip', ['netns', 'exec', H, 'sysctl', '-q', '-w', 'net.bridge.bridge-nf-call-iptables=0'], { reject: false });
    await ensureBridge('banger0', '172.30.0.1/24', { netns: H });
    await ensureNat('banger0', '172.30.0.1/24', { netns: H, backend: 'nft' });
    await ip(H, 'link', 'add', 'uplink', 'type', 'veth', 'peer', 'name', 'world', 'netns', O);
    for (const a of ['198.51.100.1/24', '192.168.77.1/24']) await ip(H, 'addr', 'add', a, 'dev', 'uplink');
    for (const a of ['198.51.100.2/24', '192.168.77.2/24']) await ip(O, 'addr', 'add', a, 'dev', 'world');
    await ip(H, 'link', 'set', 'uplink', 'up');
    await ip(O, 'link', 'set', 'world', 'up');
    await ip(H, 'route', 'add', 'default', 'via', '198.51.100.2');
    await guest(G1, TAP1, '172.30.0.2');
    await guest(G2, TAP2, '172.30.0.3');
    await Promise.all([serve(H, 7002, 'host'), serve(O, 7001, 'out'), serve(G1, 7005, 'g1'), serve(G2, 7005, 'g2')]);
  }, 60_000);

  afterAll(async () => {
    for (const s of servers) s.kill('SIGKILL');
    if (isRoot) for (const ns of [H, G1, G2, O]) await execa('ip', ['netns', 'del', ns], { reject: false });
  });

  it('default policy: outside through NAT; not the host, the LAN or the other guest', async () => {
    await applyFirewall([vm(TAP1, '172.30.0.2'), vm(TAP2, '172.30.0.3')], [], { netns: H });
    expect(await firewallInstalled({ netns: H })).toBe(true);
    expect(await reads(G1, '198.51.100.2', 7001)).toBe('out');
    expect(await reads(G1, '172.30.0.1', 7002)).toBeNull();
    expect(await reads(G1, '198.51.100.1', 7002)).toBeNull();
    expect(await reads(G1, '192.168.77.2', 7001)).toBeNull();
    expect(await reads(G1, '172.30.0.3', 7005)).toBeNull();
    expect(await reads(G2, '172.30.0.2', 7005)).toBeNull();
  }, 60_000);

  it('--allow opens a private range; --egress none closes the outside; peers only when both allow them', async () => {
    await applyFirewall([vm(TAP1, '172.30.0.2', { allowPeers: true, allow: ['192.168.77.0/24'] }), vm(TAP2, '172.30.0.3', { egress: 'none' })], [], { netns: H });
    expect(await reads(G1, '192.168.77.2', 7001)).toBe('out');
    expect(await reads(G2, '198.51.100.2', 7001)).toBeNull();
    expect(await reads(G1, '172.30.0.3', 7005)).toBeNull(); // G2 did not opt in
    await applyFirewall([vm(TAP1, '172.30.0.2', { allowPeers: true }), vm(TAP2, '172.30.0.3', { allowPeers: true })], [], { netns: H });
    // The blocked probe left G1's ARP entry for G2 INCOMPLETE: a SYN sent now would wait on that resolution and
    // fail (EHOSTUNREACH) when its last, dropped, ARP probe times out. Forget it, as a guest would after ~3 s.
    await forgetNeighbours(G1);
    await forgetNeighbours(G2);
    expect(await reads(G1, '172.30.0.3', 7005)).toBe('g2');
    expect(await reads(G2, '172.30.0.2', 7005)).toBe('g1');
    expect(await reads(G1, '172.30.0.1', 7002)).toBeNull(); // peers, still not the host
  }, 60_000);

  it('a guest that takes another address is cut off; a TAP no VM registered is cut off', async () => {
    await applyFirewall([vm(TAP1, '172.30.0.2')], [], { netns: H });
    expect(await reads(G2, '198.51.100.2', 7001)).toBeNull(); // TAP2 is not registered
    await ip(G1, 'addr', 'del', '172.30.0.2/24', 'dev', 'eth0');
    await ip(G1, 'addr', 'add', '172.30.0.9/24', 'dev', 'eth0');
    await ip(G1, 'route', 'add', 'default', 'via', '172.30.0.1');
    expect(await reads(G1, '198.51.100.2', 7001)).toBeNull();
    await ip(G1, 'addr', 'flush', 'dev', 'eth0');
    await ip(G1, 'addr', 'add', '172.30.0.2/24', 'dev', 'eth0');
    await ip(G1, 'route', 'add', 'default', 'via', '172.30.0.1');
    expect(await reads(G1, '198.51.100.2', 7001)).toBe('out');
  }, 60_000);

  it('a guest that claims another VM\'s MAC is cut off (it could otherwise take that VM\'s frames from the bridge)', async () => {
    await applyFirewall([vm(TAP1, '172.30.0.2'), vm(TAP2, '172.30.0.3')], [], { netns: H });
    expect(await reads(G1, '198.51.100.2', 7001)).toBe('out');
    const claim = async (mac: string) => {
      await ip(G1, 'link', 'set', 'eth0', 'address', mac);
      await forgetNeighbours(G1);
      await ip(H, 'neigh', 'flush', 'dev', 'banger0');
    };
    try {
      await claim(MACS[TAP2]);
      expect(await reads(G1, '198.51.100.2', 7001)).toBeNull();
    } finally {
      await claim(MACS[TAP1]);
    }
    expect(await reads(G1, '198.51.100.2', 7001)).toBe('out');
  }, 60_000);

  it('without the tables the same probes reach the host and the other guest (the checks above can fail)', async () => {
    await removeFirewall({ netns: H });
    expect(await firewallInstalled({ netns: H })).toBe(false);
    expect(await reads(G1, '172.30.0.1', 7002)).toBe('host');
    expect(await reads(G1, '172.30.0.3', 7005)).toBe('g2');
    await removeFirewall({ netns: H }); // absent tables: fine
  }, 60_000);
});
