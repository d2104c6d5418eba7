import { chmod, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { authorize } from '../../src/roothelper/authorize.js';
import { helperConfigFor, loadHelperConfig, parseHelperConfig } from '../../src/roothelper/config.js';
import { ownerTag } from '../../src/host/net/tap-owner.js';
import { parseArgs, parseRequestLine, validateRequest, type Caller, type Verb } from '../../src/roothelper/protocol.js';

/** Expect a refusal (a BangerError of `kind`) whose message matches. */
async function refused(p: Promise<unknown> | (() => unknown), kind: string, message: RegExp): Promise<BangerError> {
  let err: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err, 'expected a refusal').toBeInstanceOf(BangerError);
  const e = err as BangerError;
  expect(e.kind).toBe(kind);
  expect(e.message).toMatch(message);
  return e;
}

/** Only root can make a file owned by root, which the firecracker.jail binary checks demand. */
const isRoot = process.getuid?.() === 0;
let root: string;
let state: string;
let outside: string;
let vmDir: string;
let fcBinary: string;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'banger-validate-'));
  state = join(root, 'state');
  outside = join(root, 'outside');
  vmDir = join(state, 'vms', 'vm1');
  await mkdir(vmDir, { recursive: true });
  await mkdir(join(state, 'images', 'img'), { recursive: true });
  await mkdir(outside, { recursive: true });
  for (const f of ['rootfs.ext4', 'work.ext4']) await writeFile(join(vmDir, f), '');
  await writeFile(join(state, 'images', 'img', 'vmlinux'), '');
  await writeFile(join(outside, 'secret'), '');
  await symlink(outside, join(state, 'escape')); // a directory link out of the state dir
  await symlink(join(outside, 'secret'), join(vmDir, 'evil.ext4')); // a file link out of it
  await symlink(join(vmDir, 'work.ext4'), join(vmDir, 'alias.ext4')); // a link that stays inside
  fcBinary = join(root, 'bin', 'firecracker');
  await mkdir(join(root, 'bin'));
  await writeFile(fcBinary, '#!/bin/sh\n');
  await chmod(fcBinary, 0o755);
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const policy = () => ({ stateDir: state });
/** A jail request whose vmDir is `p` (paths are checked before the binary). */
const jailAt = (p: string) => ({ id: 'vm-1', vmDir: p, binary: '/nonexistent/firecracker', kernel: join(state, 'images/img/vmlinux'), rootDisk: join(vmDir, 'rootfs.ext4'), workDisk: join(vmDir, 'work.ext4') });
const owner = (uid = 1000) => ({ uid, gid: uid, stateDir: '/home/ann/.local/share/banger', socket: '/run/banger-roothelper/helper.sock' });

describe('verbs', () => {
  it('refuses unknown verbs and lists the accepted ones', async () => {
    const e = await refused(validateRequest('exec', { cmd: 'id' }, policy()), 'method_not_found', /refused verb "exec": not one the root helper accepts/);
    expect(e.hint).toMatch(/tap\.create/);
    await refused(() => parseArgs('tap.create;rm', {}), 'method_not_found', /refused verb/);
    await refused(() => parseArgs('__proto__', {}), 'method_not_found', /refused verb/);
    await refused(() => parseArgs('constructor', {}), 'method_not_found', /refused verb/);
  });

  it('accepts valid requests', async () => {
    expect(parseArgs('tap.create', { name: 'bgtap0' })).toEqual({ name: 'bgtap0' });
    expect(parseArgs('tap.create', { name: 'bgtapabcdefghij' })).toMatchObject({ name: 'bgtapabcdefghij' });
    expect(parseArgs('tap.delete', { name: 'bgtap9z' })).toEqual({ name: 'bgtap9z' });
    expect(parseArgs('tap.list', {})).toEqual({});
    expect(parseArgs('bridge.ensure', {})).toEqual({});
  });

  it('has dropped the verb nothing called (vmdir.chown)', async () => {
    await refused(validateRequest('vmdir.chown', { path: vmDir, uid: 1000, gid: 1000 }, policy()), 'method_not_found', /refused verb "vmdir\.chown"/);
  });
});

