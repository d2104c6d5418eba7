import { existsSync, readFileSync } from 'node:fs';
import { chmod, chown, lstat, mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import {
  FirecrackerApi,
  FirecrackerApiError,
  bootArgs,
  createFirecrackerDriver,
  firecrackerId,
  firecrackerVersion,
  resolveFirecrackerBinary,
  restoresSnapshots,
  type FirecrackerProcess,
} from '../../src/host/vmm/firecracker/firecracker.js';
import { firecrackerSnapshotCheck } from '../../src/daemon/doctor.js';
import { macForVm } from '../../src/host/net/net.js';
import type { LaunchSpec } from '../../src/host/vmm/qemu/qemu.js';
import { startFakeFirecracker, type FakeFirecracker } from '../support/fake-firecracker.js';
import { makeFakeFirecracker, readRecord } from '../support/fake-firecracker-cli.js';
import { agentHealth, firecrackerVsockChannel } from '../../src/host/guest/agent.js';
import { AGENT_SCRIPT, AGENT_VSOCK_PORT } from '../../src/host/image/agent.js';
import { agentChannelOf } from '../../src/host/vmm/agent-channel.js';
import { createConnection } from 'node:net';

const here = dirname(fileURLToPath(import.meta.url));
const fakeBin = join(here, '..', 'support', 'fake-firecracker-bin.mjs');
const isRoot = process.getuid?.() === 0;
/**
 * The fake is node plus tsx plus zod: about a second of CPU before its socket answers, several seconds on a loaded
 * CI machine. A real Firecracker answers within milliseconds, hence the driver's 10 s default; the tests allow more.
 */
const READY_MS = 30_000;
/** For tests that launch the fake. */
const SLOW = 60_000;

let root: string;
let n = 0;
const launched: FirecrackerProcess[] = [];

/** A fake `firecracker` executable of its own for a test. */
const makeBinary = (env: Record<string, string> = {}) => makeFakeFirecracker(join(root, `bin${++n}`), env);

/**
 * Polls `file` until its text matches `re`, for at most `timeoutMs`. The guest's console output (the fake's
 * stdout) is written after Firecracker answered InstanceStart, as with a real guest: launch returning says
 * nothing about what the console shows yet.
 */
async function waitForText(file: string, re: RegExp, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let text = '';
  for (;;) {
    text = await readFile(file, 'utf8').catch(() => '');
    if (re.test(text) || Date.now() >= deadline) return text;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A VM's files: kernel, initrd, disks, and the spec. */
async function makeVm(overrides: Partial<LaunchSpec> = {}): Promise<LaunchSpec> {
  const id = `vm${++n}_x`;
  const vmDir = join(root, 'vms', id);
  const imgDir = join(root, 'img');
  await mkdir(vmDir, { recursive: true });
  await mkdir(imgDir, { recursive: true });
  for (const f of [join(imgDir, 'vmlinux'), join(imgDir, 'initrd.img'), join(vmDir, 'rootfs.ext4'), join(vmDir, 'work.ext4')]) {
    if (!existsSync(f)) await writeFile(f, 'x');
  }
  return {
    id,
    vmDir,
    runDir: join(root, 'run'),
    kernel: join(imgDir, 'vmlinux'),
    initrd: join(imgDir, 'initrd.img'),
    cmdline: 'console=ttyS0 quiet systemd.unit=multi-user.target',
    rootDisk: join(vmDir, 'rootfs.ext4'),
    workDisk: join(vmDir, 'work.ext4'),
    vcpus: 2,
    memoryMiB: 512,
    accel: 'kvm',
    net: { mode: 'tap', tap: 'bgtap3', mac: macForVm(id) },
    serialLog: join(vmDir, 'serial.log'),
    ...overrides,
  };
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

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/\) [ZX] /.test(stat);
  } catch {
    return false;
  }
};

beforeAll(async () => {
  // short: sockets live under it (108-byte limit)
  root = await mkdtemp(join(tmpdir(), 'bfc-'));
});

afterEach(async () => {
  for (const p of launched.splice(0)) {
    if (alive(p.pid)) process.kill(p.pid, 'SIGKILL');
  }
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('Firecracker driver against the fake binary', () => {
  it('launches with the full API sequence and exact bodies, then stops gracefully with SendCtrlAltDel', async () => {
    const bin = await makeBinary();
    const lines: string[] = [];
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS, log: (l) => lines.push(l) });
    const spec = await makeVm();
    // a stale socket from a crashed run must not get in the way
    await mkdir(spec.runDir, { recursive: true });
    const fcId = firecrackerId(spec.id);
    await writeFile(join(spec.runDir, `${fcId}.fc.sock`), '');

    const proc = await driver.launch(spec);
    launched.push(proc);
    expect(fcId).toBe(spec.id.replace('_', '-'));
    expect(proc).toMatchObject({ apiSocket: join(spec.runDir, `${fcId}.fc.sock`), qmpSocket: join(spec.runDir, `${fcId}.fc.sock`), fcId, vmDir: spec.vmDir });
    expect(alive(proc.pid)).toBe(true);
    expect((await readFile(join(spec.vmDir, 'vmm.pid'), 'utf8')).trim()).toBe(String(proc.pid));

    const reqs = readRecord(bin.record);
    const puts = reqs.filter((r) => r.method !== 'GET');
    expect(reqs[0]).toMatchObject({ method: 'GET', path: '/', status: 200 });
    expect(puts.map((r) => [r.method, r.path, r.status])).toEqual([
      ['PUT', '/machine-config', 204],
      ['PUT', '/boot-source', 204],
      ['PUT', '/drives/rootfs', 204],
      ['PUT', '/drives/work', 204],
      ['PUT', '/network-interfaces/eth0', 204],
      ['PUT', '/vsock', 204],
      ['PUT', '/actions', 204],
    ]);
    expect(puts.map((r) => r.body)).toEqual([
      { vcpu_count: 2, mem_size_mib: 512, smt: false },
      {
        kernel_image_path: spec.kernel,
        initrd_path: spec.initrd,
        boot_args: 'console=ttyS0 reboot=k panic=1 root=/dev/vda rw quiet systemd.unit=multi-user.target',
      },
      { drive_id: 'rootfs', path_on_host: spec.rootDisk, is_root_device: true, is_read_only: false },
      { drive_id: 'work', path_on_host: spec.workDisk, is_root_device: false, is_read_only: false },
      { iface_id: 'eth0', host_dev_name: 'bgtap3', guest_mac: macForVm(spec.id) },
      { guest_cid: 3, uds_path: join(spec.runDir, `${fcId}.vsock`) },
      { action_type: 'InstanceStart' },
    ]);
    // each step logged with its time
    for (const step of ['resolve-binary', 'spawn', 'wait-api-socket', 'machine-config', 'boot-source', 'drive-rootfs', 'drive-work', 'network-interfaces', 'vsock', 'instance-start']) {
      expect(lines.some((l) => new RegExp(`: ${step} \\d+ ms$`).test(l)), step).toBe(true);
    }

    expect(await driver.status(proc)).toEqual({ state: 'running', reasons: [] });
    // status works from the persisted fields alone ({pid, qmpSocket}), as after a daemon restart
    expect(await driver.status({ pid: proc.pid, qmpSocket: proc.qmpSocket })).toEqual({ state: 'running', reasons: [] });
    expect((await driver.describe(proc)).id).toBe(fcId);
    expect(existsSync(proc.vsockSocket)).toBe(true);
    expect(await waitForText(spec.serialLog, /Run \/sbin\/init as init process/)).toMatch(/Run \/sbin\/init as init process/);

    const exit = driver.waitExit(proc, new AbortController().signal);
    expect(await driver.stop(proc, { timeoutMs: 10_000 })).toBe('graceful');
    expect(await exit).toEqual({ reason: 'exited with code 0' });
    expect(alive(proc.pid)).toBe(false);
    expect(readRecord(bin.record).at(-1)).toMatchObject({ method: 'PUT', path: '/actions', body: { action_type: 'SendCtrlAltDel' }, status: 204 });
    expect(existsSync(proc.apiSocket)).toBe(false);
    expect(existsSync(proc.vsockSocket)).toBe(false);
    expect(existsSync(join(spec.vmDir, 'vmm.pid'))).toBe(false);
    expect((await driver.status(proc)).state).toBe('gone');
    expect(await driver.stop(proc, { timeoutMs: 1000 })).toBe('already-gone');
  }, SLOW);

  it("reaches the guest agent through the vsock the driver configured: CONNECT <port>, OK, then GET /healthz", async () => {
    const script = join(root, 'banger-agent');
    await writeFile(script, AGENT_SCRIPT, { mode: 0o755 });
    const bin = await makeBinary({ FAKE_FC_GUEST_AGENT: `${AGENT_VSOCK_PORT}:${script}` });
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS });
    const spec = await makeVm();
    const proc = await driver.launch(spec);
    launched.push(proc);
    expect(readRecord(bin.record).find((r) => r.path === '/vsock')).toMatchObject({ method: 'PUT', status: 204, body: { guest_cid: 3, uds_path: proc.vsockSocket } });
    // The daemon finds the vsock socket from the API socket alone (what a VM's runtime keeps).
    const { channel, transport } = agentChannelOf('firecracker', spec.id, proc.apiSocket);
    expect(transport).toBe('vsock');
    const h = await agentHealth(channel, 20_000);
    expect(h).toMatchObject({ ok: true, sessionsRunning: 0 });
    expect(h.memory.totalKiB).toBeGreaterThan(h.memory.availableKiB);
    expect(h.disk['/'].totalBytes).toBeGreaterThan(0);
    // Nothing listens on another port: Firecracker closes the connection instead of answering OK.
    const none = await errorOf(agentHealth(firecrackerVsockChannel(proc.vsockSocket, AGENT_VSOCK_PORT + 1), 20_000));
    expect(none.message).toContain(`nothing in the guest listens on vsock port ${AGENT_VSOCK_PORT + 1}`);
    // A line that is not CONNECT <port>: closed, nothing forwarded.
    const closed = await new Promise<string>((resolve) => {
      let got = '';
      const s = createConnection(proc.vsockSocket, () => s.write('HELLO 52\n'));
      s.on('data', (c) => (got += c.toString()));
      s.on('close', () => resolve(got));
      s.on('error', () => {});
    });
    expect(closed).toBe('');
    await driver.stop(proc, { timeoutMs: 10_000 });
  }, SLOW);

  it("surfaces Firecracker's fault_message for a bad drive path, and leaves no process or socket behind", async () => {
    const bin = await makeBinary();
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS });
    const spec = await makeVm();
    spec.rootDisk = join(spec.vmDir, 'missing.ext4');
    const e = await errorOf(driver.launch(spec));
    expect(e.kind).toBe('host');
    expect(e.message).toMatch(/^Firecracker launch failed at step drive-rootfs: Firecracker refused PUT \/drives\/rootfs \(HTTP 400\): Unable to create the block device/);
    expect(e.message).toContain('No such file or directory');
    expect(e.cause).toBeInstanceOf(FirecrackerApiError);
    // the fake said which pid it had (in firecracker.log, its stderr) before it answered anything
    const pid = Number(/\(pid (\d+)\)/.exec(await readFile(join(spec.vmDir, 'firecracker.log'), 'utf8'))?.[1]);
    expect(pid).toBeGreaterThan(0);
    expect(alive(pid)).toBe(false);
    expect(existsSync(join(spec.vmDir, 'vmm.pid'))).toBe(false);
    const fcId = firecrackerId(spec.id);
    expect(existsSync(join(spec.runDir, `${fcId}.fc.sock`))).toBe(false);
    // nothing after the failing step was sent
    expect(readRecord(bin.record).map((r) => r.path)).not.toContain('/actions');
  }, SLOW);

  it('kills with SIGKILL after the timeout when the guest ignores SendCtrlAltDel', async () => {
    const bin = await makeBinary({ FAKE_FC_IGNORE_CTRL_ALT_DEL: '1' });
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS });
    const proc = await driver.launch(await makeVm());
    launched.push(proc);
    const exit = driver.waitExit(proc, new AbortController().signal);
    const t0 = Date.now();
    expect(await driver.stop(proc, { timeoutMs: 600 })).toBe('killed');
    // it waited out the grace period before the SIGKILL (a lower bound: load can only make it longer)
    expect(Date.now() - t0).toBeGreaterThanOrEqual(550);
    expect(await exit).toEqual({ reason: 'killed by SIGKILL' });
    expect(readRecord(bin.record).some((r) => (r.body as { action_type?: string } | undefined)?.action_type === 'SendCtrlAltDel' && r.status === 204)).toBe(true);
    expect(alive(proc.pid)).toBe(false);
    expect(existsSync(proc.apiSocket)).toBe(false);
  }, SLOW);

  it('reports a VMM that exits on its own, and a running VMM whose socket stopped answering as broken', async () => {
    const bin = await makeBinary();
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS });
    const proc = await driver.launch(await makeVm());
    launched.push(proc);
    await rm(proc.apiSocket); // the process still runs, but nobody can reach it
    const st = await driver.status(proc);
    expect(st.state).toBe('broken');
    expect(st.reasons.join(' ')).toMatch(/is running but its API socket .* did not answer/);
    const exit = driver.waitExit(proc, AbortSignal.timeout(20_000));
    process.kill(proc.pid, 'SIGUSR2'); // the guest powers off
    expect(await exit).toEqual({ reason: 'exited with code 0' });
    expect((await driver.status(proc)).state).toBe('gone');
  }, SLOW);

  it("ends the wait early with Firecracker's own words when it exits before the socket answers", async () => {
    const bin = await makeBinary({ FAKE_FC_FAIL_AT_START: 'Error creating the Kvm object: No such file or directory (os error 2)' });
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: 20_000 });
    const e = await errorOf(driver.launch(await makeVm()));
    // early: the exit ended the wait (a wait that ran out would say it timed out, not what Firecracker said)
    expect(e.message).toMatch(/wait-api-socket: Firecracker exited before its API socket answered \(exit code 1\): Error creating the Kvm object/);
    expect(e.hint).toMatch(/kvm/i);
  }, SLOW);

  it('refuses a second Firecracker on a socket that is in use', async () => {
    const bin = await makeBinary();
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS });
    const spec = await makeVm();
    const proc = await driver.launch(spec);
    launched.push(proc);
    const e = await errorOf(driver.launch(spec));
    expect(e.kind).toBe('conflict');
    expect(e.message).toMatch(/already serving/);
    expect(await driver.status(proc)).toEqual({ state: 'running', reasons: [] });
    await driver.kill(proc);
    expect(alive(proc.pid)).toBe(false);
  }, SLOW);

  it('takes a socket that accepts connections but does not answer for one in use, and leaves it alone', async () => {
    const bin = await makeBinary();
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS });
    const spec = await makeVm();
    await mkdir(spec.runDir, { recursive: true });
    const apiSocket = join(spec.runDir, `${firecrackerId(spec.id)}.fc.sock`);
    // a Firecracker too busy to answer in time: it listens and reads, but says nothing
    const silent = createNetServer((c) => c.resume());
    await new Promise<void>((res, rej) => silent.once('error', rej).listen(apiSocket, () => res()));
    try {
      const e = await errorOf(driver.launch(spec));
      expect(e.kind).toBe('conflict');
      expect(e.message).toMatch(/already serving .* did not answer GET \/ within/);
      expect(existsSync(apiSocket)).toBe(true);
      expect(readRecord(bin.record)).toEqual([]); // nothing was started
    } finally {
      await new Promise((r) => silent.close(r));
    }
  }, SLOW);

  it('refuses user networking before starting anything', async () => {
    const driver = createFirecrackerDriver({ binary: '/nonexistent/firecracker' });
    const e = await errorOf(driver.launch(await makeVm({ net: { mode: 'user', sshPort: 2222 } })));
    expect(e.kind).toBe('unsupported');
    expect(e.message).toMatch(/Firecracker has no user-mode networking/);
  });
});

