import { randomBytes } from 'node:crypto';
import { link, mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { run, type Runner } from '../../src/host/exec/runner.js';
import { RootHelperClient } from '../../src/roothelper/client.js';
import { chownTree, startRootHelper, type RootHelperOptions, type RootHelperServer } from '../../src/roothelper/server.js';
import { DAEMON_UNIT, HELPER_UNIT, daemonUnit, helperUnit, systemdQuote, writeUnits } from '../../src/roothelper/units.js';

const isRoot = process.getuid?.() === 0;
const inCi = process.env.CI === 'true';

let root: string;
let stateDir: string;
let n = 0;
const servers: RootHelperServer[] = [];
const clients: RootHelperClient[] = [];

/** A runner that records every command and refuses to run any (for the refusal tests). */
function recordingRunner(passThrough = false): { runner: Runner; calls: string[][] } {
  const calls: string[][] = [];
  const runner: Runner = async (file, args, opts) => {
    calls.push([file, ...args]);
    if (passThrough) return run(file, args, opts);
    return { exitCode: 0, stdout: '[]', stderr: '' };
  };
  return { runner, calls };
}

async function startPair(opts: Partial<RootHelperOptions> = {}) {
  const socketPath = join(root, `h${++n}.sock`);
  const logs: string[] = [];
  const server = await startRootHelper({ socketPath, stateDir, log: (l) => logs.push(l), ...opts });
  servers.push(server);
  const client = await RootHelperClient.connect(socketPath, { requestTimeoutMs: 10_000 });
  clients.push(client);
  return { server, client, logs, socketPath };
}

async function errorOf(p: Promise<unknown>): Promise<BangerError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(BangerError);
    return e as BangerError;
  }
  throw new Error('expected a rejection');
}

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'brh-'));
  stateDir = join(root, 'state');
  await mkdir(join(stateDir, 'vms', 'vm1'), { recursive: true });
  await mkdir(join(stateDir, 'images'), { recursive: true });
  await writeFile(join(stateDir, 'vms', 'vm1', 'rootfs.ext4'), '');
  await mkdir(join(stateDir, 'vms', 'vm1', 'sub'));
  await writeFile(join(stateDir, 'vms', 'vm1', 'sub', 'f'), '');
  await writeFile(join(root, 'outside-file'), '');
  await symlink(join(root, 'outside-file'), join(stateDir, 'vms', 'vm1', 'link-out'));
  await symlink(root, join(stateDir, 'vms', 'escape'));
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await s.close();
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('root helper over a Unix socket', () => {
  it('answers ping, with the socket at mode 0660', async () => {
    const { client, socketPath } = await startPair();
    const r = await client.request('ping', {});
    expect(r).toMatchObject({ version: 1, pid: process.pid });
    expect((await stat(socketPath)).mode & 0o777).toBe(0o660);
  });

  it('refuses hostile requests with a clear error, logs each one, and runs nothing', async () => {
    const { runner, calls } = recordingRunner();
    const mustNotRun = async (): Promise<never> => {
      throw new Error('must not run');
    };
    const ops = { jail: mustNotRun, unjail: mustNotRun, chownTree: mustNotRun };
    const { client, logs } = await startPair({ runner, ops });
    const hostile: Array<[string, unknown, string, RegExp]> = [
      ['exec', { cmd: 'id' }, 'method_not_found', /refused verb "exec": not one the root helper accepts/],
      ['tap.create', { name: 'eth0', uid: 1000 }, 'invalid_params', /refused tap\.create: name "eth0" is not a banger TAP name/],
      ['tap.create', { name: 'bgtap0;rm -rf /', uid: 1000 }, 'invalid_params', /is not a banger TAP name/],
      ['tap.create', { name: 'bgtap$(id)', uid: 1000 }, 'invalid_params', /is not a banger TAP name/],
      ['tap.create', { name: 'bgtap0123456789ab', uid: 1000 }, 'invalid_params', /is not a banger TAP name/],
      ['tap.create', { name: 'bgtap0', uid: -1 }, 'invalid_params', /uid must not be negative/],
      ['tap.create', { name: 'bgtap0', uid: 1.5 }, 'invalid_params', /uid must be an integer/],
      ['tap.create', { name: 'bgtap0', uid: '0' }, 'invalid_params', /uid must be an integer, got the string "0"/],
      ['tap.create', { name: 'bgtap0', uid: 1000, netns: '/proc/1/ns/net' }, 'invalid_params', /unknown field "netns"/],
      ['tap.delete', { name: 'eth0' }, 'invalid_params', /refused tap\.delete/],
      ['bridge.ensure', { name: 'banger0', cidr: '8.8.8.1/24', nat: true }, 'invalid_params', /not in a private range/],
      ['bridge.ensure', { name: 'docker0', cidr: '172.30.0.1/24', nat: false }, 'invalid_params', /not a banger bridge name/],
      ['firecracker.unjail', { id: '../../etc' }, 'invalid_params', /is not a Firecracker id/],
      ['vmdir.chown', { path: '/etc', uid: 1000, gid: 1000 }, 'invalid_params', /path "\/etc" is not inside the state directory/],
      ['vmdir.chown', { path: `${stateDir}/vms/../../`, uid: 1000, gid: 1000 }, 'invalid_params', /contains a "\.\." segment/],
      ['vmdir.chown', { path: join(stateDir, 'vms', 'escape'), uid: 1000, gid: 1000 }, 'invalid_params', /is not inside the state directory .*resolves to/],
      ['vmdir.chown', { path: join(stateDir, 'images'), uid: 1000, gid: 1000 }, 'invalid_params', /is not a VM directory/],
      ['firecracker.jail', { id: 'x', vmDir: join(stateDir, 'vms', 'vm1'), binary: '/bin/sh', uid: 0, gid: 0, kernel: '/boot/vmlinuz', rootDisk: '/etc/shadow', workDisk: '/etc/passwd' }, 'invalid_params', /uid must not be 0/],
    ];
    for (const [verb, args, kind, msg] of hostile) {
      const e = await errorOf(client.request(verb, args));
      expect(e.kind, `${verb} ${JSON.stringify(args)}`).toBe(kind);
      expect(e.message).toMatch(msg);
    }
    expect(calls).toEqual([]);
    expect(logs.filter((l) => l.includes('REFUSED'))).toHaveLength(hostile.length);
    expect(logs.filter((l) => / request id=/.test(l))).toHaveLength(hostile.length);
    for (const l of logs) expect(l.includes('\n')).toBe(false);
    // still serving after all that
    expect(await client.request('ping', {})).toMatchObject({ version: 1 });
  });

  it('answers a malformed line with a parse error (id null) and keeps serving', async () => {
    const { client, socketPath, logs } = await startPair();
    const { createConnection } = await import('node:net');
    const raw = createConnection({ path: socketPath });
    const answer = await new Promise<string>((res) => {
      raw.once('data', (d) => res(String(d)));
      raw.write('this is not json\n');
    });
    raw.destroy();
    expect(JSON.parse(answer)).toEqual({ id: null, ok: false, error: { kind: 'parse', message: expect.stringMatching(/^refused request: not JSON/) } });
    expect(logs.some((l) => l.includes('REFUSED id=null'))).toBe(true);
    expect(await client.request('ping', {})).toMatchObject({ version: 1 });
  });

  it('closes a connection that sends an endless line, rejecting what is pending', async () => {
    // The server may close the connection before it ever starts tap.list: then there is nothing to release.
    let release: (() => void) | undefined;
    const { client } = await startPair({ ops: { listTaps: () => new Promise((r) => (release = () => r({ taps: [] }))) } });
    const pending = client.request('tap.list', {});
    client.writeRaw('x'.repeat(70 * 1024));
    const e = await errorOf(pending);
    expect(e.message).toMatch(/root helper tap\.list: the connection closed before an answer/);
    await client.closed;
    expect(client.isOpen).toBe(false);
    release?.();
    expect((await errorOf(client.request('ping', {}))).message).toMatch(/connection is closed/);
  });

  it('times out one request without disturbing the others, and rejects pending requests when the server goes away', async () => {
    const { client, server } = await startPair({ ops: { listTaps: () => new Promise(() => {}) } });
    const e = await errorOf(client.request('tap.list', {}, { timeoutMs: 200 }));
    expect(e.kind).toBe('timeout');
    expect(e.message).toMatch(/root helper tap\.list: no answer within 200 ms/);
    // host operations are serialized: ping does not queue behind them
    expect(await client.request('ping', {}, { timeoutMs: 2000 })).toMatchObject({ version: 1 });
    const pending = errorOf(client.request('tap.list', {}, { timeoutMs: 60_000 }));
    await server.close();
    servers.splice(servers.indexOf(server), 1);
    expect((await pending).message).toMatch(/connection closed before an answer/);
  });

  it('aborts a request by signal', async () => {
    const { client } = await startPair({ ops: { listTaps: () => new Promise(() => {}) } });
    const ac = new AbortController();
    const p = client.request('tap.list', {}, { signal: ac.signal });
    ac.abort();
    expect((await errorOf(p)).kind).toBe('aborted');
  });

  it('says how to fix an unreachable helper', async () => {
    const e = await errorOf(RootHelperClient.connect(join(root, 'nobody.sock')));
    expect(e.message).toMatch(/cannot reach the root helper at .*nobody\.sock \(ENOENT\)/);
    expect(e.hint).toMatch(/systemctl start banger-roothelper/);
  });

  it('refuses to start on a socket another helper serves, and replaces a stale one', async () => {
    const { socketPath } = await startPair();
    await expect(startRootHelper({ socketPath, stateDir, log: () => {} })).rejects.toThrow(/another root helper is already listening/);
    const notSocket = join(root, 'plain-file.sock');
    await writeFile(notSocket, '');
    await expect(startRootHelper({ socketPath: notSocket, stateDir, log: () => {} })).rejects.toThrow(/exists and is not a socket/);
    // a socket file left by a crash (a process that listened on it and was killed, so never unlinked) is replaced
    const stale = join(root, 'stale.sock');
    const crashed = await execa(process.execPath, ['-e', 'require("net").createServer().listen(process.argv[1], () => process.kill(process.pid, "SIGKILL"))', stale], { reject: false, timeout: 20_000 });
    expect(crashed.signal, 'the listener should die of SIGKILL, leaving its socket file').toBe('SIGKILL');
    expect((await stat(stale)).isSocket()).toBe(true);
    const s = await startRootHelper({ socketPath: stale, stateDir, log: () => {} });
    servers.push(s);
    const c = await RootHelperClient.connect(stale);
    clients.push(c);
    expect(await c.request('ping', {})).toMatchObject({ version: 1 });
  });

  it.skipIf(!isRoot)('chowns a VM directory tree without following links, and owns its socket by group', async () => {
    const { client, socketPath } = await startPair({ group: '4321' });
    expect((await stat(socketPath)).gid).toBe(4321);
    const vm = join(stateDir, 'vms', 'vm1');
    const r = await client.request('vmdir.chown', { path: vm, uid: 1234, gid: 1235 });
    expect(r).toEqual({ path: vm, changed: 5 });
    for (const p of [vm, join(vm, 'rootfs.ext4'), join(vm, 'sub', 'f')]) {
      const st = await stat(p);
      expect([st.uid, st.gid]).toEqual([1234, 1235]);
    }
    // the link was lchown'd; its target outside the state dir was not touched
    expect((await stat(join(root, 'outside-file'))).uid).toBe(0);
  });

  it.skipIf(!isRoot)('chownTree resists a tree that moves under it', async () => {
    const vm = join(stateDir, 'vms', 'vm2');
    await mkdir(vm, { recursive: true });
    // a hard link to a root-owned file outside (what protected_hardlinks normally forbids a user) is left alone
    const secret = join(root, 'secret');
    await writeFile(secret, 's');
    await link(secret, join(vm, 'hardlinked'));
    expect(await chownTree(vm, 1234, 1234)).toEqual({ path: vm, changed: 1, skipped: [join(vm, 'hardlinked')] });
    expect((await stat(secret)).uid).toBe(0);
    // the path itself swapped for a symlink after validation: refused, nothing changed
    const swapped = join(stateDir, 'vms', 'vm3');
    await symlink(root, swapped);
    await expect(chownTree(swapped, 1234, 1234)).rejects.toThrow(/cannot be opened as a directory without following links \((ELOOP|ENOTDIR)\)/);
    // an ancestor swapped for a symlink: the opened directory is not the validated path
    await expect(chownTree(join(stateDir, 'vms', 'escape', 'state'), 1234, 1234)).rejects.toThrow(/changed while it was being checked \(it is now .*\/state\)/);
    expect((await stat(root)).uid).toBe(0);
  });
});

