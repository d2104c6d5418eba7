/**
 * Durations the test suite used to bound (and so failed under load): measured here and printed, never asserted.
 * None of these boots a guest; `probe` boots the test image's kernel under KVM when /dev/kvm exists.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { execa } from 'execa';
import { createFirecrackerDriver } from '../src/host/vmm/firecracker/firecracker.js';
import { macForVm } from '../src/host/net/net.js';
import { createQemuDriver, eventsSocketPath, probeKvm, startDaemonized, type LaunchSpec } from '../src/host/vmm/qemu/qemu.js';
import { prepareWorkspace, type GuestExec } from '../src/host/guest/workspace.js';
import { exportWorkspace } from '../src/host/guest/workspace-export.js';
import { gitTestEnv } from '../test/support/git.js';
import { makeFakeFirecracker } from '../test/support/fake-firecracker-cli.js';

type Line = (k: string, v: string) => void;
const ms = (n: number) => (n >= 1000 ? `${(n / 1000).toFixed(2)} s` : `${n.toFixed(0)} ms`);
const time = async <T>(f: () => Promise<T>): Promise<[T, number]> => {
  const t0 = performance.now();
  const r = await f();
  return [r, performance.now() - t0];
};

/** A "guest" that is this host: `sh -c command` with stdin piped (as the workspace integration tests use). */
const localGuest: GuestExec = (command, opts = {}) =>
  new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', command], { detached: true, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.stdin.on('error', () => {});
    const stdin = opts.stdin;
    if (stdin === undefined || typeof stdin === 'string' || Buffer.isBuffer(stdin)) child.stdin.end(stdin);
    else (stdin as Readable).pipe(child.stdin);
    const onAbort = () => {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        /* gone */
      }
    };
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    child.on('error', reject);
    child.on('close', (code) => {
      opts.signal?.removeEventListener('abort', onAbort);
      if (opts.signal?.aborted) reject(new Error('aborted'));
      else resolve({ exitCode: code ?? 1, stdout: Buffer.concat(out), stderr: Buffer.concat(err) });
    });
  });

const git = (cwd: string, args: string[], input?: string) => execa('git', ['-C', cwd, ...args], { env: gitTestEnv({ GIT_CONFIG_GLOBAL: '/dev/null' }), input });

