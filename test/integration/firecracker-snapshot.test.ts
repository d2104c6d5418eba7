/**
 * The VM actor's snapshot steps for Firecracker, against the strict fake (test/support/fake-firecracker.ts) run as
 * the `firecracker` executable: `vm snapshot`'s save, then `vm fork`'s disks and loads. Every request must be one
 * Firecracker accepts; the fake records which files each load opened, which is how a fork is shown to run on its
 * own disks. What only a real guest shows (the fork's SSH) is the e2e tests' part, and they run on QEMU.
 */
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createActor, type AnyActorLogic } from 'xstate';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { StepEnv } from '../../src/actors/vm-steps.js';
import { makeSteps } from '../../src/actors/steps.js';
import { vmFiles } from '../../src/actors/vm-files.js';
import { loadFirecrackerFork } from '../../src/actors/snapshot-steps-firecracker.js';
import type { VmContext } from '../../src/machines/vm.machine.js';
import { Files, layout as makeLayout, type Layout } from '../../src/paths.js';
import { openDb } from '../../src/store/db.js';
import { Store } from '../../src/store/repo.js';
import { SnapshotRepo, snapshotDir } from '../../src/store/snapshots.js';
import { createFirecrackerDriver, type FirecrackerProcess } from '../../src/host/vmm/firecracker/firecracker.js';
import { run } from '../../src/host/exec/runner.js';
import { generateHostKey } from '../../src/host/guest/keys.js';
import { writeIdentityDisk } from '../../src/host/disk/identity-disk.js';
import { AGENT_SCRIPT, AGENT_VSOCK_PORT } from '../../src/host/image/agent.js';
import { macForVm } from '../../src/host/net/net.js';
import { vmInput } from '../support/vm-fixtures.js';
import { makeFakeFirecracker, readRecord } from '../support/fake-firecracker-cli.js';

const SLOW = 90_000;
const IMAGE = 'debian-bookworm';

let root: string;
let l: Layout;
let env: StepEnv;
let record: string;
let refreshed: string;
let logs: string[];
const launched: FirecrackerProcess[] = [];
const driver = () => env.driver('firecracker');

/** A step of the VM machine run as an actor, to its end: its output, or the error it failed with. */
function runStep<T>(logic: AnyActorLogic, ctx: VmContext): Promise<{ output?: T; error?: Error }> {
  const actor = createActor(logic, { input: { ctx } });
  const out = new Promise<{ output?: T; error?: Error }>((res) => actor.subscribe({ complete: () => res({ output: actor.getSnapshot().output as T }), error: (e) => res({ error: e as Error }) }));
  actor.start();
  return out;
}

const leases = new Map<string, { tap: string; guestIp: string }>();

