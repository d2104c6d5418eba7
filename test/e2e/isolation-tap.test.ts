/**
 * The tap guests' isolation for real (issue 9), in two network namespaces this test creates and deletes
 * (test/support/netns.ts):
 * - the host namespace: the daemon (root) runs there with its root helper child, which makes the bridge, the
 *   TAPs, the NAT (config `nat: true`) and the firewall; a TCP service listens on all of its addresses
 *   (loopback, the bridge, its uplink) and one on the bridge address only.
 * - outside: a veth peer that the host routes to by default, with a public-looking address (198.51.100.2) and
 *   a private one (192.168.77.2, a stand-in for the LAN); it has no route to the bridge's subnet, so a guest's
 *   connection to it gets an answer only through the bridge's NAT.
 * Two tap guests, reused for every check: `a` (--allow-peers --allow 192.168.77.0/24) and `b` (--egress none).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { Banger, describeE2E } from './harness.js';
import { LAN, OUTSIDE, UPLINK, makeTestNetns, type TestNetns } from '../support/netns.js';
import { waitUntil } from '../support/wait.js';

const BRIDGE_IP = '172.30.0.1';
const servers: ResultPromise[] = [];
let net: TestNetns;

/** A TCP service in a namespace that greets every connection with `greeting`. */
async function serve(ns: string, host: string, port: number, greeting: string): Promise<void> {
  const code = `require('node:net').createServer((s) => s.end(${JSON.stringify(`${greeting}\n`)})).listen(${port}, ${JSON.stringify(host)}, () => console.log('listening'))`;
  const p = execa('ip', ['netns', 'exec', ns, process.execPath, '-e', code], { reject: false });
  servers.push(p);
  await new Promise<void>((resolve, reject) => {
    p.stdout?.on('data', () => resolve());
    void p.then((r) => reject(new Error(`server ${host}:${port} in ${ns} exited: ${r.stderr}`)));
  });
}

/** Connect from inside the namespace (the host's own view): the service is there and answers. */
async function hostReads(ns: string, host: string, port: number): Promise<string> {
  const code = `const s = require('node:net').connect(${port}, ${JSON.stringify(host)}); s.setEncoding('utf8'); s.on('data', (d) => process.stdout.write(d)); s.on('error', (e) => { console.error(e.message); process.exit(1); });`;
  return (await execa('ip', ['netns', 'exec', ns, process.execPath, '-e', code], { timeout: 10_000 })).stdout.trim();
}

