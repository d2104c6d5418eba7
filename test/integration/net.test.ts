import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import {
  allocateAddress,
  bridgeCidrProblem,
  createTap,
  deleteTap,
  ensureBridge,
  ensureNat,
  gatewayAddress,
  hostAddresses,
  inSubnet,
  listTaps,
  macForVm,
  parseCidr,
} from '../../src/host/net/net.js';
import { run, which, type Runner, type RunResult } from '../../src/host/exec/runner.js';

const isRoot = process.getuid?.() === 0;
const inCi = process.env.CI === 'true';

async function kindOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(BangerError);
    return `${(e as BangerError).kind}: ${(e as BangerError).message}`;
  }
  return 'resolved';
}

describe('pure helpers', () => {
  it('macForVm is deterministic, locally administered and unicast', () => {
    const a = macForVm('vm-abc');
    expect(a).toBe(macForVm('vm-abc'));
    expect(a).not.toBe(macForVm('vm-abd'));
    expect(a).toMatch(/^02(:[0-9a-f]{2}){5}$/);
    const first = Number.parseInt(a.slice(0, 2), 16);
    expect(first & 0x02).toBe(0x02); // locally administered
    expect(first & 0x01).toBe(0); // unicast
  });

  it('parses CIDRs and works out gateway and host range', () => {
    expect(parseCidr('172.30.0.1/24')).toEqual({ address: '172.30.0.1', prefix: 24, network: '172.30.0.0', broadcast: '172.30.0.255', netmask: '255.255.255.0' });
    expect(gatewayAddress('172.30.0.0/24')).toBe('172.30.0.1');
    expect(hostAddresses('172.30.0.0/24')).toEqual({ first: '172.30.0.2', last: '172.30.0.254', count: 253 });
    expect(hostAddresses('192.168.5.0/30')).toEqual({ first: '192.168.5.2', last: '192.168.5.2', count: 1 });
    expect(inSubnet('10.1.0.0/16', '10.1.200.3')).toBe(true);
    expect(inSubnet('10.1.0.0/16', '10.2.0.3')).toBe(false);
  });

  it('allocates the first free guest address from .2, never the gateway, and says when full', () => {
    expect(allocateAddress('172.30.0.1/24', [])).toBe('172.30.0.2');
    expect(allocateAddress('172.30.0.1/24', ['172.30.0.2', '172.30.0.3', '172.30.0.5'])).toBe('172.30.0.4');
    expect(allocateAddress('192.168.9.1/30', [])).toBe('192.168.9.2');
    expect(() => allocateAddress('192.168.9.1/30', ['192.168.9.2'])).toThrow(/no free address left in 192\.168\.9\.0\/30/);
    // a gateway that is not .1 is skipped too
    expect(allocateAddress('10.9.0.2/24', [])).toBe('10.9.0.3');
  });

  it('judges bridge CIDRs', () => {
    expect(bridgeCidrProblem('172.30.0.1/24')).toBeUndefined();
    expect(bridgeCidrProblem('10.0.0.1/16')).toBeUndefined();
    expect(bridgeCidrProblem('8.8.8.1/24')).toMatch(/private/);
    expect(bridgeCidrProblem('10.0.0.1/8')).toMatch(/\/16\.\.\/30/);
  });

  it('refuses foreign names before running anything', async () => {
    const calls: string[][] = [];
    const runner: Runner = async (file, args) => {
      calls.push([file, ...args]);
      return { exitCode: 0, stdout: '', stderr: '' };
    };
    expect(await kindOf(createTap('eth0', 1000, { runner }))).toMatch(/^invalid_params: refused TAP name "eth0"/);
    expect(await kindOf(deleteTap('bgtap0;reboot', { runner }))).toMatch(/^invalid_params/);
    expect(await kindOf(ensureBridge('docker0', '172.30.0.1/24', { runner }))).toMatch(/^invalid_params: refused bridge name/);
    expect(await kindOf(ensureNat('banger0', '8.8.8.8/33', { runner }))).toMatch(/^invalid_params/);
    expect(await kindOf(createTap('bgtap0', 1000, { runner, netns: 'x;y' }))).toMatch(/^invalid_params: refused network namespace/);
    expect(calls).toEqual([]);
  });

  it('builds the expected commands (recorded runner)', async () => {
    const calls: string[][] = [];
    const runner: Runner = async (file, args): Promise<RunResult> => {
      calls.push([file, ...args]);
      if (args.includes('show') && args.includes('bgtap7')) return { exitCode: 1, stdout: '', stderr: 'Device "bgtap7" does not exist.\n' };
      if (args.includes('show') && args.includes('banger0')) {
        return { exitCode: 0, stdout: JSON.stringify([{ ifname: 'banger0', linkinfo: { info_kind: 'bridge' } }]), stderr: '' };
      }
      return { exitCode: 0, stdout: '', stderr: '' };
    };
    await createTap('bgtap7', 1234, { runner, netns: 'ns1', gid: 55, bridge: 'banger0' });
    expect(calls).toContainEqual(['ip', '-n', 'ns1', 'tuntap', 'add', 'dev', 'bgtap7', 'mode', 'tap', 'user', '1234', 'group', '55']);
    expect(calls).toContainEqual(['ip', '-n', 'ns1', 'link', 'set', 'dev', 'bgtap7', 'master', 'banger0']);
    expect(calls.at(-1)).toEqual(['ip', '-n', 'ns1', 'link', 'set', 'dev', 'bgtap7', 'up']);
  });
});