function context(id: string, name: string, over: Partial<VmContext['spec']> = {}): VmContext {
  const input = vmInput({ vmm: 'firecracker', accel: 'kvm', net: 'tap', image: IMAGE, ...over });
  return { ...input, id, name, runtime: null, net: null, error: null, stopReason: null, restartPending: false, bootDeadline: null, pendingSet: null };
}

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'bfs-')); // short: sockets live under it
  l = makeLayout({ BANGER_HOME: join(root, 'h'), BANGER_RUNTIME_DIR: join(root, 'r') });
  const image = l.imageDir(IMAGE);
  await mkdir(image, { recursive: true });
  for (const f of ['vmlinuz', 'vmlinux', 'rootfs.ext4', 'work-seed.ext4']) await writeFile(join(image, f), f);
  const manifest = { name: IMAGE, createdAt: '2026-12-01T00:00:00Z', builderVersion: 6, kernel: 'vmlinuz', vmlinux: 'vmlinux', rootfs: 'rootfs.ext4', workSeed: 'work-seed.ext4', packages: 0, sizeBytes: 0, files: {}, identity: 'disk' };
  await writeFile(join(image, Files.manifest), JSON.stringify(manifest));
  // The guest agent is the image's own script; what POST /identity runs in the guest is a stand-in that says it ran.
  refreshed = join(root, 'refreshed');
  const identityScript = join(root, 'banger-identity');
  await writeFile(identityScript, `#!/bin/sh\necho "$@" >> '${refreshed}'\n`, { mode: 0o755 });
  const agent = join(root, 'banger-agent');
  await writeFile(agent, AGENT_SCRIPT, { mode: 0o755 });
  const bin = await makeFakeFirecracker(join(root, 'bin'), { FAKE_FC_VERSION: '1.16.0', FAKE_FC_GUEST_AGENT: `${AGENT_VSOCK_PORT}:${agent}`, BANGER_IDENTITY_SCRIPT: identityScript });
  record = bin.record;
  const fc = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: 30_000 });
  const store = new Store(openDb(l.db));
  env = {
    layout: l,
    store,
    config: {} as StepEnv['config'],
    runner: run,
    userKey: async () => {
      const k = generateHostKey({ comment: 'user' });
      return { privateKey: Buffer.from(k.privateKey), publicKey: k.publicKey, privateKeyPath: '', publicKeyPath: '' };
    },
    driver: () => fc,
    network: {
      acquire: async (ctx) => ({ ...leases.get(ctx.id)!, gateway: '172.30.0.1', prefix: 24, dns: ['172.30.0.1'] }),
      release: async () => {},
    },
    ssh: {} as StepEnv['ssh'],
    log: (id, stage, status, _ms, msg) => logs.push(`${id} ${stage} ${status} ${msg ?? ''}`),
  };
});

