/**
 * A QEMU paused on a full disk, and launches cut short. The disk-error path runs against a fake QMP server (a real
 * QEMU cannot be made to hit ENOSPC without a guest that writes): a node process whose command line carries
 * `-qmp unix:<socket>,...` exactly as QEMU's does, so the driver's /proc identification takes it for the VM's QEMU.
 * The launch tests use a real QEMU with a fake kernel (it stays up without a guest).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StepEnv } from '../../src/actors/vm-steps.js';
import { makeSteps } from '../../src/actors/steps.js';
import { Files, layout as makeLayout } from '../../src/paths.js';
import { createQemuDriver, eventsSocketPath, identifyPid, qmpSocketPath, type LaunchSpec } from '../../src/host/vmm/qemu/qemu.js';
import { run, which, type Runner } from '../../src/host/exec/runner.js';
import { createActor } from 'xstate';
import { vmInput } from '../support/vm-fixtures.js';

let dir: string;
const children: ChildProcess[] = [];
const qemuPids: Array<{ pid: number; qmpSocket: string }> = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bqev-'));
});
afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  for (const p of qemuPids) if ((await identifyPid(p.pid, p.qmpSocket)).id === 'ours') process.kill(p.pid, 'SIGKILL');
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** A fake QEMU monitor pair: query-status says io-error once told to, and it sends BLOCK_IO_ERROR + STOP. */
const FAKE_QMP = `
const net = require('node:net');
const [qmp, qev] = [process.argv[3], process.argv[5]].map((a) => a.slice(5, a.indexOf(',')));
let status = 'running';
const clients = new Set();
function serve(path) {
  net.createServer((s) => {
    clients.add(s);
    s.on('close', () => clients.delete(s));
    s.write(JSON.stringify({ QMP: { version: { qemu: { major: 8 } }, capabilities: [] } }) + '\\n');
    let buf = '';
    s.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\\n')) >= 0) {
        const m = JSON.parse(buf.slice(0, i)); buf = buf.slice(i + 1);
        let ret = {};
        if (m.execute === 'query-status') ret = { status, running: status === 'running', singlestep: false };
        if (m.execute === 'query-block') ret = [{ device: 'root', 'io-status': 'ok' }, { device: 'work', 'io-status': status === 'io-error' ? 'nospace' : 'ok' }];
        if (m.execute === 'cont') status = 'running';
        s.write(JSON.stringify({ return: ret, id: m.id }) + '\\n');
      }
    });
  }).listen(path);
}
serve(qmp); serve(qev);
process.on('SIGUSR1', () => {
  status = 'io-error';
  const ts = { seconds: 1, microseconds: 0 };
  for (const s of clients) {
    s.write(JSON.stringify({ event: 'BLOCK_IO_ERROR', data: { device: 'work', 'node-name': '#b1', operation: 'write', action: 'stop', nospace: true, reason: 'No space left on device' }, timestamp: ts }) + '\\n');
    s.write(JSON.stringify({ event: 'STOP', timestamp: ts }) + '\\n');
  }
});
console.log('ready');
`;