describe.skipIf(!isRoot && !inCi)('root helper doing real network work in a private namespace', () => {
  const ns = `bgrh-${process.pid}-${randomBytes(3).toString('hex')}`;

  beforeAll(async () => {
    if (!isRoot) throw new Error('CI=true but not running as root: the root helper network test needs root');
    await run('ip', ['netns', 'add', ns]);
  });
  afterAll(async () => {
    if (isRoot) await run('ip', ['netns', 'del', ns], { reject: false });
  });

  it('creates the bridge and a TAP owned by a uid, lists and deletes it', async () => {
    const { runner, calls } = recordingRunner(true);
    const { client, logs } = await startPair({ netns: ns, runner });
    expect(await client.request('bridge.ensure', { name: 'banger0', cidr: '172.31.99.1/24', nat: false })).toEqual({
      name: 'banger0',
      created: true,
      addressAdded: true,
    });
    expect(await client.request('tap.create', { name: 'bgtaprh1', uid: 1000 })).toEqual({ name: 'bgtaprh1', created: true });
    expect(await client.request('tap.create', { name: 'bgtaprh1', uid: 1000 })).toEqual({ name: 'bgtaprh1', created: false });
    const links = JSON.parse((await run('ip', ['-n', ns, '-j', 'link', 'show', 'dev', 'bgtaprh1'])).stdout) as Array<{ master?: string; flags: string[] }>;
    expect(links[0].master).toBe('banger0');
    expect(links[0].flags).toContain('UP');
    const list = await client.request('tap.list', {});
    expect(list.taps.map((t) => t.name)).toEqual(['bgtaprh1']);
    expect(await client.request('tap.delete', { name: 'bgtaprh1' })).toEqual({ name: 'bgtaprh1', deleted: true });
    expect((await client.request('tap.list', {})).taps).toEqual([]);
    // every command ran inside the namespace
    for (const c of calls) expect(c.slice(0, 4).join(' ')).toMatch(new RegExp(`^ip (-n ${ns}|netns exec ${ns})`));
    expect(logs.filter((l) => l.includes(' ok id='))).toHaveLength(6);
    // and the host has no such devices
    const host = (JSON.parse((await run('ip', ['-j', 'link', 'show'])).stdout) as Array<{ ifname: string }>).map((l) => l.ifname);
    expect(host).not.toContain('bgtaprh1');
  });
});