afterEach(async () => {
  for (const p of launched.splice(0)) await driver().kill(p);
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A running Firecracker VM as a create would leave it: its raw disks, identity disk and host key, booted. */
async function runningSource(id: string): Promise<{ ctx: VmContext; proc: FirecrackerProcess }> {
  const ctx = context(id, 'src');
  leases.set(id, { tap: 'bgtap10', guestIp: '172.30.0.10' });
  ctx.net = leases.get(id)!;
  const f = vmFiles(l, id);
  await mkdir(f.dir, { recursive: true });
  await writeFile(f.rootDisk, 'source root, as saved');
  await writeFile(f.workDisk, 'source work, as saved');
  const hostKey = generateHostKey({ comment: id });
  await writeFile(f.hostKey, hostKey.privateKey);
  await writeFile(f.hostKeyPub, hostKey.publicKey + '\n');
  await writeIdentityDisk(f.identityDisk, { hostname: 'src', hostKey, network: { mode: 'static', address: '172.30.0.10/24', gateway: '172.30.0.1', dns: [], mac: macForVm(id) } });
  const image = l.imageDir(IMAGE);
  const proc = (await driver().launch(
    { id, vmDir: f.dir, runDir: l.run, kernel: join(image, 'vmlinux'), cmdline: 'console=ttyS0', rootDisk: f.rootDisk, workDisk: f.workDisk, identityDisk: f.identityDisk, vcpus: 1, memoryMiB: 256, accel: 'kvm', net: { mode: 'tap', tap: 'bgtap10', mac: macForVm(id) }, serialLog: f.serialLog },
    {},
  )) as FirecrackerProcess;
  launched.push(proc);
  ctx.runtime = { pid: proc.pid, control: proc.apiSocket, guestIp: '172.30.0.10', tap: 'bgtap10', bootedAt: new Date().toISOString() };
  return { ctx, proc };
}

/** A running source VM, snapshotted through the actor step: the step must succeed. */
async function snapshotted(id: string, snapshotId: string, name: string, stop: boolean): Promise<VmContext> {
  const { ctx } = await runningSource(id);
  ctx.pendingSnapshot = { snapshotId, name, stop };
  const r = await runStep(makeSteps(env).takeSnapshot, ctx);
  expect(r.error, logs.join('\n')).toBeUndefined();
  return ctx;
}

describe('Firecracker snapshots through the VM actor steps (strict fake)', () => {
  it('vm snapshot saves state, memory and disk copies through drive links, then the VM runs on on its own drives', async () => {
    logs = [];
    const { ctx, proc } = await runningSource('fcsrc00001');
    const before = readRecord(record).length;
    ctx.pendingSnapshot = { snapshotId: 'snapfc0001', name: 'base', stop: false };
    const r = await runStep(makeSteps(env).takeSnapshot, ctx);
    expect(r.error, logs.join('\n')).toBeUndefined();

    const snap = new SnapshotRepo(env.store.db).get('snapfc0001')!;
    expect(snap.meta).toMatchObject({ vmm: 'firecracker', root: { file: 'root.img', format: 'raw' }, work: { file: 'work.img', format: 'raw' }, stateFile: 'state.bin', memFile: 'memory.bin', chain: [], identityDisk: true, builderVersion: 6, net: 'tap' });
    const dir = snapshotDir(l.home, snap.id);
    expect(await readFile(join(dir, 'root.img'), 'utf8')).toBe('source root, as saved');
    expect(await readFile(join(dir, 'work.img'), 'utf8')).toBe('source work, as saved');
    expect(snap.meta.stateBytes).toBeGreaterThan(0);
    const f = vmFiles(l, ctx.id);
    const reqs = readRecord(record).slice(before).filter((q) => q.method !== 'GET');
    expect(reqs.every((q) => q.status === 204), JSON.stringify(reqs)).toBe(true);
    expect(reqs.map((q) => `${q.method} ${q.path} ${(q.body as { path_on_host?: string; state?: string }).path_on_host ?? (q.body as { state?: string }).state ?? ''}`)).toEqual([
      `PATCH /drives/rootfs ${join(dir, 'drive-rootfs')}`,
      `PATCH /drives/work ${join(dir, 'drive-work')}`,
      `PATCH /drives/identity ${join(dir, 'drive-identity')}`,
      'PATCH /vm Paused',
      'PUT /snapshot/create ',
      'PATCH /vm Resumed',
      `PATCH /drives/rootfs ${f.rootDisk}`,
      `PATCH /drives/work ${f.workDisk}`,
      `PATCH /drives/identity ${f.identityDisk}`,
    ]);
    expect((await driver().status(proc)).state).toBe('running');
    expect(logs.some((x) => / snapshot\.save done \d+ bytes of state; redirect \d+ ms, save \d+ ms, disks \d+ ms, resume \d+ ms/.test(x)), logs.join('\n')).toBe(true);
  }, SLOW);

  it('a save that fails after the pause resumes the VM on its own drives, records nothing, and reports its own error', async () => {
    logs = [];
    const { ctx, proc } = await runningSource('fcsrc00004');
    const realRunner = env.runner;
    env.runner = async (cmd, args, opts) => {
      if (cmd === 'cp') throw new Error('cp: error writing: No space left on device');
      return realRunner(cmd, args, opts);
    };
    try {
      ctx.pendingSnapshot = { snapshotId: 'snapfc0004', name: 'full', stop: false };
      const r = await runStep(makeSteps(env).takeSnapshot, ctx);
      expect(r.error?.message).toMatch(/No space left on device/);
    } finally {
      env.runner = realRunner;
    }
    expect(new SnapshotRepo(env.store.db).get('snapfc0004')).toBeUndefined();
    expect((await driver().status(proc)).state).toBe('running');
    const f = vmFiles(l, ctx.id);
    const last = readRecord(record).filter((q) => q.method === 'PATCH' && q.path.startsWith('/drives/')).slice(-3);
    expect(last.map((q) => q.opened)).toEqual([{ rootfs: f.rootDisk }, { work: f.workDisk }, { identity: f.identityDisk }]);
    expect(last.map((q) => (q.body as { path_on_host: string }).path_on_host)).toEqual([f.rootDisk, f.workDisk, f.identityDisk]);
  }, SLOW);

  it('two forks restored at once each load onto their own disk copies, TAP and vsock socket, and take their own address', async () => {
    logs = [];
    const source = await snapshotted('fcsrc00002', 'snapfc0002', 'base2', false);
    await writeFile(vmFiles(l, source.id).rootDisk, 'source root, written after the snapshot');
    const dir = snapshotDir(l.home, 'snapfc0002');

    const forks = ['fcfork0001', 'fcfork0002'].map((id, i) => {
      leases.set(id, { tap: `bgtap${11 + i}`, guestIp: `172.30.0.${11 + i}` });
      return context(id, `base2-fork-${i + 1}`, { restore: { snapshotId: 'snapfc0002', chain: [] } });
    });
    for (const fork of forks) {
      const disks = await runStep<{ net: VmContext['net'] }>(makeSteps(env).prepareDisks, fork);
      expect(disks.error, logs.join('\n')).toBeUndefined();
      fork.net = disks.output!.net;
      const f = vmFiles(l, fork.id);
      expect(await readFile(f.rootDisk, 'utf8')).toBe('source root, as saved');
      expect(await readFile(f.hostKeyPub, 'utf8')).toBe(await readFile(join(dir, 'host_key.pub'), 'utf8'));
      expect(existsSync(f.identityDisk)).toBe(true);
    }

    const before = readRecord(record).length;
    const procs = await Promise.all(forks.map((fork) => loadFirecrackerFork(env, fork, vmFiles(l, fork.id), new SnapshotRepo(env.store.db).get('snapfc0002')!, dir, new AbortController().signal)));
    launched.push(...procs);
    const loads = readRecord(record).slice(before).filter((q) => q.path === '/snapshot/load');
    expect(loads.map((q) => q.status)).toEqual([204, 204]);
    for (const [i, fork] of forks.entries()) {
      const f = vmFiles(l, fork.id);
      const load = loads.find((q) => q.opened?.rootfs === f.rootDisk);
      expect(load, JSON.stringify(loads.map((q) => q.opened))).toBeDefined();
      expect(load!.opened).toEqual({ rootfs: f.rootDisk, work: f.workDisk, identity: f.identityDisk, vsock: procs[i].vsockSocket });
      expect(load!.body).toMatchObject({ network_overrides: [{ iface_id: 'eth0', host_dev_name: `bgtap${11 + i}` }], vsock_override: { uds_path: procs[i].vsockSocket }, resume_vm: true });
    }
    expect(new Set(procs.map((p) => p.vsockSocket)).size).toBe(2);
  }, SLOW);

  it('the restore step has the fork apply its own network over vsock, and ends its VMM when the guest never answers SSH', async () => {
    logs = [];
    const source = await snapshotted('fcsrc00003', 'snapfc0003', 'base3', true);
    expect((await driver().status({ pid: source.runtime!.pid, qmpSocket: source.runtime!.control })).state).toBe('gone');
    leases.set('fcfork0003', { tap: 'bgtap13', guestIp: '127.0.0.3' });
    const fork = context('fcfork0003', 'base3-fork-1', { restore: { snapshotId: 'snapfc0003', chain: [] }, bootTimeoutMs: 4000 });
    fork.net = (await runStep<{ net: VmContext['net'] }>(makeSteps(env).prepareDisks, fork)).output!.net;
    fork.bootDeadline = Date.now() + 4000;
    await rm(refreshed, { force: true });
    const r = await runStep(makeSteps(env).restore, fork);
    // The fake has no guest behind it, so SSH cannot answer: everything before it must have happened.
    expect(r.error?.message).toBeDefined();
    const mine = logs.filter((x) => x.startsWith('fcfork0003 '));
    expect(mine.some((x) => / snapshot\.load done pid \d+ \(firecracker\)/.test(x)), mine.join('\n')).toBe(true);
    expect(mine.some((x) => / network\.identity done MAC /.test(x)), mine.join('\n')).toBe(true);
    expect(mine.some((x) => / ssh\.identity error /.test(x)), mine.join('\n')).toBe(true);
    expect(await readFile(refreshed, 'utf8')).toBe('--refresh\n');
    const pid = Number(/pid (\d+)/.exec(mine.find((x) => x.includes('snapshot.load done'))!)![1]);
    expect((await driver().status({ pid, qmpSocket: join(l.run, 'fcfork0003.fc.sock') })).state).toBe('gone');
    expect(existsSync(join(vmFiles(l, fork.id).dir, 'vmm.json'))).toBe(false);
  }, SLOW);
});
