import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { createQemuDriver, eventsSocketPath, identifyPid, QmpClient, startDaemonized, type VmmProcess } from '../../src/host/vmm/qemu/qemu.js';
import { which } from '../../src/host/exec/runner.js';
import { within } from '../support/wait.js';

const qemuBin = process.env.BANGER_QEMU_BIN ?? 'qemu-system-x86_64';
const found = await which(qemuBin);
const skipReason = !found && process.env.CI !== 'true' ? `${qemuBin} not found on PATH (install qemu-system-x86)` : undefined;
if (skipReason) console.warn(`skipping QMP integration tests: ${skipReason}`);

const started: VmmProcess[] = [];
let dir: string;

/** A paused (-S), disk-less microvm under TCG, daemonized exactly as the driver does it. */
async function startPaused(id: string): Promise<VmmProcess> {
  const qmpSocket = join(dir, `${id}.qmp`);
  const pidFile = join(dir, `${id}.pid`);
  const argv = [
    '-name', `banger-${id}`,
    '-M', 'microvm,acpi=on',
    '-accel', 'tcg',
    '-nodefaults', '-no-user-config', '-display', 'none',
    '-m', '64',
    '-S',
    '-qmp', `unix:${qmpSocket},server=on,wait=off`,
    '-qmp', `unix:${eventsSocketPath(qmpSocket)},server=on,wait=off`,
    '-pidfile', pidFile,
    '-daemonize',
  ];
  const proc = await startDaemonized(qemuBin, argv, { pidFile, qmpSocket }, { timeoutMs: 20_000 });
  started.push(proc);
  return proc;
}

/**
 * Resolves once waitExit's watcher holds a working events monitor for `proc`: its first command there (the
 * query-status that looks for an I/O-error pause) has been answered. Call it before waitExit.
 */
function watcherReady(proc: VmmProcess): Promise<void> {
  const events = eventsSocketPath(proc.qmpSocket);
  const execute = QmpClient.prototype.execute;
  const ready = new Promise<void>((resolve) => {
    const spy = vi.spyOn(QmpClient.prototype, 'execute').mockImplementation(async function (this: QmpClient, ...args: Parameters<QmpClient['execute']>) {
      const answer = await execute.apply(this, args);
      if (this.path === events) {
        spy.mockRestore();
        resolve();
      }
      return answer;
    } as QmpClient['execute']);
  });
  return within('waitExit to attach to the events monitor', ready);
}

