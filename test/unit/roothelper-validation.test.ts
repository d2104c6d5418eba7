import { chmod, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { parseArgs, parseRequestLine, validateRequest, type Verb } from '../../src/roothelper/protocol.js';

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

describe('verbs', () => {
  it('refuses unknown verbs and lists the accepted ones', async () => {
    const e = await refused(validateRequest('exec', { cmd: 'id' }, policy()), 'method_not_found', /refused verb "exec": not one the root helper accepts/);
    expect(e.hint).toMatch(/tap\.create/);
    await refused(() => parseArgs('tap.create;rm', {}), 'method_not_found', /refused verb/);
    await refused(() => parseArgs('__proto__', {}), 'method_not_found', /refused verb/);
    await refused(() => parseArgs('constructor', {}), 'method_not_found', /refused verb/);
  });

  it('accepts valid requests', async () => {
    expect(parseArgs('tap.create', { name: 'bgtap0', uid: 1000 })).toEqual({ name: 'bgtap0', uid: 1000 });
    expect(parseArgs('tap.create', { name: 'bgtapabcdefghij', uid: 0, gid: 2147483647, bridge: 'banger0' })).toMatchObject({ name: 'bgtapabcdefghij' });
    expect(parseArgs('tap.delete', { name: 'bgtap9z' })).toEqual({ name: 'bgtap9z' });
    expect(parseArgs('tap.list', {})).toEqual({});
    expect(parseArgs('bridge.ensure', { name: 'banger', cidr: '172.30.0.1/24', nat: true })).toMatchObject({ nat: true });
    expect(parseArgs('bridge.ensure', { name: 'banger123456789', cidr: '10.200.0.1/16', nat: false })).toMatchObject({ name: 'banger123456789' });
    expect(parseArgs('bridge.ensure', { name: 'banger0', cidr: '192.168.77.1/30', nat: false })).toMatchObject({ cidr: '192.168.77.1/30' });
    const v = await validateRequest('vmdir.chown', { path: vmDir, uid: 1000, gid: 1000 }, policy());
    expect(v).toEqual({ verb: 'vmdir.chown', args: { path: vmDir, uid: 1000, gid: 1000 } });
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
      await refused(() => parseArgs('tap.create', { name, uid: 1000 }), 'invalid_params', /refused tap\.create: name .* is not a banger TAP name/);
      await refused(() => parseArgs('tap.delete', { name }), 'invalid_params', /refused tap\.delete: name .* is not a banger TAP name/);
    });
  }

  it('refuses non-string names', async () => {
    await refused(() => parseArgs('tap.delete', { name: 0 }), 'invalid_params', /name must be a string, got the number 0/);
    await refused(() => parseArgs('tap.delete', { name: ['bgtap0'] }), 'invalid_params', /name must be a string, got an array/);
    await refused(() => parseArgs('tap.delete', {}), 'invalid_params', /name is required/);
  });

  for (const name of ['br0', 'docker0', 'banger0;x', 'banger$(id)', 'bangerX', 'banger0123456789', 'banger-0']) {
    it(`refuses bridge name ${JSON.stringify(name)}`, async () => {
      await refused(() => parseArgs('bridge.ensure', { name, cidr: '172.30.0.1/24', nat: false }), 'invalid_params', /name .* is not a banger bridge name/);
      await refused(() => parseArgs('tap.create', { name: 'bgtap0', uid: 1, bridge: name }), 'invalid_params', /bridge .* is not a banger bridge name/);
    });
  }
});

describe('uids and gids', () => {
  const cases: Array<[unknown, RegExp]> = [
    [-1, /uid must not be negative/],
    [1.5, /uid must be an integer, got the non-integer 1.5/],
    ['1000', /uid must be an integer, got the string "1000"/],
    ['0', /uid must be an integer/],
    [2 ** 31, /uid must be below 2\^31/],
    [2 ** 53, /uid must be below 2\^31/],
    [null, /uid must be an integer, got null/],
    [true, /uid must be an integer, got boolean/],
    [{}, /uid must be an integer, got object/],
    [undefined, /uid is required/],
  ];
  for (const [uid, msg] of cases) {
    it(`refuses uid ${JSON.stringify(uid) ?? 'undefined'}`, async () => {
      await refused(() => parseArgs('tap.create', { name: 'bgtap0', uid }), 'invalid_params', msg);
      await refused(() => parseArgs('vmdir.chown', { path: vmDir, uid, gid: 1 }), 'invalid_params', msg);
    });
  }
  it('refuses bad gids too', async () => {
    await refused(() => parseArgs('tap.create', { name: 'bgtap0', uid: 1, gid: -5 }), 'invalid_params', /gid must not be negative/);
    await refused(() => parseArgs('vmdir.chown', { path: vmDir, uid: 1, gid: 0.1 }), 'invalid_params', /gid must be an integer/);
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
    it(`refuses ${JSON.stringify(cidr)}`, async () => {
      await refused(() => parseArgs('bridge.ensure', { name: 'banger0', cidr, nat: false }), 'invalid_params', why);
    });
  }
  it('refuses a non-boolean nat', async () => {
    await refused(() => parseArgs('bridge.ensure', { name: 'banger0', cidr: '172.30.0.1/24', nat: 'true' }), 'invalid_params', /nat must be a boolean, got the string "true"/);
    await refused(() => parseArgs('bridge.ensure', { name: 'banger0', cidr: '172.30.0.1/24' }), 'invalid_params', /nat is required/);
  });
});

describe('extra fields', () => {
  const cases: Array<[Verb, Record<string, unknown>]> = [
    ['tap.create', { name: 'bgtap0', uid: 1, netns: 'host' }],
    ['tap.delete', { name: 'bgtap0', force: true }],
    ['tap.list', { prefix: 'eth' }],
    ['bridge.ensure', { name: 'banger0', cidr: '172.30.0.1/24', nat: false, iface: 'eth0' }],
    ['vmdir.chown', { path: '/x', uid: 1, gid: 1, recursive: true }],
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
    const args = JSON.parse('{"name":"bgtap0","uid":1,"__proto__":{"polluted":true}}');
    await refused(() => parseArgs('tap.create', args), 'invalid_params', /unknown field "__proto__"/);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });
});