const reason = isRoot ? '' : inCi ? '' : 'needs root to create a network namespace (run as root, or with CI=true where root is required)';

describe.skipIf(!isRoot && !inCi)(`host network in a private namespace${reason ? ` (skipped: ${reason})` : ''}`, () => {
  const ns = `bgtest-${process.pid}-${randomBytes(3).toString('hex')}`;
  const opts = { netns: ns };
  const bridge = 'banger0';
  const cidr = '172.31.77.1/24';

  beforeAll(async () => {
    if (!isRoot) throw new Error('CI=true but not running as root: the TAP/bridge tests need root (network namespaces)');
    await run('ip', ['netns', 'add', ns]);
    await run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
  });

  afterAll(async () => {
    if (isRoot) await run('ip', ['netns', 'del', ns], { reject: false });
  });

  it('ensureBridge creates the bridge with its address, up, and is idempotent', async () => {
    expect(await ensureBridge(bridge, cidr, opts)).toEqual({ name: bridge, created: true, addressAdded: true });
    expect(await ensureBridge(bridge, cidr, opts)).toEqual({ name: bridge, created: false, addressAdded: false });
    const addr = JSON.parse((await run('ip', ['-n', ns, '-j', 'addr', 'show', 'dev', bridge])).stdout) as Array<{ flags: string[]; addr_info: Array<{ local: string; prefixlen: number; family: string }> }>;
    expect(addr[0].flags).toContain('UP');
    expect(addr[0].addr_info.filter((a) => a.family === 'inet')).toEqual([expect.objectContaining({ local: '172.31.77.1', prefixlen: 24 })]);
  });

  it('createTap makes an owned TAP on the bridge, up, and is idempotent', async () => {
    expect(await createTap('bgtapt1', 1000, { ...opts, bridge })).toEqual({ name: 'bgtapt1', created: true });
    expect(await createTap('bgtapt1', 1000, { ...opts, bridge })).toEqual({ name: 'bgtapt1', created: false });
    expect(await createTap('bgtapt2', 1001, { ...opts, gid: 1001, bridge })).toEqual({ name: 'bgtapt2', created: true });
    const owner = await run('ip', ['netns', 'exec', ns, 'cat', '/sys/class/net/bgtapt2/owner', '/sys/class/net/bgtapt2/group']);
    expect(owner.stdout.trim().split('\n')).toEqual(['1001', '1001']);
    const taps = await listTaps('bgtap', opts);
    expect(taps.map((t) => t.name)).toEqual(['bgtapt1', 'bgtapt2']);
    for (const t of taps) {
      expect(t.master).toBe(bridge);
      expect(t.up).toBe(true);
    }
  });

  it('refuses a TAP owned by someone else, a device of another kind, and a missing bridge', async () => {
    expect(await kindOf(createTap('bgtapt1', 4242, opts))).toMatch(/^conflict: TAP bgtapt1 exists but belongs to uid 1000, not uid 4242/);
    // (this kernel may lack the dummy driver: a bridge and a TAP serve as "the wrong kind")
    await run('ip', ['-n', ns, 'link', 'add', 'bgtapd1', 'type', 'bridge']);
    expect(await kindOf(createTap('bgtapd1', 1000, opts))).toMatch(/^conflict: bgtapd1 exists but is a bridge, not a TAP device/);
    expect(await kindOf(deleteTap('bgtapd1', opts))).toMatch(/^conflict: refused to delete bgtapd1: it is a bridge/);
    expect((await listTaps('bgtap', opts)).map((t) => t.name)).not.toContain('bgtapd1');
    expect(await kindOf(createTap('bgtapt3', 1000, { ...opts, bridge: 'banger5' }))).toMatch(/^not_found: bridge banger5 does not exist/);
    expect((await listTaps('bgtap', opts)).map((t) => t.name)).not.toContain('bgtapt3'); // checked before creating
    await run('ip', ['-n', ns, 'tuntap', 'add', 'dev', 'banger6', 'mode', 'tap']);
    expect(await kindOf(ensureBridge('banger6', cidr, opts))).toMatch(/^conflict: banger6 exists but is a tun\/tap, not a bridge/);
    expect(await kindOf(createTap('bgtapt4', 1000, { ...opts, bridge: 'banger6' }))).toMatch(/^not_found: banger6 is a tun\/tap, not a bridge/);
  });

  it('deleteTap removes a TAP and is idempotent', async () => {
    expect(await deleteTap('bgtapt2', opts)).toEqual({ name: 'bgtapt2', deleted: true });
    expect(await deleteTap('bgtapt2', opts)).toEqual({ name: 'bgtapt2', deleted: false });
    expect((await listTaps('bgtap', opts)).map((t) => t.name)).toEqual(['bgtapt1']);
  });

  it('touches nothing outside the namespace', async () => {
    const host = await run('ip', ['-j', 'link', 'show']);
    const names = (JSON.parse(host.stdout) as Array<{ ifname: string }>).map((l) => l.ifname);
    for (const n of ['bgtapt1', 'bgtapd1', 'banger6']) expect(names).not.toContain(n);
  });

  it('ensureNat (nft) installs one table, replaced rather than duplicated, and turns on forwarding', async (ctx) => {
    if (!(await which('nft'))) {
      ctx.skip(); // nft is not installed here; the iptables path is covered by the recorded-runner test above
      return;
    }
    expect(await ensureNat(bridge, cidr, opts)).toEqual({ backend: 'nft' });
    expect(await ensureNat(bridge, cidr, opts)).toEqual({ backend: 'nft' });
    const table = (await run('ip', ['netns', 'exec', ns, 'nft', 'list', 'table', 'ip', 'banger_banger0'])).stdout;
    expect(table.match(/masquerade/g)).toHaveLength(1);
    expect(table).toContain('ip saddr 172.31.77.0/24 oifname != "banger0" masquerade');
    const fwd = await run('ip', ['netns', 'exec', ns, 'sysctl', '-n', 'net.ipv4.ip_forward']);
    expect(fwd.stdout.trim()).toBe('1');
    const all = (await run('ip', ['netns', 'exec', ns, 'nft', 'list', 'tables'])).stdout;
    expect(all.trim().split('\n')).toEqual(['table ip banger_banger0']);
  });
});