describe('systemd units', () => {
  const o = { nodePath: '/usr/bin/node', projectDir: '/opt/banger', stateDir: '/home/ann/.local/share/banger', group: 'banger' };

  it('runs the helper as a root system unit with the validated arguments', () => {
    const u = helperUnit(o);
    expect(u).toContain(
      'ExecStart=/usr/bin/node /opt/banger/dist/roothelper/main.js --socket /run/banger-roothelper/helper.sock --state-dir /home/ann/.local/share/banger --group banger',
    );
    expect(u).toContain('RuntimeDirectory=banger-roothelper');
    expect(u).toContain('KillMode=process');
    expect(u).toContain('WantedBy=multi-user.target');
    expect(u).not.toMatch(/^User=/m);
  });

  it('runs the daemon as a user unit that does not kill its VMs on restart', () => {
    const u = daemonUnit(o);
    expect(u).toContain('ExecStart=/usr/bin/node /opt/banger/bin/banger.js daemon start --foreground');
    expect(u).toContain('Environment=BANGER_HOME=/home/ann/.local/share/banger');
    expect(u).toContain('KillMode=process');
    expect(u).toContain('WantedBy=default.target');
  });

  it('quotes words for systemd and refuses control characters', () => {
    expect(systemdQuote('/a b/c')).toBe('"/a b/c"');
    expect(systemdQuote('50%')).toBe('50%%');
    expect(systemdQuote('$HOME')).toBe('"$$HOME"');
    expect(systemdQuote('a"b\\c')).toBe('"a\\"b\\\\c"');
    expect(() => systemdQuote('a\nExecStartPre=/bin/sh')).toThrow(/control character/);
    expect(() => helperUnit({ ...o, stateDir: 'relative' })).toThrow(/absolute path/);
  });

  it('writes both files', async () => {
    const dir = join(root, 'units');
    const r = await writeUnits(dir, o);
    expect(r).toEqual({ helper: join(dir, HELPER_UNIT), daemon: join(dir, DAEMON_UNIT) });
    expect(await readFile(r.helper, 'utf8')).toBe(helperUnit(o));
    expect(await readFile(r.daemon, 'utf8')).toBe(daemonUnit(o));
  });
});