describe('paths', () => {
  it('refuses relative and dot-dot paths before touching the disk', async () => {
    await refused(validateRequest('vmdir.chown', { path: 'vms/vm1', uid: 1, gid: 1 }, policy()), 'invalid_params', /path "vms\/vm1" is not an absolute path/);
    await refused(validateRequest('vmdir.chown', { path: '../etc', uid: 1, gid: 1 }, policy()), 'invalid_params', /contains a "\.\." segment/);
    await refused(
      validateRequest('vmdir.chown', { path: `${state}/vms/../../outside`, uid: 1, gid: 1 }, policy()),
      'invalid_params',
      /contains a "\.\." segment/,
    );
    await refused(validateRequest('vmdir.chown', { path: `${vmDir}\0`, uid: 1, gid: 1 }, policy()), 'invalid_params', /NUL byte/);
    await refused(validateRequest('vmdir.chown', { path: '', uid: 1, gid: 1 }, policy()), 'invalid_params', /must not be empty/);
  });

  it('refuses paths outside the state directory', async () => {
    await refused(validateRequest('vmdir.chown', { path: '/etc', uid: 1, gid: 1 }, policy()), 'invalid_params', /path "\/etc" is not inside the state directory/);
    await refused(validateRequest('vmdir.chown', { path: outside, uid: 1, gid: 1 }, policy()), 'invalid_params', /is not inside the state directory/);
    await refused(validateRequest('vmdir.chown', { path: state, uid: 1, gid: 1 }, policy()), 'invalid_params', /is not inside the state directory/);
  });

  it('follows symlinks: a link inside the state dir that points out is refused, and says where it leads', async () => {
    const e = await refused(
      validateRequest('vmdir.chown', { path: join(state, 'escape'), uid: 1, gid: 1 }, policy()),
      'invalid_params',
      /is not inside the state directory .* \(it resolves to .*outside\)/,
    );
    expect(e.message).toContain(outside);
    await refused(
      validateRequest(
        'firecracker.jail',
        { id: 'vm1', vmDir, binary: fcBinary, uid: 1000, gid: 1000, kernel: join(state, 'images/img/vmlinux'), rootDisk: join(vmDir, 'evil.ext4'), workDisk: join(vmDir, 'work.ext4') },
        policy(),
      ),
      'invalid_params',
      /rootDisk .*evil\.ext4" is not inside the state directory/,
    );
  });

  it('refuses missing paths and the wrong kind of file', async () => {
    await refused(validateRequest('vmdir.chown', { path: join(state, 'vms', 'nope'), uid: 1, gid: 1 }, policy()), 'invalid_params', /does not exist/);
    await refused(validateRequest('vmdir.chown', { path: join(vmDir, 'work.ext4'), uid: 1, gid: 1 }, policy()), 'invalid_params', /is not a directory/);
  });

  it('resolves a link that stays inside and returns the real path', async () => {
    const v = await validateRequest(
      'firecracker.jail',
      { id: 'vm1', vmDir, binary: fcBinary, uid: 1000, gid: 1000, kernel: join(state, 'images/img/vmlinux'), rootDisk: join(vmDir, 'rootfs.ext4'), workDisk: join(vmDir, 'alias.ext4') },
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
    uid: 1000,
    gid: 1000,
    kernel: join(state, 'images/img/vmlinux'),
    rootDisk: join(vmDir, 'rootfs.ext4'),
    workDisk: join(vmDir, 'work.ext4'),
  });
  it('never runs Firecracker as root', async () => {
    await refused(validateRequest('firecracker.jail', { ...base(), uid: 0 }, policy()), 'invalid_params', /uid must not be 0/);
    await refused(validateRequest('firecracker.jail', { ...base(), gid: 0 }, policy()), 'invalid_params', /gid must not be 0/);
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
  it.skipIf(!isRoot)('accepts a well-formed request (needs root: the binary must be root-owned)', async () => {
    const v = await validateRequest('firecracker.jail', base(), policy());
    expect(v.verb).toBe('firecracker.jail');
  });
  it('refuses a jailer chosen by the client', async () => {
    await refused(validateRequest('firecracker.jail', { ...base(), jailer: '/bin/sh' }, policy()), 'invalid_params', /unknown field "jailer"/);
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