describe('ensureNat backend choice (recorded runner)', () => {
  it('uses iptables when nft is missing, adding only rules that -C does not find', async () => {
    const calls: string[][] = [];
    const runner: Runner = async (file, args) => {
      calls.push([file, ...args]);
      // the MASQUERADE rule exists already; the FORWARD rules do not
      if (file === 'iptables' && args.includes('-C')) return { exitCode: args.includes('MASQUERADE') ? 0 : 1, stdout: '', stderr: '' };
      return { exitCode: 0, stdout: '', stderr: '' };
    };
    const r = await ensureNat('banger0', '172.30.0.1/24', { runner, whichFn: async (c) => (c === 'iptables' ? '/usr/sbin/iptables' : undefined) });
    expect(r).toEqual({ backend: 'iptables' });
    const adds = calls.filter((c) => c[0] === 'iptables' && c.includes('-A'));
    expect(adds).toEqual([
      ['iptables', '-t', 'filter', '-A', 'FORWARD', '-i', 'banger0', '-j', 'ACCEPT'],
      ['iptables', '-t', 'filter', '-A', 'FORWARD', '-o', 'banger0', '-m', 'conntrack', '--ctstate', 'RELATED,ESTABLISHED', '-j', 'ACCEPT'],
    ]);
    expect(calls[0]).toEqual(['sysctl', '-q', '-w', 'net.ipv4.ip_forward=1']);
  });

  it('says what to install when neither nft nor iptables exists', async () => {
    const runner: Runner = async () => ({ exitCode: 0, stdout: '', stderr: '' });
    expect(await kindOf(ensureNat('banger0', '172.30.0.1/24', { runner, whichFn: async () => undefined }))).toMatch(/^unsupported: cannot set up NAT: neither nft nor iptables/);
  });
});
