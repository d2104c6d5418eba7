/**
 * The root helper knows its caller: two unprivileged users made for this test, each served on a socket of its
 * own, in a network namespace of the test's. The first owner gets a TAP, the bridge and a jail (a stand-in
 * jailer that sleeps); then the second user, as a real process with its own uid, cannot connect to the first
 * owner's socket at all, and every verb it sends on its own socket against the first owner's objects is
 * refused, with nothing of the first owner's changed.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from '../../src/host/exec/runner.js';
import { launchJailed } from '../../src/host/vmm/firecracker/jailer.js';
import { ownerTag } from '../../src/host/net/tap-owner.js';
import { RootHelperClient } from '../../src/roothelper/client.js';
import { VERBS, type Verb } from '../../src/roothelper/protocol.js';
import { startRootHelper, type RootHelperServer } from '../../src/roothelper/server.js';

const isRoot = process.getuid?.() === 0;
const inCi = process.env.CI === 'true';

interface TestUser {
  name: string;
  uid: number;
  gid: number;
  stateDir: string;
  socket: string;
}

const suffix = `${process.pid.toString(36)}${randomBytes(2).toString('hex')}`;
const ns = `bgown-${suffix}`;
const made: string[] = [];
const servers: RootHelperServer[] = [];
let root: string;
let a: TestUser;
let b: TestUser;
let clientA: RootHelperClient;
let jailedPid: number | undefined;

async function makeUser(tag: string): Promise<TestUser> {
  const name = `bgt${tag}${suffix}`.slice(0, 31);
  await run('useradd', ['--no-create-home', '--user-group', '--shell', '/usr/sbin/nologin', name]);
  made.push(name);
  const uid = Number((await run('id', ['-u', name])).stdout.trim());
  const gid = Number((await run('id', ['-g', name])).stdout.trim());
  const stateDir = join(root, `${tag}-state`);
  await mkdir(join(stateDir, 'vms', 'vm1'), { recursive: true });
  for (const f of ['vmlinux', 'vms/vm1/rootfs.ext4', 'vms/vm1/work.ext4']) await writeFile(join(stateDir, f), '');
  await run('chown', ['-R', `${uid}:${gid}`, stateDir]);
  return { name, uid, gid, stateDir, socket: join(root, `${tag}.sock`) };
}

async function serve(u: TestUser): Promise<RootHelperServer> {
  const s = await startRootHelper({
    socketPath: u.socket,
    stateDir: u.stateDir,
    owner: { uid: u.uid, gid: u.gid },
    network: { bridge: 'banger0', cidr: '172.31.97.1/24', nat: false },
    netns: ns,
    jailer: { jailerBin: join(root, 'bin', 'jailer'), chrootBase: join(root, 'jail') },
    log: () => {},
  });
  servers.push(s);
  return s;
}

/** Plain JS run as `u` (its own uid and gid): try the other socket, then send `requests` on its own; print what came back. */
const AS_USER_SCRIPT = `
const net = require('net');
const [otherSock, ownSock, reqsJson] = process.argv.slice(1);
const out = {};
const reqs = JSON.parse(reqsJson);
const done = () => { process.stdout.write(JSON.stringify(out)); process.exit(0); };
const other = net.createConnection(otherSock);
other.on('connect', () => { out.other = 'connected'; other.destroy(); own(); });
other.on('error', (e) => { out.other = e.code; own(); });
function own() {
  const s = net.createConnection(ownSock);
  let buf = '';
  out.answers = [];
  s.on('connect', () => { for (const r of reqs) s.write(JSON.stringify(r) + '\\n'); });
  s.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\\n')) >= 0) { out.answers.push(JSON.parse(buf.slice(0, i))); buf = buf.slice(i + 1); }
    if (out.answers.length === reqs.length) done();
  });
  s.on('error', (e) => { out.own = e.code; done(); });
}
`;

interface Answer {
  id: number;
  ok: boolean;
  result?: Record<string, unknown>;
  error?: { kind: string; message: string };
}

function runAs(u: TestUser, otherSocket: string, requests: Array<{ id: number; verb: string; args: unknown }>): Promise<{ other: string; own?: string; answers: Answer[] }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', AS_USER_SCRIPT, otherSocket, u.socket, JSON.stringify(requests)], {
      uid: u.uid,
      gid: u.gid,
      cwd: root,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: root },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      if (code !== 0) return reject(new Error(`the script as ${u.name} exited ${code}: ${stderr}`));
      resolve(JSON.parse(stdout));
    });
  });
}

