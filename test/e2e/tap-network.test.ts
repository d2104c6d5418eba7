/**
 * TAP networking for real, inside a network namespace this test creates and deletes: the daemon (root)
 * runs the root helper as its child, which makes the bridge and the TAP devices; guests get addresses
 * from the SQLite allocator and reach each other over the bridge. Then SIGKILL of the daemon: leases
 * are adopted and nothing leaks, the TAP count is exact, and a bgtap device this daemon did not make is left alone.
 * A fork of a running tap VM gets its own TAP, MAC and address.
 */
import { execa } from 'execa';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { Banger, describeE2E, pidAlive } from './harness.js';
import { makeTestNetns, type TestNetns } from '../support/netns.js';

let net: TestNetns;

async function taps(): Promise<string[]> {
  const r = await execa('ip', ['-n', net.ns, '-j', 'link', 'show'], { reject: false });
  if (r.exitCode !== 0) return [];
  return (JSON.parse(r.stdout) as Array<{ ifname: string }>).map((l) => l.ifname).filter((n) => n.startsWith('bgtap') && n !== FOREIGN).sort();
}

/** A TAP with banger's prefix that this daemon did not make (another user's or home's): never touched. */
const FOREIGN = 'bgtapforeign1';
const foreignExists = async () => (await execa('ip', ['-n', net.ns, 'link', 'show', FOREIGN], { reject: false })).exitCode === 0;

async function waitFor<T>(fn: () => Promise<T>, ok: (v: T) => boolean, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let v = await fn();
  while (!ok(v) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 250));
    v = await fn();
  }
  return v;
}