describe('device names', () => {
  const bad = [
    'eth0',
    'lo',
    'bgtap0;rm -rf /',
    'bgtap$(id)',
    'bgtap`id`',
    'bgtap0 ',
    ' bgtap0',
    'bgtap0\n',
    'bgtap-0',
    'bgtap_0',
    'bgtap.0',
    'bgtap/0',
    'BGTAP0',
    'bgtapA',
    'bgtap',
    'bgtap0123456789a', // 16 characters: over IFNAMSIZ
    'bgtap01234567890123',
    'banger0', // a bridge name is not a TAP name
    '',
  ];
  for (const name of bad) {
    it(`refuses TAP name ${JSON.stringify(name)}`, async () => {
      await refused(() => parseArgs('tap.create', { name }), 'invalid_params', /refused tap\.create: name .* is not a banger TAP name/);
      await refused(() => parseArgs('tap.delete', { name }), 'invalid_params', /refused tap\.delete: name .* is not a banger TAP name/);
    });
  }

  it('refuses non-string names', async () => {
    await refused(() => parseArgs('tap.delete', { name: 0 }), 'invalid_params', /name must be a string, got the number 0/);
    await refused(() => parseArgs('tap.delete', { name: ['bgtap0'] }), 'invalid_params', /name must be a string, got an array/);
    await refused(() => parseArgs('tap.delete', {}), 'invalid_params', /name is required/);
  });

  for (const name of ['br0', 'docker0', 'banger0;x', 'banger$(id)', 'bangerX', 'banger0123456789', 'banger-0']) {
    it(`refuses bridge name ${JSON.stringify(name)} in the helper's config, and any bridge in a request`, async () => {
      await refused(() => parseHelperConfig({ bridge: name, owners: [owner()] }, 'cfg'), 'usage', /cfg: bridge is not a banger bridge name/);
      await refused(() => parseArgs('bridge.ensure', { name }), 'invalid_params', /unknown field "name"/);
      await refused(() => parseArgs('tap.create', { name: 'bgtap0', bridge: name }), 'invalid_params', /unknown field "bridge"/);
    });
  }
});

describe('no request names a user: the caller is the socket\'s owner', () => {
  const cases: Array<[Verb, Record<string, unknown>]> = [
    ['tap.create', { name: 'bgtap0', uid: 0 }],
    ['tap.create', { name: 'bgtap0', gid: 0 }],
    ['tap.create', { name: 'bgtap0', uid: 1000, gid: 1000 }],
    ['firecracker.jail', { id: 'vm-1', vmDir: '/x', binary: '/x', kernel: '/x', rootDisk: '/x', workDisk: '/x', uid: 1000 }],
    ['firecracker.jail', { id: 'vm-1', vmDir: '/x', binary: '/x', kernel: '/x', rootDisk: '/x', workDisk: '/x', gid: 0 }],
    ['firecracker.unjail', { id: 'vm-1', uid: 1000 }],
    ['tap.delete', { name: 'bgtap0', owner: 1000 }],
  ];
  for (const [verb, args] of cases) {
    it(`refuses ${verb} ${JSON.stringify(args)}`, async () => {
      await refused(() => parseArgs(verb, args), 'invalid_params', /unknown field/);
    });
  }
});