const tapOf = (u: TestUser, rest: string) => `bgtap${ownerTag(u.uid, u.stateDir)}${rest}`;
const kernelOwner = async (tap: string) => (await run('ip', ['netns', 'exec', ns, 'cat', `/sys/class/net/${tap}/owner`])).stdout.trim();

describe.skipIf(!isRoot && !inCi)('the root helper, as a second unprivileged user', () => {
  beforeAll(async () => {
    if (!isRoot) throw new Error('CI=true but not running as root: this test creates users and a network namespace');
    // In the machine's temp directory, not this file's own TMPDIR (mode 0700): the users must reach their sockets.
    root = await mkdtemp(join(process.env.BANGER_TEST_TMP_BASE ?? tmpdir(), 'brhown-'));
    await chmod(root, 0o755); // both users reach their sockets through it
    await mkdir(join(root, 'bin'), { mode: 0o755 });
    await mkdir(join(root, 'jail'), { mode: 0o755 });
    // a stand-in jailer (the real one is not on this host) and a root-owned "firecracker" it is handed
    await writeFile(join(root, 'bin', 'jailer'), '#!/bin/sh\nexec sleep 120\n', { mode: 0o755 });
    await writeFile(join(root, 'bin', 'firecracker'), '#!/bin/sh\n', { mode: 0o755 });
    await run('ip', ['netns', 'add', ns]);
    a = await makeUser('a');
    b = await makeUser('b');
    await serve(a);
    await serve(b);
    clientA = await RootHelperClient.connect(a.socket);
  }, 60_000);

  afterAll(async () => {
    clientA?.close();
    if (jailedPid) {
      try {
        process.kill(jailedPid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    for (const s of servers.splice(0)) await s.close();
    if (isRoot) {
      await run('ip', ['netns', 'del', ns], { reject: false });
      for (const name of made.splice(0)) await run('userdel', [name], { reject: false });
    }
    if (root) await rm(root, { recursive: true, force: true });
  });

  it('serves each owner on a socket only that owner may open', async () => {
    for (const u of [a, b]) {
      const st = await stat(u.socket);
      expect([st.uid, st.mode & 0o777], u.name).toEqual([u.uid, 0o600]);
    }
    expect(await clientA.request('ping', {})).toMatchObject({ owner: { uid: a.uid, tag: ownerTag(a.uid, a.stateDir) } });
  });

  it('refuses every verb on the first owner\'s objects, and the first owner\'s socket cannot even be opened', async () => {
    // The first owner's objects: the bridge, a TAP (the kernel records uid a), a jail recorded with owner a.
    await clientA.request('bridge.ensure', {});
    const tapA = tapOf(a, 'x1');
    expect(await clientA.request('tap.create', { name: tapA })).toEqual({ name: tapA, created: true });
    expect(await kernelOwner(tapA)).toBe(String(a.uid));
    const vmA = join(a.stateDir, 'vms', 'vm1');
    const jailArgs = { id: 'vm-a1', vmDir: vmA, binary: join(root, 'bin', 'firecracker'), kernel: join(a.stateDir, 'vmlinux'), rootDisk: join(vmA, 'rootfs.ext4'), workDisk: join(vmA, 'work.ext4') };
    const jail = (await clientA.request('firecracker.jail', jailArgs)) as { pid: number; chrootDir: string };
    jailedPid = jail.pid;
    const jailDir = join(root, 'jail', 'firecracker', 'vm-a1');
    expect((await stat(join(jail.chrootDir, 'rootfs.ext4'))).uid).toBe(a.uid);
    // A device that carries the second user's tag but that the kernel records as the first owner's.
    const disguised = tapOf(b, 'zz');
    await run('ip', ['-n', ns, 'tuntap', 'add', 'dev', disguised, 'mode', 'tap', 'user', String(a.uid)]);

    const requests: Array<{ id: number; verb: Verb; args: Record<string, unknown>; refused?: RegExp }> = [
      { id: 1, verb: 'ping', args: {} },
      { id: 2, verb: 'tap.list', args: {} },
      { id: 3, verb: 'tap.delete', args: { name: tapA }, refused: /TAP ".*" is not this owner's/ },
      { id: 4, verb: 'tap.create', args: { name: tapA }, refused: /TAP ".*" is not this owner's/ },
      { id: 5, verb: 'tap.create', args: { name: tapA, uid: a.uid }, refused: /unknown field "uid"/ },
      { id: 6, verb: 'tap.delete', args: { name: disguised }, refused: new RegExp(`belongs to uid ${a.uid}, not to this socket's owner \\(uid ${b.uid}\\)`) },
      { id: 7, verb: 'firecracker.unjail', args: { id: 'vm-a1' }, refused: /not recorded as this owner's/ },
      { id: 8, verb: 'firecracker.jail', args: jailArgs, refused: /vmDir ".*" is not inside the state directory/ },
      { id: 9, verb: 'firecracker.jail', args: { ...jailArgs, uid: a.uid, gid: a.gid }, refused: /unknown fields "uid", "gid"/ },
      { id: 10, verb: 'bridge.ensure', args: { name: 'banger0', cidr: '10.0.0.1/16', nat: true }, refused: /unknown fields "name", "cidr", "nat"/ },
      { id: 11, verb: 'firewall.set', args: { tap: tapA, ip: '172.30.0.2', mac: '02:00:00:00:00:01', egress: 'internet', allowPeers: true, allow: [] }, refused: /TAP ".*" is not this owner's/ },
      { id: 12, verb: 'firewall.clear', args: { tap: tapA }, refused: /TAP ".*" is not this owner's/ },
      { id: 13, verb: 'firewall.status', args: {} },
    ];
    expect(new Set(requests.map((r) => r.verb))).toEqual(new Set(VERBS));
    const seen = await runAs(b, a.socket, requests.map(({ id, verb, args }) => ({ id, verb, args })));

    expect(seen.other, 'the second user connecting to the first owner\'s socket').toBe('EACCES');
    expect(seen.own).toBeUndefined();
    const byId = new Map(seen.answers.map((x) => [x.id, x]));
    for (const r of requests.filter((x) => x.refused)) {
      const ans = byId.get(r.id)!;
      expect(ans.ok, `${r.verb} ${JSON.stringify(r.args)}`).toBe(false);
      expect(ans.error!.message).toMatch(r.refused!);
    }
    // what it may ask about is its own: it is the second user, and sees none of the first owner's TAPs
    expect(byId.get(1)).toMatchObject({ ok: true, result: { owner: { uid: b.uid } } });
    expect(byId.get(2)).toEqual({ id: 2, ok: true, result: { taps: [] } });
    expect(byId.get(13)).toMatchObject({ ok: true, result: { vms: [] } });

    // Nothing of the first owner's changed.
    expect(await kernelOwner(tapA)).toBe(String(a.uid));
    expect(await kernelOwner(disguised)).toBe(String(a.uid));
    expect((await stat(jailDir)).isDirectory()).toBe(true);
    expect(() => process.kill(jail.pid, 0)).not.toThrow();
    expect((await clientA.request('tap.list', {})).taps.map((t) => t.name)).toEqual([tapA]);

    // The first owner can remove its own: the same verbs succeed on the right socket.
    process.kill(jail.pid, 'SIGKILL');
    jailedPid = undefined;
    await expect(clientA.request('firecracker.jail', jailArgs)).rejects.toThrow(/refused to jail vm-a1: it is already jailed/);
    expect(await clientA.request('firecracker.unjail', { id: 'vm-a1' })).toEqual({ removed: [jailDir] });
    expect(await clientA.request('tap.delete', { name: tapA })).toEqual({ name: tapA, deleted: true });
  }, 60_000);

  it('a jail aborted part-way leaves nothing behind, and a jail is never for root', async () => {
    const vmA = join(a.stateDir, 'vms', 'vm1');
    const req = { id: 'vm-a2', vmDir: vmA, binary: join(root, 'bin', 'firecracker'), uid: a.uid, gid: a.gid, kernel: join(a.stateDir, 'vmlinux'), rootDisk: join(vmA, 'rootfs.ext4'), workDisk: join(vmA, 'work.ext4') };
    const cfg = { jailerBin: join(root, 'bin', 'jailer'), chrootBase: join(root, 'jail') };
    const ac = new AbortController();
    ac.abort(new Error('the deadline passed'));
    await expect(launchJailed(req, cfg, { signal: ac.signal })).rejects.toThrow(/jailing vm-a2: aborted \(the deadline passed\)/);
    expect(existsSync(join(root, 'jail', 'firecracker', 'vm-a2'))).toBe(false);
    await expect(launchJailed({ ...req, uid: 0 }, cfg)).rejects.toThrow(/refused to jail Firecracker as root/);
  });
});