async function fakeQemu(name: string): Promise<{ pid: number; qmpSocket: string; child: ChildProcess }> {
  const script = join(dir, 'fake-qmp.cjs');
  if (!existsSync(script)) await writeFile(script, FAKE_QMP);
  const qmpSocket = join(dir, `${name}.qmp`);
  const arg = (p: string) => `unix:${p},server=on,wait=off`;
  const child = spawn(process.execPath, [script, '-qmp', arg(qmpSocket), '-qmp', arg(eventsSocketPath(qmpSocket)!)], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  await new Promise<void>((res, rej) => {
    child.stdout!.once('data', () => res());
    child.once('exit', (c) => rej(new Error(`fake QMP exited ${c}`)));
  });
  return { pid: child.pid!, qmpSocket, child };
}

describe('QEMU paused by a disk error (fake QMP server)', () => {
  const driver = createQemuDriver();

  it("status reports 'paused' with the disk and ENOSPC once query-status says io-error", { timeout: 20_000 }, async () => {
    const f = await fakeQemu('st');
    expect(await driver.status(f)).toEqual({ state: 'running', reasons: [] });
    f.child.kill('SIGUSR1');
    await expect.poll(async () => (await driver.status(f)).state, { timeout: 5000 }).toBe('paused');
    const st = await driver.status(f);
    expect(st.reasons).toEqual([
      "QEMU reports status 'io-error': the guest's work disk hit an I/O error (ENOSPC: no space left on device) and QEMU paused it",
    ]);
    await driver.resume!(f);
    expect((await driver.status(f)).state).toBe('running');
  });

  it('waitExit returns with ioError on BLOCK_IO_ERROR + STOP, and the process is left as it is', { timeout: 20_000 }, async () => {
    const f = await fakeQemu('we');
    const ac = new AbortController();
    const guard = setTimeout(() => ac.abort(new Error('test guard')), 15_000);
    const exited = driver.waitExit(f, ac.signal);
    let settled = false;
    void exited.then(() => (settled = true), () => (settled = true));
    await new Promise((r) => setTimeout(r, 600)); // the watch attaches and sees a running VM
    expect(settled).toBe(false);
    f.child.kill('SIGUSR1');
    const ex = await exited;
    clearTimeout(guard);
    expect(ex.ioError).toMatchObject({ device: 'work', operation: 'write', nospace: true });
    expect(ex.reason).toBe("the guest's work disk hit an I/O error (ENOSPC: no space left on device) on write and QEMU paused it");
    expect((await identifyPid(f.pid, f.qmpSocket)).id).toBe('ours');
  });

  it('a watch that starts on an already paused VM returns at once', { timeout: 20_000 }, async () => {
    const f = await fakeQemu('pre');
    f.child.kill('SIGUSR1');
    await expect.poll(async () => (await driver.status(f)).state, { timeout: 5000 }).toBe('paused');
    const ex = await driver.waitExit(f, AbortSignal.timeout(10_000));
    expect(ex.ioError).toMatchObject({ device: 'work', nospace: true });
  });
});

const qemuBin = process.env.BANGER_QEMU_BIN ?? 'qemu-system-x86_64';
const noQemu = !(await which(qemuBin)) && process.env.CI !== 'true';

describe.skipIf(noQemu)('a launch cut short leaves no QEMU (real QEMU, fake kernel; needs qemu-system-x86_64)', () => {
  async function vmSpec(home: string, id: string): Promise<{ spec: LaunchSpec; env: NodeJS.ProcessEnv }> {
    const env = { BANGER_HOME: home, BANGER_RUNTIME_DIR: join(home, 'run') };
    const l = makeLayout(env);
    const vmDir = l.vmDir(id);
    await mkdir(vmDir, { recursive: true });
    await writeFile(join(home, 'kernel'), Buffer.alloc(64 * 1024));
    for (const d of ['root.ext4', 'work.ext4']) await writeFile(join(vmDir, d), Buffer.alloc(1024 * 1024));
    const spec: LaunchSpec = {
      id, vmDir, runDir: l.run, kernel: join(home, 'kernel'), cmdline: 'console=ttyS0', rootDisk: join(vmDir, 'root.ext4'), workDisk: join(vmDir, 'work.ext4'),
      vcpus: 1, memoryMiB: 64, accel: 'tcg', net: { mode: 'user', sshPort: 1 + 40000 + Math.floor(Math.random() * 20000) }, serialLog: join(vmDir, Files.serialLog),
    };
    return { spec, env };
  }

  it('a failure right after QEMU daemonized kills it before the error is reported', { timeout: 60_000 }, async () => {
    const home = await mkdtemp(join(dir, 'h-'));
    const { spec } = await vmSpec(home, 'cutshort1');
    let started: number | undefined;
    const failAfterStart: Runner = async (file, args, o) => {
      const r = await run(file, args, o);
      started = Number((await readFile(join(spec.vmDir, Files.vmmPid), 'utf8')).trim());
      qemuPids.push({ pid: started, qmpSocket: qmpSocketPath(spec.runDir, spec.id) });
      throw new Error(`injected failure after ${file} exited ${r.exitCode}`);
    };
    const err = await createQemuDriver({ runner: failAfterStart }).launch(spec, {}).catch((e: unknown) => e as Error);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toContain('injected failure');
    expect(started).toBeGreaterThan(1);
    expect((await identifyPid(started!, qmpSocketPath(spec.runDir, spec.id))).id).toBe('gone');
  });

  it('the boot step kills the VMM it launched when writing vmm.json fails', { timeout: 60_000 }, async () => {
    const home = await mkdtemp(join(dir, 'h-'));
    const input = vmInput();
    const { spec, env: penv } = await vmSpec(home, input.id);
    const l = makeLayout(penv);
    const image = l.imageDir(input.spec.image);
    await mkdir(image, { recursive: true });
    await writeFile(join(image, 'vmlinuz'), Buffer.alloc(64 * 1024));
    for (const f of ['rootfs.ext4', 'work-seed.ext4']) await writeFile(join(image, f), '');
    await writeFile(join(image, Files.manifest), JSON.stringify({ name: input.spec.image, createdAt: input.createdAt, builderVersion: 1, kernel: 'vmlinuz', rootfs: 'rootfs.ext4', workSeed: 'work-seed.ext4', packages: 0, sizeBytes: 0, files: {} }));
    await writeFile(join(spec.vmDir, Files.rootfs), Buffer.alloc(1024 * 1024));
    await writeFile(join(spec.vmDir, Files.workDisk), Buffer.alloc(1024 * 1024));
    await mkdir(join(spec.vmDir, 'vmm.json')); // writing vmm.json fails (EISDIR) right after the launch
    const driver = createQemuDriver();
    const logs: string[] = [];
    const env = {
      layout: l, store: {} as StepEnv['store'], config: {} as StepEnv['config'], runner: run,
      userKey: async () => ({ privateKey: '', publicKey: '' }), driver: () => driver,
      log: (_id: string, stage: string, status: string, _ms?: number, msg?: string) => logs.push(`${stage} ${status} ${msg ?? ''}`),
    } as unknown as StepEnv;
    const ctx = { ...input, runtime: null, net: null, error: null, stopReason: null, restartPending: false, bootDeadline: Date.now() + 30_000, pendingSet: null };
    const actor = createActor(makeSteps(env).boot, { input: { ctx } });
    const outcome = new Promise<unknown>((res) => actor.subscribe({ complete: () => res('done'), error: (e) => res(e) }));
    actor.start();
    const err = (await outcome) as Error;
    expect(err).toBeInstanceOf(Error);
    expect(err.message).toMatch(/EISDIR/);
    const launched = logs.find((l) => l.startsWith('vmm.launch done'));
    expect(launched, logs.join('\n')).toBeDefined();
    const pid = Number(/pid (\d+)/.exec(launched!)![1]);
    qemuPids.push({ pid, qmpSocket: qmpSocketPath(l.run, input.id) });
    expect((await identifyPid(pid, qmpSocketPath(l.run, input.id))).id).toBe('gone');
  });

  it('delete finds and kills a VMM that only its pid file knows (vmm.json never written)', { timeout: 60_000 }, async () => {
    const home = await mkdtemp(join(dir, 'h-'));
    const input = vmInput();
    const { spec, env: penv } = await vmSpec(home, input.id);
    const l = makeLayout(penv);
    const driver = createQemuDriver();
    const proc = await driver.launch(spec, {});
    qemuPids.push(proc);
    expect(existsSync(join(spec.vmDir, 'vmm.json'))).toBe(false);
    const env = {
      layout: l, store: { releaseAddress: () => {} } as unknown as StepEnv['store'], config: {} as StepEnv['config'], runner: run,
      userKey: async () => ({ privateKey: '', publicKey: '' }), driver: () => driver, log: () => {},
    } as unknown as StepEnv;
    const ctx = { ...input, runtime: null, net: null, error: null, stopReason: null, restartPending: false, bootDeadline: null, pendingSet: null };
    const actor = createActor(makeSteps(env).destroy, { input: { ctx } });
    const outcome = new Promise<unknown>((res) => actor.subscribe({ complete: () => res('done'), error: (e) => res(e) }));
    actor.start();
    expect(await outcome).toBe('done');
    expect((await identifyPid(proc.pid, proc.qmpSocket)).id).toBe('gone');
    expect(existsSync(spec.vmDir)).toBe(false);
  });
});