describe('ownership (authorize)', () => {
  const caller = (uid = 1000): Caller => ({ uid, gid: uid, stateDir: state, tag: ownerTag(uid, state) });
  const tapOf = (c: Caller, rest = '1') => `bgtap${c.tag}${rest}`;
  it('accepts TAP names with the caller\'s tag', async () => {
    const c = caller();
    await authorize({ verb: 'tap.create', args: { name: tapOf(c) } }, c);
    await authorize({ verb: 'tap.delete', args: { name: tapOf(c, 'zz') } }, c);
  });
  it('refuses another owner\'s, an untagged and a bare-tag TAP name', async () => {
    const a = caller(1000);
    const b = caller(1001);
    expect(a.tag).not.toBe(b.tag);
    expect(ownerTag(1000, state)).not.toBe(ownerTag(1000, `${state}2`)); // one user's two homes differ too
    for (const name of [tapOf(b), 'bgtap0', `bgtap${a.tag}`]) {
      for (const verb of ['tap.create', 'tap.delete'] as const) {
        await refused(authorize({ verb, args: { name } }, a), 'invalid_params', new RegExp(`refused ${verb.replace('.', '\\.')}: TAP .* is not this owner's`));
      }
    }
  });
  it('refuses to jail for a root owner, and a vmDir that is not one of the owner\'s VM directories', async () => {
    const jail = { id: 'vm-1', vmDir, binary: fcBinary, kernel: join(state, 'images/img/vmlinux'), rootDisk: join(vmDir, 'rootfs.ext4'), workDisk: join(vmDir, 'work.ext4') };
    await refused(authorize({ verb: 'firecracker.jail', args: jail }, caller(0)), 'invalid_params', /owner is root, and the jailer never runs Firecracker as uid or gid 0/);
    await refused(authorize({ verb: 'firecracker.jail', args: { ...jail, vmDir: join(state, 'images', 'img') } }, caller()), 'invalid_params', /is not one of this owner's VM directories/);
    await authorize({ verb: 'firecracker.jail', args: jail }, caller());
  });
});

describe('CIDRs', () => {
  const bad: Array<[string, RegExp]> = [
    ['8.8.8.1/24', /not in a private range/],
    ['1.1.1.1/24', /not in a private range/],
    ['172.32.0.1/24', /not in a private range/],
    ['172.15.255.1/24', /not in a private range/],
    ['192.169.0.1/24', /not in a private range/],
    ['100.64.0.1/24', /not in a private range/],
    ['10.0.0.1/8', /prefix \/8 is outside \/16\.\.\/30/],
    ['172.16.0.1/12', /prefix \/12/],
    ['192.168.1.1/31', /prefix \/31/],
    ['192.168.1.1/32', /prefix \/32/],
    ['172.30.0.0/24', /network address/],
    ['172.30.0.255/24', /broadcast address/],
    ['300.1.1.1/24', /not an IPv4 address/],
    ['172.030.0.1/24', /leading zero/],
    ['172.30.0.1', /not an IPv4 CIDR/],
    ['172.30.0.1/24 ', /not an IPv4 CIDR/],
    ['172.30.0.1/24;reboot', /not an IPv4 CIDR/],
    ['fd00::1/64', /not an IPv4 CIDR/],
  ];
  for (const [cidr, why] of bad) {
    it(`refuses ${JSON.stringify(cidr)} in the helper's config, and any CIDR in a request`, async () => {
      await refused(() => parseHelperConfig({ cidr, owners: [owner()] }, 'cfg'), 'usage', why);
      await refused(() => parseArgs('bridge.ensure', { cidr }), 'invalid_params', /unknown field "cidr"/);
    });
  }
  it('accepts private /16-/30 host addresses and defaults the rest', () => {
    for (const cidr of ['172.30.0.1/24', '10.200.0.1/16', '192.168.77.1/30']) expect(parseHelperConfig({ cidr, owners: [owner()] }, 'cfg').cidr).toBe(cidr);
    expect(parseHelperConfig({ owners: [owner()] }, 'cfg')).toMatchObject({ bridge: 'banger0', cidr: '172.30.0.1/24', nat: false });
  });
  it('refuses a non-boolean nat, no owner, two owners on one socket, a relative state dir', async () => {
    await refused(() => parseHelperConfig({ nat: 'true', owners: [owner()] }, 'cfg'), 'usage', /cfg: nat/);
    await refused(() => parseHelperConfig({ owners: [] }, 'cfg'), 'usage', /owners must name at least one owner/);
    await refused(() => parseHelperConfig({ owners: [owner(), owner(1001)] }, 'cfg'), 'usage', /two owners share the socket/);
    await refused(() => parseHelperConfig({ owners: [{ ...owner(), stateDir: 'rel' }] }, 'cfg'), 'usage', /stateDir must be an absolute path/);
    await refused(() => parseHelperConfig({ owners: [{ ...owner(), uid: -1 }] }, 'cfg'), 'usage', /owners\.0\.uid/);
  });
});

describe('extra fields', () => {
  const cases: Array<[Verb, Record<string, unknown>]> = [
    ['tap.create', { name: 'bgtap0', netns: 'host' }],
    ['tap.delete', { name: 'bgtap0', force: true }],
    ['tap.list', { prefix: 'eth' }],
    ['bridge.ensure', { iface: 'eth0' }],
    ['firecracker.unjail', { id: 'x', force: true }],
    ['ping', { x: 1 }],
  ];
  for (const [verb, args] of cases) {
    it(`refuses unknown fields for ${verb}`, async () => {
      await refused(() => parseArgs(verb, args), 'invalid_params', new RegExp(`refused ${verb.replace('.', '\\.')}: .*unknown field`));
    });
  }
  it('refuses args that are not an object', async () => {
    await refused(() => parseArgs('tap.list', []), 'invalid_params', /refused tap\.list/);
    await refused(() => parseArgs('tap.list', 'x'), 'invalid_params', /refused tap\.list/);
    await refused(() => parseArgs('tap.list', null), 'invalid_params', /refused tap\.list/);
  });
  it('ignores __proto__ tricks (no prototype pollution, still refused)', async () => {
    const args = JSON.parse('{"name":"bgtap0","__proto__":{"polluted":true}}');
    await refused(() => parseArgs('tap.create', args), 'invalid_params', /unknown field "__proto__"/);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });
});

describe('paths', () => {
  it('refuses relative and dot-dot paths before touching the disk', async () => {
    await refused(validateRequest('firecracker.jail', jailAt('vms/vm1'), policy()), 'invalid_params', /vmDir "vms\/vm1" is not an absolute path/);
    await refused(validateRequest('firecracker.jail', jailAt('../etc'), policy()), 'invalid_params', /contains a "\.\." segment/);
    await refused(
      validateRequest('firecracker.jail', jailAt(`${state}/vms/../../outside`), policy()),
      'invalid_params',
      /contains a "\.\." segment/,
    );
    await refused(validateRequest('firecracker.jail', jailAt(`${vmDir}\0`), policy()), 'invalid_params', /NUL byte/);
    await refused(validateRequest('firecracker.jail', jailAt(''), policy()), 'invalid_params', /must not be empty/);
  });

  it('refuses paths outside the state directory', async () => {
    await refused(validateRequest('firecracker.jail', jailAt('/etc'), policy()), 'invalid_params', /vmDir "\/etc" is not inside the state directory/);
    await refused(validateRequest('firecracker.jail', jailAt(outside), policy()), 'invalid_params', /is not inside the state directory/);
    await refused(validateRequest('firecracker.jail', jailAt(state), policy()), 'invalid_params', /is not inside the state directory/);
  });

  it('follows symlinks: a link inside the state dir that points out is refused, and says where it leads', async () => {
    const e = await refused(
      validateRequest('firecracker.jail', jailAt(join(state, 'escape')), policy()),
      'invalid_params',
      /is not inside the state directory .* \(it resolves to .*outside\)/,
    );
    expect(e.message).toContain(outside);
    await refused(
      validateRequest(
        'firecracker.jail',
        { id: 'vm1', vmDir, binary: fcBinary, kernel: join(state, 'images/img/vmlinux'), rootDisk: join(vmDir, 'evil.ext4'), workDisk: join(vmDir, 'work.ext4') },
        policy(),
      ),
      'invalid_params',
      /rootDisk .*evil\.ext4" is not inside the state directory/,
    );
  });

  it('refuses missing paths and the wrong kind of file', async () => {
    await refused(validateRequest('firecracker.jail', jailAt(join(state, 'vms', 'nope')), policy()), 'invalid_params', /does not exist/);
    await refused(validateRequest('firecracker.jail', jailAt(join(vmDir, 'work.ext4')), policy()), 'invalid_params', /is not a directory/);
  });

  it('resolves a link that stays inside and returns the real path', async () => {
    const v = await validateRequest(
      'firecracker.jail',
      { id: 'vm1', vmDir, binary: fcBinary, kernel: join(state, 'images/img/vmlinux'), rootDisk: join(vmDir, 'rootfs.ext4'), workDisk: join(vmDir, 'alias.ext4') },
      policy(),
    );
    expect(v.verb).toBe('firecracker.jail');
    if (v.verb === 'firecracker.jail') expect(v.args.workDisk).toBe(join(vmDir, 'work.ext4'));
  });
});

describe('firecracker.jail', () => {
  const base = () => ({
    id: 'vm-1',
    vmDir,
    binary: fcBinary,
    kernel: join(state, 'images/img/vmlinux'),
    rootDisk: join(vmDir, 'rootfs.ext4'),
    workDisk: join(vmDir, 'work.ext4'),
  });
  it('refuses ids the jailer would not take', async () => {
    for (const id of ['vm_1', 'a/b', '../x', 'x'.repeat(65), '']) {
      await refused(validateRequest('firecracker.jail', { ...base(), id }, policy()), 'invalid_params', /is not a Firecracker id/);
    }
  });
  it('refuses a binary that others could write, that does not exist, or that is not an absolute path', async () => {
    const writable = join(root, 'bin', 'firecracker-rw');
    await writeFile(writable, '');
    await chmod(writable, 0o777);
    await refused(validateRequest('firecracker.jail', { ...base(), binary: writable }, policy()), 'invalid_params', /must be owned by root and writable only by root/);
    await refused(validateRequest('firecracker.jail', { ...base(), binary: '/nonexistent/firecracker' }, policy()), 'invalid_params', /does not exist/);
    await refused(validateRequest('firecracker.jail', { ...base(), binary: 'firecracker' }, policy()), 'invalid_params', /not an absolute path/);
  });
  it.skipIf(!isRoot)('refuses a root-owned binary not named like firecracker (needs root: only root can own a file as root)', async () => {
    const other = join(root, 'bin', 'sh');
    await writeFile(other, '');
    await chmod(other, 0o755);
    await refused(validateRequest('firecracker.jail', { ...base(), binary: other }, policy()), 'invalid_params', /not named like firecracker/);
  });
  it.skipIf(!isRoot)('refuses a root-owned binary in a directory others can write (needs root)', async () => {
    const open = join(root, 'open-bin');
    await mkdir(open);
    await chmod(open, 0o777);
    const bin = join(open, 'firecracker');
    await writeFile(bin, '#!/bin/sh\n');
    await chmod(bin, 0o755);
    await refused(validateRequest('firecracker.jail', { ...base(), binary: bin }, policy()), 'invalid_params', /lies in .*open-bin, which is not safe for what root runs \(it is writable by every user/);
  });
  it.skipIf(!isRoot)('accepts a well-formed request (needs root: the binary must be root-owned)', async () => {
    const v = await validateRequest('firecracker.jail', base(), policy());
    expect(v.verb).toBe('firecracker.jail');
  });
  it('refuses a jailer chosen by the client', async () => {
    await refused(validateRequest('firecracker.jail', { ...base(), jailer: '/bin/sh' }, policy()), 'invalid_params', /unknown field "jailer"/);
  });
});

describe('the helper\'s own config', () => {
  it('takes the bridge, CIDR and NAT from the owner\'s config.json, so daemon and helper agree', async () => {
    const cfgPath = join(root, 'owner-config.json');
    await writeFile(cfgPath, JSON.stringify({ bridge: 'banger7', subnet: '10.9.0.0/24', nat: true }));
    expect(helperConfigFor(owner(), cfgPath)).toEqual({ bridge: 'banger7', cidr: '10.9.0.1/24', nat: true, owners: [owner()] });
    expect(helperConfigFor(owner(), join(root, 'none.json'))).toMatchObject({ bridge: 'banger0', cidr: '172.30.0.1/24', nat: false });
  });
  it('refuses a config file others could write', async () => {
    const p = join(root, 'helper.json');
    await writeFile(p, JSON.stringify({ owners: [owner()] }));
    await chmod(p, 0o666);
    await refused(loadHelperConfig(p), 'usage', /refused the root helper's config .*helper\.json: .* is not safe/);
  });
  it.skipIf(!isRoot)('reads a root-owned config (needs root)', async () => {
    const p = join(root, 'helper-ok.json');
    await writeFile(p, JSON.stringify({ owners: [owner()] }));
    await chmod(p, 0o644);
    expect((await loadHelperConfig(p)).owners).toEqual([owner()]);
  });
});

describe('request lines', () => {
  it('refuses lines that are not JSON', async () => {
    await refused(() => parseRequestLine('tap.create bgtap0'), 'parse', /refused request: not JSON/);
  });
  it('refuses malformed envelopes', async () => {
    await refused(() => parseRequestLine('{"verb":"tap.list","args":{}}'), 'invalid_request', /id is required/);
    await refused(() => parseRequestLine('{"id":1,"args":{}}'), 'invalid_request', /verb is required/);
    await refused(() => parseRequestLine('{"id":1,"verb":"tap.list","args":{},"sudo":true}'), 'invalid_request', /unknown field "sudo"/);
    await refused(() => parseRequestLine('[1,2]'), 'invalid_request', /refused request/);
    await refused(() => parseRequestLine('{"id":-1,"verb":"tap.list"}'), 'invalid_request', /id must be/);
  });
  it('keeps the id of a well-formed envelope and defaults args to {}', () => {
    expect(parseRequestLine('{"id":7,"verb":"tap.list"}')).toEqual({ id: 7, verb: 'tap.list', args: {} });
  });
});