describeE2E('tap networking in a network namespace', () => {
  let b: Banger;
  beforeAll(async () => {
    net = await makeTestNetns('bgt');
    b = await Banger.create({ BANGER_ROOT_HELPER: '' });
    b.wrap = net.wrap;
  });
  afterAll(async () => {
    await b?.cleanup();
    await net?.destroy(); // the root helper child (detached) runs in the namespace: destroy stops it too
  });

  it('vm run --net tap --rm -- ip -4 addr shows the allocated address; the warm pool is made', async () => {
    const r = await b.run(['vm', 'run', '--net', 'tap', '--rm', '--name', 'one', '--', 'ip', '-4', 'addr', 'show'], { timeoutMs: 420_000 });
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/inet 172\.30\.0\.2\/24/);
    expect(r.stderr).toContain('network.lease');
    // after --rm (whose delete finishes in the daemon): only the pool's idle devices remain
    const status = await waitFor(() => b.json(['daemon', 'status']), (s) => s.tapPool.every((l: any) => l.vmId === null), 120_000);
    expect(status.rootHelper.state).toBe('connected');
    const idle = await waitFor(taps, (t) => t.length === 2, 15_000);
    expect(idle).toHaveLength(2);
    expect(status.tapPool.filter((l: any) => l.vmId !== null)).toEqual([]);
  });

  it('two VMs at once get different addresses and reach each other; SIGKILL of the daemon adopts their leases; a fork gets its own TAP, MAC and address; delete leaves only the pool', async () => {
    const [a, c] = await Promise.all([
      // both opt in to reaching each other: the tap firewall drops VM-to-VM traffic otherwise (isolation-tap.test.ts)
      b.json(['vm', 'create', '--net', 'tap', '--allow-peers', '--name', 'a'], { timeoutMs: 600_000 }),
      b.json(['vm', 'create', '--net', 'tap', '--allow-peers', '--name', 'c'], { timeoutMs: 600_000 }),
    ]);
    expect(a.net).toBe('tap');
    expect(a.guestIp).toMatch(/^172\.30\.0\.\d+$/);
    expect(c.guestIp).toMatch(/^172\.30\.0\.\d+$/);
    expect(a.guestIp).not.toBe(c.guestIp);
    const reach = await b.run(['vm', 'ssh', 'a', '--', 'bash', '-c', `timeout 10 bash -c 'exec 3<>/dev/tcp/${c.guestIp}/22 && head -c 4 <&3'`]);
    expect(reach.exitCode, reach.stderr).toBe(0);
    expect(reach.stdout).toBe('SSH-');

    const before = await b.json(['daemon', 'status']);
    const leasedBefore = before.tapPool.filter((l: any) => l.vmId).map((l: any) => `${l.tap}:${l.vmId}`).sort();
    expect(leasedBefore).toHaveLength(2);
    // exact: two leased devices and the warm pool refilled to its size (a lease must never leave it short)
    const tapsBefore = await waitFor(taps, (t) => t.length === 4, 15_000);
    expect(tapsBefore).toHaveLength(4);
    expect(new Set(tapsBefore.map((t) => t.slice(0, 9))).size).toBe(1); // one owner tag in every name
    await execa('ip', ['-n', net.ns, 'tuntap', 'add', 'dev', FOREIGN, 'mode', 'tap']);

    process.kill(b.daemonPid()!, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 500));
    expect(pidAlive(a.pid) && pidAlive(c.pid)).toBe(true);
    const list = await b.json(['vm', 'list']);
    expect(list.map((v: any) => [v.name, v.state, v.pid])).toEqual(expect.arrayContaining([['a', 'running', a.pid], ['c', 'running', c.pid]]));
    const after = await waitFor(() => b.json(['daemon', 'status']), (s: any) => s.rootHelper?.state === 'connected', 20_000);
    const leasedAfter = after.tapPool.filter((l: any) => l.vmId).map((l: any) => `${l.tap}:${l.vmId}`).sort();
    expect(leasedAfter).toEqual(leasedBefore);
    expect(await waitFor(taps, (t) => t.length === tapsBefore.length, 10_000)).toEqual(tapsBefore);
    expect(await foreignExists()).toBe(true);
    expect((await b.run(['vm', 'ssh', 'c', '--', 'true'])).exitCode).toBe(0);

    // A fork of a running tap VM: its own TAP, MAC and address (applied by the guest agent), the source's policy
    const fork = await b.json(['vm', 'fork', 'a', '--name-prefix', 'af'], { timeoutMs: 300_000 });
    const f = fork.forks[0];
    expect([f.name, f.net, f.state]).toEqual(['af-1', 'tap', 'running']);
    expect(f.guestIp).toMatch(/^172\.30\.0\.\d+$/);
    expect([a.guestIp, c.guestIp]).not.toContain(f.guestIp);
    const inFork = await b.run(['vm', 'ssh', 'af-1', '--', 'sh', '-c', 'hostname; cat /sys/class/net/e*/address; ip -4 -o addr show scope global']);
    expect(inFork.exitCode, inFork.stderr).toBe(0);
    const [hostname, mac, ...addrs] = inFork.stdout.trim().split('\n');
    expect(hostname).toBe('af-1');
    const qemuMac = /mac=([0-9a-f:]{17})/.exec((await execa('ps', ['-o', 'args=', '-p', String(f.pid)])).stdout)?.[1];
    expect(mac).toBe(qemuMac);
    const sourceMac = (await b.run(['vm', 'ssh', 'a', '--', 'sh', '-c', 'cat /sys/class/net/e*/address'])).stdout.trim();
    expect(sourceMac).not.toBe(mac);
    expect(addrs).toHaveLength(1); // its own address only: the source's is gone
    expect(addrs[0]).toContain(`inet ${f.guestIp}/24`);
    const peer = await b.run(['vm', 'ssh', 'c', '--', 'bash', '-c', `timeout 10 bash -c 'exec 3<>/dev/tcp/${f.guestIp}/22 && head -c 4 <&3'`]);
    expect(peer.stdout, peer.stderr).toBe('SSH-'); // allow-peers came with the fork
    expect((await b.run(['vm', 'ssh', 'a', '--', 'ip', '-4', '-o', 'addr', 'show', 'scope', 'global'])).stdout).toContain(`inet ${a.guestIp}/24`);

    await b.ok(['vm', 'delete', 'a', 'c', 'af-1'], { timeoutMs: 120_000 });
    const final = await b.json(['daemon', 'status']);
    expect(final.tapPool.filter((l: any) => l.vmId !== null)).toEqual([]);
    const left = await waitFor(taps, (t) => t.length === 2, 15_000);
    expect(left.sort()).toEqual(final.tapPool.map((l: any) => l.tap).sort());
    expect(b.qemuPids()).toEqual([]);
    expect(await foreignExists()).toBe(true);
  });
});
