import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { run, type Runner } from '../../src/host/exec/runner.js';
import { RootHelperClient } from '../../src/roothelper/client.js';
import { ownerTag } from '../../src/host/net/tap-owner.js';
import { startRootHelper, type RootHelperOptions, type RootHelperServer } from '../../src/roothelper/server.js';
import { DAEMON_UNIT, HELPER_UNIT, daemonUnit, helperUnit, systemdQuote, writeUnits } from '../../src/roothelper/units.js';

const isRoot = process.getuid?.() === 0;
const inCi = process.env.CI === 'true';
/** The sockets' owner: whoever runs the test (only root may serve another uid a socket). */
const me = { uid: process.getuid!(), gid: process.getgid!() };
/** The TAP name prefix the helper accepts from `me` with the test's state dir. */
const myTap = (rest: string) => `bgtap${ownerTag(me.uid, stateDir)}${rest}`;

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
  const server = await startRootHelper({ socketPath, stateDir, owner: me, log: (l) => logs.push(l), ...opts });
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
  it('answers ping with the owner it serves, the socket at mode 0600 and owned by that owner', async () => {
    const { client, socketPath } = await startPair();
    const r = await client.request('ping', {});
    expect(r).toMatchObject({ version: 2, pid: process.pid, owner: { uid: me.uid, tag: ownerTag(me.uid, stateDir) } });
    const st = await stat(socketPath);
    expect(st.mode & 0o777).toBe(0o600);
    expect(st.uid).toBe(me.uid);
  });

  it('refuses hostile requests with a clear error, logs each one, and runs nothing', async () => {
    const { runner, calls } = recordingRunner();
    const mustNotRun = async (): Promise<never> => {
      throw new Error('must not run');
    };
    const ops = { jail: mustNotRun, unjail: mustNotRun };
    const { client, logs } = await startPair({ runner, ops });
    const hostile: Array<[string, unknown, string, RegExp]> = [
      ['exec', { cmd: 'id' }, 'method_not_found', /refused verb "exec": not one the root helper accepts/],
      ['tap.create', { name: 'eth0' }, 'invalid_params', /refused tap\.create: name "eth0" is not a banger TAP name/],
      ['tap.create', { name: 'bgtap0;rm -rf /' }, 'invalid_params', /is not a banger TAP name/],
      ['tap.create', { name: 'bgtap$(id)' }, 'invalid_params', /is not a banger TAP name/],
      ['tap.create', { name: 'bgtap0123456789ab' }, 'invalid_params', /is not a banger TAP name/],
      // no request names a user: the caller is the socket's owner
      ['tap.create', { name: myTap('a'), uid: 0 }, 'invalid_params', /unknown field "uid"/],
      ['tap.create', { name: myTap('a'), gid: 0, bridge: 'banger0' }, 'invalid_params', /unknown fields "gid", "bridge"/],
      ['tap.create', { name: myTap('a'), netns: '/proc/1/ns/net' }, 'invalid_params', /unknown field "netns"/],
      // a TAP name without this owner's tag is someone else's
      ['tap.create', { name: 'bgtap0' }, 'invalid_params', /refused tap\.create: TAP "bgtap0" is not this owner's/],
      ['tap.delete', { name: 'bgtap0' }, 'invalid_params', /refused tap\.delete: TAP "bgtap0" is not this owner's/],
      ['tap.delete', { name: 'eth0' }, 'invalid_params', /refused tap\.delete/],
      // the bridge, its CIDR and NAT are the helper's config
      ['bridge.ensure', { name: 'banger0', cidr: '8.8.8.1/24', nat: true }, 'invalid_params', /unknown fields "name", "cidr", "nat"/],
      ['firecracker.unjail', { id: '../../etc' }, 'invalid_params', /is not a Firecracker id/],
      ['firecracker.jail', { id: 'x', vmDir: join(stateDir, 'vms', 'vm1'), binary: '/bin/sh', uid: 0, gid: 0, kernel: '/boot/vmlinuz', rootDisk: '/etc/shadow', workDisk: '/etc/passwd' }, 'invalid_params', /unknown fields "uid", "gid"/],
      ['firecracker.jail', { id: 'x', vmDir: '/etc', binary: '/bin/sh', kernel: '/boot/vmlinuz', rootDisk: '/etc/shadow', workDisk: '/etc/passwd' }, 'invalid_params', /is not inside the state directory/],
      // a verb without callers is gone
      ['vmdir.chown', { path: join(stateDir, 'vms', 'vm1'), uid: 1000, gid: 1000 }, 'method_not_found', /refused verb "vmdir\.chown"/],
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
    expect(await client.request('ping', {})).toMatchObject({ version: 2 });
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
    expect(await client.request('ping', {})).toMatchObject({ version: 2 });
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
    expect(await client.request('ping', {}, { timeoutMs: 2000 })).toMatchObject({ version: 2 });
    const pending = errorOf(client.request('tap.list', {}, { timeoutMs: 60_000 }));
    await server.close();
    servers.splice(servers.indexOf(server), 1);
    expect((await pending).message).toMatch(/connection closed before an answer/);
  });

  it('a timeout aborts the work, and the next change waits until it has really stopped', async () => {
    const events: string[] = [];
    const tap = myTap('t1');
    const { client } = await startPair({
      opTimeoutMs: 200,
      ops: {
        // stops 300 ms after its abort, as a command being killed does
        createTap: (_caller, name, signal) =>
          new Promise((res) => {
            events.push(`start ${name}`);
            signal!.addEventListener('abort', () => {
              events.push(`aborted ${name}`);
              setTimeout(() => {
                events.push(`stopped ${name}`);
                res({ name, created: false });
              }, 300);
            });
          }),
        deleteTap: async (_caller, name) => {
          events.push(`delete ${name}`);
          return { name, deleted: true };
        },
      },
    });
    const e = await errorOf(client.request('tap.create', { name: tap }));
    expect(e.kind).toBe('timeout');
    expect(e.message).toMatch(/tap\.create did not finish within 200 ms; it was aborted/);
    expect(await client.request('tap.delete', { name: tap })).toEqual({ name: tap, deleted: true });
    expect(events).toEqual([`start ${tap}`, `aborted ${tap}`, `stopped ${tap}`, `delete ${tap}`]);
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
    await expect(startRootHelper({ socketPath, stateDir, owner: me, log: () => {} })).rejects.toThrow(/another root helper is already listening/);
    const notSocket = join(root, 'plain-file.sock');
    await writeFile(notSocket, '');
    await expect(startRootHelper({ socketPath: notSocket, stateDir, owner: me, log: () => {} })).rejects.toThrow(/exists and is not a socket/);
    // a socket file left by a crash (a process that listened on it and was killed, so never unlinked) is replaced
    const stale = join(root, 'stale.sock');
    const crashed = await execa(process.execPath, ['-e', 'require("net").createServer().listen(process.argv[1], () => process.kill(process.pid, "SIGKILL"))', stale], { reject: false, timeout: 20_000 });
    expect(crashed.signal, 'the listener should die of SIGKILL, leaving its socket file').toBe('SIGKILL');
    expect((await stat(stale)).isSocket()).toBe(true);
    const s = await startRootHelper({ socketPath: stale, stateDir, owner: me, log: () => {} });
    servers.push(s);
    const c = await RootHelperClient.connect(stale);
    clients.push(c);
    expect(await c.request('ping', {})).toMatchObject({ version: 2 });
  });

  it.skipIf(!isRoot)('serves another owner on a socket that owner owns, mode 0600 (needs root)', async () => {
    const { socketPath, client } = await startPair({ owner: { uid: 4321, gid: 4322 } });
    const st = await stat(socketPath);
    expect([st.uid, st.mode & 0o777]).toEqual([4321, 0o600]);
    expect(await client.request('ping', {})).toMatchObject({ owner: { uid: 4321, tag: ownerTag(4321, stateDir) } });
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
    const { client, logs } = await startPair({ netns: ns, runner, network: { cidr: '172.31.99.1/24' } });
    expect(await client.request('bridge.ensure', {})).toEqual({
      name: 'banger0',
      cidr: '172.31.99.1/24',
      created: true,
      addressAdded: true,
    });
    const tap = myTap('rh1');
    expect(await client.request('tap.create', { name: tap })).toEqual({ name: tap, created: true });
    expect(await client.request('tap.create', { name: tap })).toEqual({ name: tap, created: false });
    const links = JSON.parse((await run('ip', ['-n', ns, '-j', 'link', 'show', 'dev', tap])).stdout) as Array<{ master?: string; flags: string[] }>;
    expect(links[0].master).toBe('banger0');
    expect(links[0].flags).toContain('UP');
    // made for a root owner: no user at all (-1), so only CAP_NET_ADMIN may attach; never "owned by uid 0"
    expect((await run('ip', ['netns', 'exec', ns, 'cat', `/sys/class/net/${tap}/owner`])).stdout.trim()).toBe('-1');
    const list = await client.request('tap.list', {});
    expect(list.taps.map((t) => t.name)).toEqual([tap]);
    expect(await client.request('tap.delete', { name: tap })).toEqual({ name: tap, deleted: true });
    expect((await client.request('tap.list', {})).taps).toEqual([]);
    // every command ran inside the namespace
    for (const c of calls) expect(c.slice(0, 4).join(' ')).toMatch(new RegExp(`^ip (-n ${ns}|netns exec ${ns})`));
    expect(logs.filter((l) => l.includes(' ok id='))).toHaveLength(6);
    // and the host has no such devices
    const host = (JSON.parse((await run('ip', ['-j', 'link', 'show'])).stdout) as Array<{ ifname: string }>).map((l) => l.ifname);
    expect(host).not.toContain(tap);
  });
});

describe('systemd units', () => {
  const o = { nodePath: '/usr/bin/node', projectDir: '/opt/banger', stateDir: '/home/ann/.local/share/banger', helperConfig: '/usr/local/lib/banger/roothelper.json' };

  it('runs the helper as a root system unit with the validated arguments', () => {
    const u = helperUnit(o);
    expect(u).toContain(
      'ExecStart=/usr/bin/node /opt/banger/dist/roothelper/main.js --config /usr/local/lib/banger/roothelper.json',
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
    expect(() => helperUnit({ ...o, helperConfig: 'relative' })).toThrow(/absolute path/);
  });

  it('writes both files', async () => {
    const dir = join(root, 'units');
    const r = await writeUnits(dir, o);
    expect(r).toEqual({ helper: join(dir, HELPER_UNIT), daemon: join(dir, DAEMON_UNIT) });
    expect(await readFile(r.helper, 'utf8')).toBe(helperUnit(o));
    expect(await readFile(r.daemon, 'utf8')).toBe(daemonUnit(o));
  });
});