describe.skipIf(!!skipReason)('QEMU driver against a real QEMU (paused, no guest)', () => {
  const driver = createQemuDriver();

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'bqmp-'));
  });
  afterAll(async () => {
    for (const p of started) {
      if ((await identifyPid(p.pid, p.qmpSocket)).id === 'ours') process.kill(p.pid, 'SIGKILL');
    }
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('talks QMP, reports paused, stops by kill, and waitExit sees it go', { timeout: 30_000 }, async () => {
    const proc = await startPaused('vmA');
    expect(proc.pid).toBeGreaterThan(1);
    expect((await identifyPid(proc.pid, proc.qmpSocket)).id).toBe('ours');

    const qmp = await QmpClient.connect(proc.qmpSocket, { timeoutMs: 5000 });
    expect(qmp.greeting).toHaveProperty('version');
    expect(await qmp.execute('query-status', undefined, { timeoutMs: 5000 })).toMatchObject({ status: 'prelaunch', running: false });
    await expect(qmp.execute('no-such-command', undefined, { timeoutMs: 5000 })).rejects.toThrow(/CommandNotFound/);
    qmp.close();
    await qmp.closed;

    const st = await driver.status(proc);
    expect(st.state).toBe('paused');
    expect(st.reasons.join()).toContain('prelaunch');

    const ac = new AbortController();
    const attached = watcherReady(proc);
    const exited = driver.waitExit(proc, ac.signal);
    // status must still work while the watcher holds the events monitor
    await attached;
    expect((await driver.status(proc)).state).toBe('paused');

    // A guest that is not running ignores the ACPI button: the stop has to fall back to SIGKILL.
    expect(await driver.stop(proc, { timeoutMs: 1000 })).toBe('killed');
    const ex = await within('waitExit to see QEMU gone', exited);
    expect(ex.reason).toBe('process exited');

    expect(await driver.status(proc)).toMatchObject({ state: 'gone' });
    expect(await driver.stop(proc, { timeoutMs: 1000 })).toBe('already-gone');
    await driver.kill(proc); // no-op when gone
    expect(await driver.waitExit(proc, new AbortController().signal)).toEqual({ reason: 'process not running' });
  });

  it('reports the SHUTDOWN reason to waitExit', { timeout: 30_000 }, async () => {
    const proc = await startPaused('vmB');
    const attached = watcherReady(proc);
    const exited = driver.waitExit(proc, new AbortController().signal);
    await attached; // else QEMU could be gone before the watcher ever saw its SHUTDOWN event
    const qmp = await QmpClient.connect(proc.qmpSocket, { timeoutMs: 5000 });
    await qmp.execute('quit', undefined, { timeoutMs: 5000 }).catch(() => undefined);
    await within('QEMU to close the monitor after quit', qmp.closed);
    const ex = await within('waitExit to see QEMU gone', exited);
    expect(ex).toMatchObject({ reason: 'shutdown: host-qmp-quit', shutdownReason: 'host-qmp-quit', guest: false });
  });

  it('refuses to treat a reused pid as the VM', { timeout: 10_000 }, async () => {
    const fake: VmmProcess = { pid: process.pid, qmpSocket: join(dir, 'nobody.qmp') };
    expect((await identifyPid(fake.pid, fake.qmpSocket)).id).toBe('other');
    const st = await driver.status(fake);
    expect(st.state).toBe('gone');
    expect(st.reasons[0]).toMatch(/another program/);
    expect(await driver.stop(fake, { timeoutMs: 100 })).toBe('already-gone');
    await driver.kill(fake); // must not kill the test runner
  });

  it('waitExit honours its abort signal', { timeout: 10_000 }, async () => {
    const proc = await startPaused('vmC');
    const ac = new AbortController();
    const attached = watcherReady(proc);
    const p = driver.waitExit(proc, ac.signal);
    p.catch(() => undefined); // observed below; keep it from counting as unhandled meanwhile
    await attached; // abort while it is watching, not before it started
    ac.abort(new Error('enough'));
    await expect(p).rejects.toSatisfy((e) => e instanceof BangerError && e.kind === 'aborted');
    await driver.kill(proc);
    expect((await identifyPid(proc.pid, proc.qmpSocket)).id).toBe('gone');
  });

  it('turns a QEMU start failure into a host error and leaves nothing running', { timeout: 30_000 }, async () => {
    const vmDir = join(dir, 'bad');
    const notAKernel = join(dir, 'not-a-kernel');
    const { writeFile } = await import('node:fs/promises');
    await writeFile(notAKernel, 'this is not a kernel\n');
    await writeFile(join(dir, 'r.img'), Buffer.alloc(1 << 20));
    const err = await driver
      .launch(
        {
          id: 'bad',
          vmDir,
          runDir: dir,
          kernel: notAKernel,
          cmdline: 'console=ttyS0',
          rootDisk: join(dir, 'r.img'),
          workDisk: join(dir, 'r.img'),
          vcpus: 1,
          memoryMiB: 64,
          accel: 'tcg',
          net: { mode: 'user', sshPort: 1 + (process.pid % 20000) + 40000 },
          serialLog: join(vmDir, 'serial.log'),
        },
        {},
      )
      .catch((e) => e);
    expect(err).toBeInstanceOf(BangerError);
    expect((err as BangerError).kind).toBe('host');
    expect((err as BangerError).message).toMatch(/QEMU failed to start/);
  });
});