describe('the Firecracker binary', () => {
  it('names the path it tried and how to set it when the configured binary is missing', async () => {
    const driver = createFirecrackerDriver({ binary: '/nonexistent/firecracker' });
    const e = await errorOf(driver.launch(await makeVm()));
    expect(e.kind).toBe('not_found');
    expect(e.message).toMatch(/Firecracker binary \/nonexistent\/firecracker \(from the config key firecrackerBin\) does not exist/);
    expect(e.hint).toMatch(/BANGER_FIRECRACKER_BIN/);
    expect(e.hint).toMatch(/firecrackerBin/);
  });

  it("doctor tells from `firecracker --version` whether it restores banger's snapshots (1.16 on), and says so when it cannot tell", async () => {
    const says = async (out: string) => {
      const p = join(root, `fcv${++n}`);
      await writeFile(p, `#!/bin/sh\n[ "$1" = --version ] && printf '${out}'\n`, { mode: 0o755 });
      return p;
    };
    expect(await firecrackerVersion(await says('Firecracker v1.16.0\\n\\n'))).toBe('1.16.0');
    expect(await firecrackerSnapshotCheck(await says('Firecracker v1.16.0\\n'))).toMatchObject({ name: 'firecracker.snapshots', status: 'ok' });
    expect(await firecrackerSnapshotCheck(await says('Firecracker v2.0.1\\n'))).toMatchObject({ status: 'ok' });
    const old = await firecrackerSnapshotCheck(await says('Firecracker v1.15.1\\n'));
    expect(old).toMatchObject({ status: 'warn', detail: expect.stringMatching(/Firecracker 1\.15\.1 cannot restore banger's snapshots/), fix: expect.stringMatching(/Firecracker 1\.16 or later/) });
    // the fake knows no --version: nothing to go by
    expect(await firecrackerSnapshotCheck((await makeBinary()).path)).toMatchObject({ status: 'warn', detail: expect.stringMatching(/--version did not say/) });
    expect(['1.16.0', 'v1.16.0-dev', '1.17.2', '2.0.0'].every(restoresSnapshots)).toBe(true);
    expect(['1.15.1', '1.7.0-fake', '0.25.0', 'banana'].some(restoresSnapshots)).toBe(false);
  });

  it('uses BANGER_FIRECRACKER_BIN, then PATH', async () => {
    const e1 = await errorOf(resolveFirecrackerBinary(undefined, { BANGER_FIRECRACKER_BIN: '/nope/fc', PATH: '/usr/bin' }));
    expect(e1.message).toMatch(/\/nope\/fc \(from BANGER_FIRECRACKER_BIN\) does not exist/);
    const empty = join(root, 'emptybin');
    await mkdir(empty, { recursive: true });
    const e2 = await errorOf(resolveFirecrackerBinary(undefined, { PATH: empty }));
    expect(e2.kind).toBe('not_found');
    expect(e2.message).toContain(`no executable "firecracker" on PATH (${empty})`);
    expect(e2.hint).toMatch(/BANGER_FIRECRACKER_BIN=\/path\/to\/firecracker or the config key "firecrackerBin"/);
    const bin = await makeBinary();
    expect(await resolveFirecrackerBinary(undefined, { PATH: `${empty}:${dirname(bin.path)}` })).toBe(bin.path);
    expect(await resolveFirecrackerBinary(undefined, { BANGER_FIRECRACKER_BIN: bin.path })).toBe(bin.path);
  });

  it('composes boot args from the base and the spec without repeating tokens', () => {
    expect(bootArgs('console=ttyS0 root=/dev/vda rw quiet')).toBe('console=ttyS0 reboot=k panic=1 root=/dev/vda rw quiet');
  });
});

describe('the fake API is as strict as Firecracker', () => {
  let fake: FakeFirecracker;
  let api: FirecrackerApi;
  let kernel: string;

  beforeAll(async () => {
    kernel = join(root, 'fake-kernel');
    await writeFile(kernel, 'k');
  });
  afterEach(async () => {
    await fake?.close();
    fake?.unlinkSockets();
  });
  const start = async () => {
    const socketPath = join(root, `f${++n}.sock`);
    fake = await startFakeFirecracker({ socketPath, id: 'strict' });
    api = new FirecrackerApi(socketPath);
  };
  const fault = async (p: Promise<unknown>) => {
    const e = await errorOf(p);
    expect(e).toBeInstanceOf(FirecrackerApiError);
    return e as FirecrackerApiError;
  };

  it('refuses InstanceStart before the boot source is set', async () => {
    await start();
    const e = await fault(api.put('/actions', { action_type: 'InstanceStart' }));
    expect(e.status).toBe(400);
    expect(e.faultMessage).toMatch(/not configured: the boot source \(kernel\) is missing/);
    expect(fake.state).toBe('Not started');
  });

  it('accepts InstanceStart once, then refuses pre-boot endpoints; SendCtrlAltDel only when running', async () => {
    await start();
    expect((await fault(api.put('/actions', { action_type: 'SendCtrlAltDel' }))).faultMessage).toMatch(/not supported before starting/);
    await api.put('/boot-source', { kernel_image_path: kernel });
    await api.put('/actions', { action_type: 'InstanceStart' });
    expect((await api.describe()).state).toBe('Running');
    expect((await fault(api.put('/actions', { action_type: 'InstanceStart' }))).faultMessage).toMatch(/not supported after starting/);
    expect((await fault(api.put('/machine-config', { vcpu_count: 1, mem_size_mib: 128 }))).faultMessage).toMatch(/after starting/);
    expect((await fault(api.put('/drives/x', { drive_id: 'x', is_root_device: false, is_read_only: true, path_on_host: kernel }))).faultMessage).toMatch(/after starting/);
    await api.put('/actions', { action_type: 'SendCtrlAltDel' });
  });

  it('checks bodies field by field: unknown fields, types, required fields, ids and files', async () => {
    await start();
    expect((await fault(api.put('/machine-config', { vcpu_count: 2, mem_size_mib: 256, bogus: 1 }))).faultMessage).toMatch(/unknown field `bogus`/);
    expect((await fault(api.put('/machine-config', { vcpu_count: '2', mem_size_mib: 256 }))).faultMessage).toMatch(/invalid type at vcpu_count/);
    expect((await fault(api.put('/machine-config', { vcpu_count: 2 }))).faultMessage).toMatch(/mem_size_mib/);
    expect((await fault(api.put('/machine-config', { vcpu_count: 33, mem_size_mib: 256 }))).faultMessage).toMatch(/vcpu_count/);
    expect((await fault(api.put('/boot-source', { kernel_image_path: '/nonexistent/vmlinux' }))).faultMessage).toMatch(/No such file/);
    expect((await fault(api.put('/drives/a', { drive_id: 'b', is_root_device: true, is_read_only: false, path_on_host: kernel }))).faultMessage).toMatch(
      /id from the path does not match/,
    );
    expect((await fault(api.put('/drives/a', { drive_id: 'a', is_root_device: 'yes', path_on_host: kernel }))).faultMessage).toMatch(/is_root_device/);
    await api.put('/drives/a', { drive_id: 'a', is_root_device: true, is_read_only: false, path_on_host: kernel });
    expect((await fault(api.put('/drives/b', { drive_id: 'b', is_root_device: true, is_read_only: false, path_on_host: kernel }))).faultMessage).toMatch(/root block device already exists/);
    expect((await fault(api.put('/network-interfaces/eth0', { iface_id: 'eth0', host_dev_name: 'bgtap0', guest_mac: 'zz:00:00:00:00:00' }))).faultMessage).toMatch(/MAC/);
    expect((await fault(api.put('/vsock', { guest_cid: 2, uds_path: join(root, 'v.sock') }))).faultMessage).toMatch(/guest_cid/);
    expect((await fault(api.put('/vsock', { guest_cid: 3, uds_path: join(root, 'v.sock'), cid: 3 }))).faultMessage).toMatch(/unknown field `cid`/);
    expect((await fault(api.put('/vsock', { guest_cid: 3 }))).faultMessage).toMatch(/uds_path/);
    expect((await fault(api.put('/vsock', { guest_cid: 3, uds_path: join(root, 'no-such-dir', 'v.sock') }))).faultMessage).toMatch(/No such file or directory/);
    expect((await fault(api.put('/actions', { action_type: 'Reboot' }))).faultMessage).toMatch(/action_type/);
    expect((await fault(api.request('PUT', '/machine-config'))).faultMessage).toMatch(/body is empty/);
  });

  it('answers only documented endpoints and methods', async () => {
    await start();
    expect((await fault(api.request('GET', '/nope'))).faultMessage).toBe('Invalid request method and/or path: GET /nope.');
    expect((await fault(api.request('PATCH', '/'))).faultMessage).toMatch(/Invalid request method and\/or path: PATCH \//);
    expect((await fault(api.request('GET', '/boot-source'))).faultMessage).toMatch(/Invalid request method/);
    expect(await api.request('GET', '/version')).toEqual({ firecracker_version: '1.7.0-fake' });
    expect(await api.describe()).toEqual({ id: 'strict', state: 'Not started', vmm_version: '1.7.0-fake', app_name: 'Firecracker' });
    expect(fake.requests.map((r) => `${r.method} ${r.path} ${r.status}`)).toEqual(['GET /nope 400', 'PATCH / 400', 'GET /boot-source 400', 'GET /version 200', 'GET / 200']);
  });

  it('reports an unreachable socket as a host error and a silent one as a timeout', async () => {
    const e = await errorOf(new FirecrackerApi(join(root, 'absent.sock')).describe());
    expect(e.kind).toBe('host');
    expect(e.message).toMatch(/cannot reach the Firecracker API at .*absent\.sock \(ENOENT\)/);
  });
});

describe.skipIf(!isRoot)('through the jailer (a fake jailer; needs root for chown)', () => {
  it('hard-links the files into the chroot, configures with in-jail paths, and stops', async () => {
    const fc = await makeBinary();
    // A stand-in jailer: parses its arguments like the real one and execs the fake in "the chroot" (no real chroot).
    const jailer = join(root, 'jailer');
    await writeFile(
      jailer,
      [
        '#!/bin/sh',
        'while [ $# -gt 0 ]; do',
        '  case "$1" in',
        '    --id) ID=$2; shift 2;;',
        '    --exec-file) EXE=$2; shift 2;;',
        '    --uid) U=$2; shift 2;;',
        '    --gid) G=$2; shift 2;;',
        '    --chroot-base-dir) BASE=$2; shift 2;;',
        '    --) shift; break;;',
        '    *) echo "jailer: unexpected $1" >&2; exit 1;;',
        '  esac',
        'done',
        '[ "$1" = --api-sock ] || { echo "jailer: expected --api-sock" >&2; exit 1; }',
        'CHROOT="$BASE/$(basename "$EXE")/$ID/root"',
        `export FAKE_FC_CHROOT="$CHROOT" FAKE_FC_RECORD='${fc.record}'`,
        `exec '${process.execPath}' '${fakeBin}' --id "$ID" --api-sock "$CHROOT$2"`,
        '',
      ].join('\n'),
    );
    await chmod(jailer, 0o755);
    const chrootBase = join(root, 'jail');
    const lines: string[] = [];
    const driver = createFirecrackerDriver({ binary: fc.path, readyTimeoutMs: READY_MS, log: (l) => lines.push(l), jailer: { uid: 1000, gid: 1000, config: { jailerBin: jailer, chrootBase } } });
    const spec = await makeVm();
    // a file the jail's user does not own is never handed to the jail
    const e = await errorOf(driver.launch(spec));
    expect(e.message).toMatch(/refused to put .*vmlinux in the jail: it is owned by uid 0, not 1000/);
    expect(existsSync(join(chrootBase, 'firecracker', firecrackerId(spec.id)))).toBe(false); // cleaned up
    for (const f of [spec.kernel, spec.initrd!, spec.rootDisk, spec.workDisk]) await chown(f, 1000, 1000);
    const proc = await driver.launch(spec);
    launched.push(proc);
    const fcId = firecrackerId(spec.id);
    const chroot = join(chrootBase, 'firecracker', fcId, 'root');
    expect(proc.chrootDir).toBe(chroot);
    // the disks are the same inodes as the VM's own files, owned by the jail's uid
    const [a, b] = [await stat(spec.rootDisk), await stat(join(chroot, 'rootfs.ext4'))];
    expect(b.ino).toBe(a.ino);
    expect(b.uid).toBe(1000);
    expect((await lstat(proc.apiSocket)).isSymbolicLink()).toBe(true);
    // output goes to logs inside the chroot, owned by the jail's user, linked from the VM directory
    expect((await lstat(spec.serialLog)).isSymbolicLink()).toBe(true);
    expect((await stat(join(chroot, 'serial.log'))).uid).toBe(1000);
    expect(await waitForText(spec.serialLog, /Run \/sbin\/init/)).toMatch(/Run \/sbin\/init/);
    const puts = readRecord(fc.record).filter((r) => r.method === 'PUT');
    expect(puts.find((r) => r.path === '/boot-source')?.body).toMatchObject({ kernel_image_path: '/vmlinux', initrd_path: '/initrd.img' });
    expect(puts.find((r) => r.path === '/drives/rootfs')?.body).toMatchObject({ path_on_host: '/rootfs.ext4' });
    expect(puts.find((r) => r.path === '/drives/work')?.body).toMatchObject({ path_on_host: '/work.ext4' });
    expect(puts.find((r) => r.path === '/vsock')?.body).toEqual({ guest_cid: 3, uds_path: '/vsock.sock' });
    expect(await driver.status(proc)).toEqual({ state: 'running', reasons: [] });
    expect(await driver.stop(proc, { timeoutMs: 5000 })).toBe('graceful');
    expect(existsSync(proc.apiSocket)).toBe(false);
    // the chroot (hard links to the disks) is gone, the VM's own files are not
    expect(existsSync(join(chrootBase, 'firecracker', fcId)), lines.join('\n')).toBe(false);
    expect(existsSync(spec.rootDisk)).toBe(true);
    // the serial log was kept as a plain file
    expect((await lstat(spec.serialLog)).isFile()).toBe(true);
    expect(await readFile(spec.serialLog, 'utf8')).toMatch(/Restarting system/);
  }, SLOW);

  it('refuses a chroot base that the user could redirect', async () => {
    const { assertRootOwnedDir } = await import('../../src/host/vmm/firecracker/firecracker.js');
    const userDir = join(root, 'userdir');
    await mkdir(userDir, { recursive: true });
    await chown(userDir, 1000, 1000);
    await expect(assertRootOwnedDir(join(userDir, 'jail'))).rejects.toThrow(/userdir is owned by uid 1000/);
    await symlink('/', join(root, 'link'));
    await expect(assertRootOwnedDir(join(root, 'link', 'jail'))).rejects.toThrow(/link is a symlink/);
    await expect(assertRootOwnedDir(join(root, 'fine', 'jail'))).resolves.toBeUndefined();
  });
});

describe('snapshots: PATCH /vm, PUT /snapshot/create, PUT /snapshot/load', () => {
  let fake: FakeFirecracker | undefined;
  afterEach(async () => {
    await fake?.close();
    fake?.unlinkSockets();
    fake = undefined;
  });
  const fault = async (p: Promise<unknown>) => {
    const e = await errorOf(p);
    expect(e).toBeInstanceOf(FirecrackerApiError);
    return e as FirecrackerApiError;
  };
  /** A fake with a booted microVM: boot source, one drive, one interface. */
  const booted = async () => {
    const kernel = join(root, 'snap-kernel');
    await writeFile(kernel, 'k');
    const socketPath = join(root, `s${++n}.sock`);
    fake = await startFakeFirecracker({ socketPath, id: 'snap' });
    const api = new FirecrackerApi(socketPath);
    await api.put('/boot-source', { kernel_image_path: kernel });
    await api.put('/drives/rootfs', { drive_id: 'rootfs', is_root_device: true, is_read_only: false, path_on_host: kernel });
    await api.put('/network-interfaces/eth0', { iface_id: 'eth0', host_dev_name: 'bgtap1' });
    await api.put('/actions', { action_type: 'InstanceStart' });
    return { api, dir: await mkdtemp(join(root, 'snap-')) };
  };

  it('the fake creates a snapshot only of a paused microVM, from documented fields only, and answers 204', async () => {
    const { api, dir } = await booted();
    const files = { snapshot_path: join(dir, 'vm.snap'), mem_file_path: join(dir, 'vm.mem') };
    expect((await fault(api.put('/snapshot/create', files))).faultMessage).toMatch(/not paused/);
    expect((await fault(api.patch('/vm', { state: 'Stopped' }))).faultMessage).toMatch(/state/);
    await api.patch('/vm', { state: 'Paused' });
    expect((await api.describe()).state).toBe('Paused');
    expect((await fault(api.put('/snapshot/create', { ...files, version: '1.0.0' }))).faultMessage).toMatch(/unknown field `version`/);
    expect((await fault(api.put('/snapshot/create', { snapshot_path: files.snapshot_path }))).faultMessage).toMatch(/mem_file_path/);
    expect((await fault(api.put('/snapshot/create', { ...files, snapshot_type: 'Diff' }))).faultMessage).toMatch(/dirty page tracking/);
    expect((await fault(api.put('/snapshot/create', { ...files, snapshot_path: join(dir, 'no', 'vm.snap') }))).faultMessage).toMatch(/No such file/);
    await api.put('/snapshot/create', { ...files, snapshot_type: 'Full' });
    expect(existsSync(files.snapshot_path) && existsSync(files.mem_file_path)).toBe(true);
    expect(fake!.find('PUT', '/snapshot/create').map((r) => r.status)).toEqual([400, 400, 400, 400, 400, 204]);
  });

  it('the fake loads a snapshot only into an unconfigured microVM, with exactly one memory backend', async () => {
    const { api, dir } = await booted();
    const files = { snapshot_path: join(dir, 'vm.snap'), mem_file_path: join(dir, 'vm.mem') };
    await api.patch('/vm', { state: 'Paused' });
    await api.put('/snapshot/create', files);
    expect((await fault(api.put('/snapshot/load', { snapshot_path: files.snapshot_path, mem_backend: { backend_type: 'File', backend_path: files.mem_file_path } }))).faultMessage).toMatch(
      /not supported after starting/,
    );
    await fake!.close();
    fake!.unlinkSockets();
    const socketPath = join(root, `s${++n}.sock`);
    fake = await startFakeFirecracker({ socketPath, id: 'snap2' });
    const fresh = new FirecrackerApi(socketPath);
    const mem_backend = { backend_type: 'File', backend_path: files.mem_file_path };
    expect((await fault(fresh.put('/snapshot/load', { snapshot_path: files.snapshot_path }))).faultMessage).toMatch(/mem_backend.*mem_file_path/);
    expect((await fault(fresh.put('/snapshot/load', { snapshot_path: files.snapshot_path, mem_backend, mem_file_path: files.mem_file_path }))).faultMessage).toMatch(/not both/);
    expect((await fault(fresh.put('/snapshot/load', { snapshot_path: files.snapshot_path, mem_backend: { ...mem_backend, backend_type: 'Disk' } }))).faultMessage).toMatch(/backend_type/);
    expect((await fault(fresh.put('/snapshot/load', { snapshot_path: files.snapshot_path, mem_backend, resume: true }))).faultMessage).toMatch(/unknown field `resume`/);
    expect((await fault(fresh.put('/snapshot/load', { snapshot_path: join(dir, 'absent'), mem_backend }))).faultMessage).toMatch(/No such file/);
    expect((await fault(fresh.put('/snapshot/load', { snapshot_path: files.mem_file_path, mem_backend }))).faultMessage).toMatch(/invalid snapshot file/);
    await fresh.put('/snapshot/load', { snapshot_path: files.snapshot_path, mem_backend, resume_vm: false, network_overrides: [{ iface_id: 'eth0', host_dev_name: 'bgtap2' }] });
    expect((await fresh.describe()).state).toBe('Paused');
    expect(fake!.ifaces.get('eth0')?.host_dev_name).toBe('bgtap2');
    expect((await fault(fresh.put('/snapshot/load', { snapshot_path: files.snapshot_path, mem_backend }))).faultMessage).toMatch(/after starting/);
    await fresh.patch('/vm', { state: 'Resumed' });
    expect((await fresh.describe()).state).toBe('Running');
  });

  /** A VM's disks with content of its own, an identity disk, and a TAP of its own. */
  const vmWithDisks = async (tap: string) => {
    const spec = await makeVm({ net: { mode: 'tap', tap, mac: '' } });
    spec.net = { mode: 'tap', tap, mac: macForVm(spec.id) };
    spec.identityDisk = join(spec.vmDir, 'identity.tar');
    for (const f of [spec.rootDisk, spec.workDisk, spec.identityDisk]) await writeFile(f, `${spec.id} ${f}`);
    return spec;
  };
  const links = (dir: string) => ({ rootfs: join(dir, 'drive-rootfs'), work: join(dir, 'drive-work'), identity: join(dir, 'drive-identity') });
  /** Points the snapshot's drive links at a VM's own disks, as banger does before each load. */
  const pointLinks = async (dir: string, spec: LaunchSpec) => {
    const l = links(dir);
    for (const [link, target] of [[l.rootfs, spec.rootDisk], [l.work, spec.workDisk], [l.identity, spec.identityDisk!]] as const) {
      await rm(link, { force: true });
      await symlink(target, link);
    }
  };
  const ownFiles = (spec: LaunchSpec) => ({ rootfs: spec.rootDisk, work: spec.workDisk, identity: spec.identityDisk });

  it('the fake restores drives and the vsock at their recorded paths: a missing disk fails, a bound socket collides, vsock_override needs 1.16', async () => {
    const { api, dir } = await booted();
    const vsockDir = await mkdtemp(join(root, 'vs-'));
    const disk = join(dir, 'disk');
    await writeFile(disk, 'd');
    await api.patch('/drives/rootfs', { drive_id: 'rootfs', path_on_host: disk });
    expect(fake!.find('PATCH', '/drives/rootfs')[0].opened).toEqual({ rootfs: disk });
    // the source's vsock (set directly: PUT /vsock is pre-boot only), whose socket is still there at the load
    fake!.vsock = { guest_cid: 3, uds_path: join(vsockDir, 'src.vsock') };
    await writeFile(join(vsockDir, 'src.vsock'), '');
    await api.patch('/vm', { state: 'Paused' });
    const files = { snapshot_path: join(dir, 'vm.snap'), mem_file_path: join(dir, 'vm.mem') };
    await api.put('/snapshot/create', files);
    const load = { snapshot_path: files.snapshot_path, mem_backend: { backend_type: 'File', backend_path: files.mem_file_path } };
    const fresh = async (vmmVersion?: string) => {
      await fake!.close();
      fake!.unlinkSockets();
      fake = await startFakeFirecracker({ socketPath: join(root, `s${++n}.sock`), id: 'fresh', vmmVersion });
      return new FirecrackerApi(fake.options.socketPath);
    };
    let f = await fresh();
    expect((await fault(f.put('/snapshot/load', { ...load, vsock_override: { uds_path: join(vsockDir, 'fork.vsock') } }))).faultMessage).toMatch(/unknown field `vsock_override`/);
    expect((await fault(f.put('/snapshot/load', load))).faultMessage).toMatch(/Vsock.*Address in use/);
    f = await fresh('1.16.0');
    await rm(disk);
    expect((await fault(f.put('/snapshot/load', { ...load, vsock_override: { uds_path: join(vsockDir, 'fork.vsock') } }))).faultMessage).toMatch(/drive rootfs.*No such file/);
    await writeFile(disk, 'd2');
    await f.put('/snapshot/load', { ...load, vsock_override: { uds_path: join(vsockDir, 'fork.vsock') } });
    expect(fake!.find('PUT', '/snapshot/load').at(-1)!.opened).toEqual({ rootfs: disk, vsock: join(vsockDir, 'fork.vsock') });
  });

  it('the driver snapshots a VM whose drives it points at links, then restores two forks, each on its own disks, TAP and vsock socket', async () => {
    const bin = await makeBinary({ FAKE_FC_VERSION: '1.16.0' });
    const lines: string[] = [];
    const driver = createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS, log: (l) => lines.push(l) });
    const source = await vmWithDisks('bgtap3');
    const proc = await driver.launch(source);
    launched.push(proc);
    expect(readRecord(bin.record).find((r) => r.path === '/drives/identity')?.body).toEqual({ drive_id: 'identity', path_on_host: source.identityDisk, is_root_device: false, is_read_only: true });
    const dir = await mkdtemp(join(root, 'snap-'));
    await pointLinks(dir, source);
    const files = { snapshotPath: join(dir, 'state.bin'), memFilePath: join(dir, 'memory.bin') };
    const before = readRecord(bin.record).length;
    await driver.redirectDrives(proc, links(dir));
    await driver.createSnapshot(proc, files);
    await driver.resume(proc);
    await driver.redirectDrives(proc, ownFiles(source));
    const saved = readRecord(bin.record).slice(before).filter((r) => r.method !== 'GET');
    expect(saved.map((r) => [r.method, r.path, r.status, r.opened])).toEqual([
      ['PATCH', '/drives/rootfs', 204, { rootfs: source.rootDisk }],
      ['PATCH', '/drives/work', 204, { work: source.workDisk }],
      ['PATCH', '/drives/identity', 204, { identity: source.identityDisk }],
      ['PATCH', '/vm', 204, undefined],
      ['PUT', '/snapshot/create', 204, undefined],
      ['PATCH', '/vm', 204, undefined],
      ['PATCH', '/drives/rootfs', 204, { rootfs: source.rootDisk }],
      ['PATCH', '/drives/work', 204, { work: source.workDisk }],
      ['PATCH', '/drives/identity', 204, { identity: source.identityDisk }],
    ]);
    expect(saved[1].body).toEqual({ drive_id: 'work', path_on_host: links(dir).work });
    expect((await driver.status(proc)).state).toBe('running');

    // Two forks, the source still running: each load reopens the links, pointed at that fork's own disks just before.
    const forks = [await vmWithDisks('bgtap4'), await vmWithDisks('bgtap5')];
    for (const fork of forks) {
      await pointLinks(dir, fork);
      const bin2 = await makeBinary({ FAKE_FC_VERSION: '1.16.0' });
      const restored = await createFirecrackerDriver({ binary: bin2.path, readyTimeoutMs: READY_MS }).loadSnapshot(fork, files);
      launched.push(restored);
      const reqs = readRecord(bin2.record).filter((r) => r.method !== 'GET');
      const vsock = join(fork.runDir, `${firecrackerId(fork.id)}.vsock`);
      const load = reqs.find((r) => r.path === '/snapshot/load')!;
      expect(load.body).toEqual({
        snapshot_path: files.snapshotPath,
        mem_backend: { backend_type: 'File', backend_path: files.memFilePath },
        resume_vm: true,
        network_overrides: [{ iface_id: 'eth0', host_dev_name: fork.net.mode === 'tap' ? fork.net.tap : '' }],
        vsock_override: { uds_path: vsock },
      });
      expect(load.opened).toEqual({ rootfs: fork.rootDisk, work: fork.workDisk, identity: fork.identityDisk, vsock });
      // then each drive is reopened at the fork's own path, so that the links can move on to the next fork
      const anchored = reqs.filter((r) => r.method === 'PATCH').map((r) => [r.path, (r.body as { path_on_host: string }).path_on_host, r.status]);
      expect(anchored).toEqual([['/drives/rootfs', fork.rootDisk, 204], ['/drives/work', fork.workDisk, 204], ['/drives/identity', fork.identityDisk, 204]]);
      expect(reqs.every((r) => r.status < 300)).toBe(true);
    }
  }, SLOW);

  it('refuses to restore on a Firecracker older than 1.16, naming the version and the fix, and leaves no process behind', async () => {
    const bin = await makeBinary({ FAKE_FC_VERSION: '1.15.1' });
    const spec = await vmWithDisks('bgtap6');
    const dir = await mkdtemp(join(root, 'snap-'));
    const files = { snapshotPath: join(dir, 'state.bin'), memFilePath: join(dir, 'memory.bin') };
    const e = await errorOf(createFirecrackerDriver({ binary: bin.path, readyTimeoutMs: READY_MS }).loadSnapshot(spec, files));
    expect(e.message).toMatch(/^Firecracker launch failed at step check-load-version: Firecracker 1\.15\.1 cannot restore a banger snapshot: .*vsock_override/);
    expect(e.hint).toMatch(/Firecracker 1\.16 or later/);
    expect(readRecord(bin.record).some((r) => r.path === '/snapshot/load')).toBe(false);
    expect(existsSync(join(spec.vmDir, 'vmm.pid'))).toBe(false);
  }, SLOW);

  it('handler lists can be edited by name before a launch', async () => {
    const bin = await makeBinary();
    const driver = createFirecrackerDriver({
      binary: bin.path,
      readyTimeoutMs: READY_MS,
      handlers: (h) => {
        h.config.remove('vsock');
        expect(h.config.swap({ name: 'machine-config', fn: (c) => c.api.put('/machine-config', { vcpu_count: 1, mem_size_mib: 256 }) })).toBe(true);
        return h;
      },
    });
    const proc = await driver.launch(await makeVm());
    launched.push(proc);
    const puts = readRecord(bin.record).filter((r) => r.method !== 'GET');
    expect(puts.map((r) => r.path)).toEqual(['/machine-config', '/boot-source', '/drives/rootfs', '/drives/work', '/network-interfaces/eth0', '/actions']);
    expect(puts[0].body).toEqual({ vcpu_count: 1, mem_size_mib: 256 });
    await driver.kill(proc);
  }, SLOW);
});