/** Workspace prepare/export of 10,000 files against a local guest, and how fast an abort mid-stream returns. */
export async function benchLocalWorkspace(line: Line): Promise<void> {
  console.log('workspace against a local guest: 10,000 files (prepare, export), abort mid-stream');
  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const work = await mkdtemp(join(base, 'bgb-10k-'));
  try {
    const repo = join(work, 'repo');
    await mkdir(repo);
    await git(repo, ['init', '-q', '-b', 'main']);
    const chunks = ['commit refs/heads/main\ncommitter Bench <bench@banger.invalid> 1704067200 +0000\ndata 3\n10k\n'];
    for (let d = 0; d < 100; d++) {
      for (let f = 0; f < 100; f++) chunks.push(`M 100644 inline d${d}/f${f}.txt\ndata ${`file ${d}/${f}\n`.length}\nfile ${d}/${f}\n\n`);
    }
    await git(repo, ['fast-import', '--quiet'], chunks.join(''));
    await git(repo, ['checkout', '-q', '-f', 'main']);
    await writeFile(join(repo, 'd0/f0.txt'), 'changed on the host\n');
    const dest = join(work, 'guest', 'repo');
    const [prep, tPrep] = await time(() => prepareWorkspace(localGuest, { source: repo, guestPath: dest, mode: 'shallow', readOnly: false }));
    if ((await readdir(join(dest, 'd99'))).length !== 100) throw new Error('prepare lost files');
    for (let i = 0; i < 10; i++) await writeFile(join(dest, `d${i}`, 'f1.txt'), `guest ${i}\n`);
    const [x, tExport] = await time(() => exportWorkspace(localGuest, { guestPath: dest, baseCommit: prep.baseCommit }));
    line(`prepare (${(prep.bytesStreamed / 1024).toFixed(0)} KiB streamed)`, ms(tPrep));
    line(`export (${x.changedFiles.length} files changed, patch ${x.patch.length} bytes)`, ms(tExport));

    for (let i = 0; i < 4; i++) await writeFile(join(repo, `blob-${i}.bin`), randomBytes(2 * 2 ** 20));
    await git(repo, ['add', '-A']);
    await git(repo, ['commit', '-qm', 'big']);
    const ac = new AbortController();
    let abortedAt = 0;
    const streaming: GuestExec = (command, opts = {}) => {
      const stdin = opts.stdin as Readable | undefined;
      stdin?.once?.('data', () => {
        abortedAt = performance.now();
        ac.abort();
      });
      return localGuest(command, opts);
    };
    await prepareWorkspace(streaming, { source: repo, guestPath: join(work, 'guest', 'aborted'), mode: 'shallow', readOnly: false }, { signal: ac.signal }).catch(() => undefined);
    line('abort mid-stream → prepare rejects', ms(performance.now() - abortedAt));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** QEMU (paused, no guest: ignores the ACPI button) stopped with a 1 s grace period; the KVM probe's verdicts. */
export async function benchVmmTimings(line: Line, kernelDir: string): Promise<void> {
  console.log('VMM timings: QEMU stop falling back to SIGKILL, KVM probe verdicts');
  const dir = await mkdtemp(join(tmpdir(), 'bgb-vmm-'));
  try {
    const qmpSocket = join(dir, 'b.qmp');
    const pidFile = join(dir, 'b.pid');
    const argv = ['-name', 'banger-bench', '-M', 'microvm,acpi=on', '-accel', 'tcg', '-nodefaults', '-no-user-config', '-display', 'none', '-m', '64', '-S',
      '-qmp', `unix:${qmpSocket},server=on,wait=off`, '-qmp', `unix:${eventsSocketPath(qmpSocket)},server=on,wait=off`, '-pidfile', pidFile, '-daemonize'];
    const proc = await startDaemonized(process.env.BANGER_QEMU_BIN ?? 'qemu-system-x86_64', argv, { pidFile, qmpSocket }, { timeoutMs: 60_000 });
    const [how, tStop] = await time(() => createQemuDriver().stop(proc, { timeoutMs: 1000 }));
    line(`QEMU stop, paused guest, 1 s grace (${how})`, ms(tStop));

    const hang = join(dir, 'qemu-hang');
    await writeFile(hang, '#!/bin/sh\nexec sleep 600\n');
    await chmod(hang, 0o755);
    const [v, tHang] = await time(() => probeKvm({ kernel: hang, cacheFile: join(dir, 'hang.json'), kvmDevice: '/dev/null', qemuBin: hang, timeoutMs: 1000 }));
    line(`KVM probe, a VM that never prints, 1 s bound (usable=${v.usable})`, ms(tHang));

    const kernel = join(kernelDir, 'vmlinuz');
    if (!existsSync(kernel)) return line('KVM probe with the test image kernel', `skipped: no ${kernel}`);
    const opts = { kernel, initrd: join(kernelDir, 'initrd.img'), cacheFile: join(dir, 'kvm.json'), timeoutMs: 20_000 };
    const [first, t1] = await time(() => probeKvm(opts));
    const [, t2] = await time(() => probeKvm(opts));
    line(`KVM probe, real kernel (usable=${first.usable})`, ms(t1));
    line('KVM probe, again (from the cache when a probe boot ran)', ms(t2));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The Firecracker driver against the fake: graceful stop, SIGKILL after a 600 ms grace, an exit before the socket. */
export async function benchFirecrackerFake(line: Line): Promise<void> {
  console.log('Firecracker driver against the fake API server (node + tsx: slower to start than Firecracker)');
  const root = await mkdtemp(join(tmpdir(), 'bgb-fc-'));
  let n = 0;
  const binary = async (env: Record<string, string> = {}) => (await makeFakeFirecracker(join(root, `firecracker-${++n}`), env)).path;
  const vm = async (): Promise<LaunchSpec> => {
    const id = `vm${++n}_b`;
    const vmDir = join(root, 'vms', id);
    await mkdir(vmDir, { recursive: true });
    for (const f of ['vmlinux', 'initrd.img', 'rootfs.ext4', 'work.ext4']) await writeFile(join(vmDir, f), 'x');
    return { id, vmDir, runDir: join(root, 'run'), kernel: join(vmDir, 'vmlinux'), initrd: join(vmDir, 'initrd.img'), cmdline: 'console=ttyS0', rootDisk: join(vmDir, 'rootfs.ext4'), workDisk: join(vmDir, 'work.ext4'), vcpus: 1, memoryMiB: 128, accel: 'kvm', net: { mode: 'tap', tap: 'bgtap9', mac: macForVm(id) }, serialLog: join(vmDir, 'serial.log') };
  };
  try {
    await mkdir(join(root, 'run'), { recursive: true });
    const graceful = createFirecrackerDriver({ binary: await binary(), readyTimeoutMs: 60_000 });
    const [p1, tLaunch] = await time(async () => graceful.launch(await vm()));
    const [how1, tStop1] = await time(() => graceful.stop(p1, { timeoutMs: 10_000 }));
    line('launch (fake)', ms(tLaunch));
    line(`stop, guest obeys SendCtrlAltDel (${how1})`, ms(tStop1));
    const stubborn = createFirecrackerDriver({ binary: await binary({ FAKE_FC_IGNORE_CTRL_ALT_DEL: '1' }), readyTimeoutMs: 60_000 });
    const p2 = await stubborn.launch(await vm());
    const [how2, tStop2] = await time(() => stubborn.stop(p2, { timeoutMs: 600 }));
    line(`stop, guest ignores it, 600 ms grace (${how2})`, ms(tStop2));
    const failing = createFirecrackerDriver({ binary: await binary({ FAKE_FC_FAIL_AT_START: 'Error creating the Kvm object' }), readyTimeoutMs: 20_000 });
    const [, tFail] = await time(async () => failing.launch(await vm()).catch((e: Error) => e));
    line('exit before the API socket answers → launch rejects (bound 20 s)', ms(tFail));
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}