describeE2E('tap guests are isolated from the host, private networks and each other', () => {
  let b: Banger;
  let a: any;
  let bb: any;

  /**
   * What the guest reads from ip:port (bash /dev/tcp), or null when it cannot connect within `seconds`. A
   * refused probe waits the whole bound, so those are short; one that should connect gets a long bound (a
   * TCG guest on a loaded machine can be slow to start bash), which it only uses up when it fails. The probe's
   * own exit status comes back on the last line, so a VM that cannot be reached by `vm ssh` at all (not
   * running, SSH down) fails the test instead of passing for "unreachable".
   */
  async function guestReads(vm: string, ip: string, port: number, seconds = 8): Promise<string | null> {
    const probe = `timeout ${seconds} bash -c 'exec 3<>/dev/tcp/${ip}/${port} && head -c 16 <&3'; rc=$?; echo; echo "probe-exit=$rc"`;
    const r = await b.run(['vm', 'ssh', vm, '--', 'bash', '-c', probe], { timeoutMs: 180_000 });
    const m = /\n?probe-exit=(\d+)\s*$/.exec(r.stdout);
    if (r.exitCode !== 0 || !m) throw new Error(`vm ssh ${vm} did not run the probe (exit ${r.exitCode}): ${r.stderr}`);
    return m[1] === '0' ? r.stdout.slice(0, m.index).trim() : null;
  }

  /** doctor's firewall check (doctor exits 1 when any check fails, as KVM's may here: read its JSON anyway). */
  const firewallCheck = async () => {
    const r = await b.run(['--json', 'doctor'], { timeoutMs: 120_000 });
    return (JSON.parse(r.stdout) as { checks: Array<{ name: string; status: string; detail: string }> }).checks.find((c) => c.name === 'firewall');
  };
  /** banger's firewall tables in the host namespace (the NAT table, banger_<bridge>, is another matter). */
  const nsTables = async () => (await execa('ip', ['netns', 'exec', net.ns, 'nft', 'list', 'tables'])).stdout.split('\n').filter((l) => / banger$/.test(l)).sort();
  /** The root helper processes in the host namespace (the daemon runs one as its child). */
  const helperPids = async () => {
    const pids = String((await execa('ip', ['netns', 'pids', net.ns])).stdout).split('\n').filter(Boolean);
    const mine: number[] = [];
    for (const p of pids) {
      const cmd = await execa('cat', [`/proc/${p}/cmdline`], { reject: false });
      if (cmd.stdout.includes('roothelper/main')) mine.push(Number(p));
    }
    return mine;
  };

  beforeAll(async () => {
    net = await makeTestNetns('bgi', { outside: true });
    await serve(net.out!, '0.0.0.0', 7001, 'out');
    await serve(net.ns, '0.0.0.0', 7002, 'host');
    b = await Banger.create({ BANGER_ROOT_HELPER: '', BANGER_BOOT_TIMEOUT_MS: '840000' }); // two TCG guests on a loaded machine: still bounded
    b.wrap = net.wrap;
    // Egress NAT is opt-in (config `nat`): without it the outside namespace, which has no route back to the
    // bridge's subnet, never sees a reply address it can answer.
    writeFileSync(join(b.home, 'config.json'), JSON.stringify({ nat: true }));
  });

  afterAll(async () => {
    await b?.cleanup();
    for (const s of servers) s.kill('SIGKILL');
    await net?.destroy();
  });

  // two TCG guests booting at once on a loaded machine: a bound above the default, still a bound
  it('two tap VMs boot with their policies recorded; the tables are installed and doctor says so', { timeout: 900_000 }, async () => {
    [a, bb] = await Promise.all([
      b.json(['vm', 'create', '--net', 'tap', '--name', 'a', '--allow-peers', '--allow', '192.168.77.0/24'], { timeoutMs: 870_000 }),
      b.json(['vm', 'create', '--net', 'tap', '--name', 'b', '--egress', 'none'], { timeoutMs: 870_000 }),
    ]);
    expect(a.isolation).toEqual({ egress: 'internet', allowPeers: true, allow: ['192.168.77.0/24'] });
    expect(bb.isolation).toEqual({ egress: 'none', allowPeers: false, allow: [] });
    const show = await b.ok(['vm', 'show', 'b']);
    expect(show.stdout).toContain('isolation: egress none, peers refused, allow none');
    expect(await nsTables()).toEqual(['table bridge banger', 'table inet banger']);
    const fw = await firewallCheck();
    expect(fw?.status, JSON.stringify(fw)).toBe('ok');
    expect(fw?.detail).toContain('2 tap VM(s)');
  });

  it('the host is unreachable from a guest, on every address, though its services answer the host itself', async () => {
    await serve(net.ns, BRIDGE_IP, 7003, 'bridge');
    // the services are there: the host reaches them on loopback, the bridge and its uplink
    expect(await hostReads(net.ns, '127.0.0.1', 7002)).toBe('host');
    expect(await hostReads(net.ns, BRIDGE_IP, 7003)).toBe('bridge');
    expect(await hostReads(net.ns, UPLINK, 7002)).toBe('host');
    expect(await guestReads('a', BRIDGE_IP, 7002)).toBeNull();
    expect(await guestReads('a', BRIDGE_IP, 7003)).toBeNull();
    expect(await guestReads('a', UPLINK, 7002)).toBeNull();
  });

  it('outside is reached through NAT with egress internet, not with egress none; a private range only with --allow', async () => {
    expect(await hostReads(net.ns, OUTSIDE, 7001)).toBe('out');
    expect(await guestReads('a', OUTSIDE, 7001, 60)).toBe('out');
    expect(await guestReads('a', LAN, 7001, 60)).toBe('out'); // --allow 192.168.77.0/24
    expect(await guestReads('b', OUTSIDE, 7001)).toBeNull(); // --egress none
    expect(await guestReads('b', LAN, 7001)).toBeNull();
  });

  it('two VMs do not reach each other unless both were created with --allow-peers', async () => {
    expect(await guestReads('a', bb.guestIp, 22)).toBeNull();
    expect(await guestReads('b', a.guestIp, 22)).toBeNull();
  });

  it('SIGKILL of the root helper: its successor keeps the tables (fail-closed), the daemon registers both VMs again', async () => {
    const [old] = await helperPids();
    expect(old).toBeGreaterThan(0);
    process.kill(old, 'SIGKILL');
    await waitUntil('a new root helper', async () => (await helperPids()).some((p) => p !== old), 60_000, 500);
    expect(await nsTables()).toEqual(['table bridge banger', 'table inet banger']);
    try {
      await waitUntil('the firewall to cover both VMs again', async () => (await firewallCheck())?.detail.includes('2 tap VM(s)') ?? false, 120_000, 2000);
    } catch (e) {
      const log = readFileSync(join(b.home, 'daemon.log'), 'utf8').split('\n').filter((l) => /helper|firewall/.test(l)).slice(-20).join('\n');
      throw new Error(`${(e as Error).message}; doctor: ${JSON.stringify(await firewallCheck())}; daemon.log:\n${log}`);
    }
    expect(await guestReads('a', BRIDGE_IP, 7002)).toBeNull();
    expect(await guestReads('b', OUTSIDE, 7001)).toBeNull();
    expect(await guestReads('a', OUTSIDE, 7001, 60)).toBe('out');
  });

  it('after the last VM is deleted the tables are gone', async () => {
    await b.ok(['vm', 'delete', 'a'], { timeoutMs: 120_000 });
    expect(await nsTables()).toEqual(['table bridge banger', 'table inet banger']); // b is still there
    await b.ok(['vm', 'delete', 'b'], { timeoutMs: 120_000 });
    await waitUntil('the firewall tables to go', async () => (await nsTables()).length === 0, 15_000, 250);
    expect((await firewallCheck())?.detail).toContain('no rules installed');
  });
});
