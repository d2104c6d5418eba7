/**
 * What a prepare reports and stores through the workspace cache (src/daemon/workspace-cache.ts), with a scripted
 * guest (it records commands; nothing is frozen on this host) and a real ext4 image as the VM's work disk:
 * off / miss (the disk stored, /root frozen and thawed around the copy) / hit (only with a cached disk and the
 * workspace found at the key's HEAD) / the retry as a miss when the cached workspace does not check out.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { configSchema } from '../../src/config.js';
import { layout as makeLayout } from '../../src/paths.js';
import { prepareThroughCache, vmWorkspaceKey, workspaceCacheOf } from '../../src/daemon/workspace-cache.js';
import { cowRecordPath } from '../../src/host/disk/disks.js';
import { BangerError } from '../../src/errors.js';
import { run } from '../../src/host/exec/runner.js';
import type { GuestExec, WorkspacePrepareResult } from '../../src/host/guest/workspace.js';
import type { VmSpec } from '../../src/machines/vm.machine.js';

const sh = promisify(execFile);
const gitEnv = { ...process.env, GIT_AUTHOR_NAME: 't', GIT_AUTHOR_EMAIL: 't@x', GIT_COMMITTER_NAME: 't', GIT_COMMITTER_EMAIL: 't@x', GIT_CONFIG_NOSYSTEM: '1', HOME: '/nonexistent' };

let tmp: string;
let repo: string;
let head: string;
let env: { layout: ReturnType<typeof makeLayout>; config: ReturnType<typeof configSchema.parse>; runner: typeof run };
let workDisk: string;

const spec = (workspace?: VmSpec['workspace']): VmSpec => ({
  image: 'img', vcpus: 1, memoryMiB: 256, diskBytes: 64 * 2 ** 20, vmm: 'qemu', accel: 'tcg', net: 'user', start: true,
  bootTimeoutMs: 1000, stopTimeoutMs: 1000, ...(workspace ? { workspace } : {}),
});

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'bg-wscp-'));
  repo = join(tmp, 'repo');
  await mkdir(repo);
  await sh('git', ['init', '-q', '-b', 'main'], { cwd: repo, env: gitEnv });
  await writeFile(join(repo, 'a.txt'), 'a\n');
  await sh('git', ['add', '-A'], { cwd: repo, env: gitEnv });
  await sh('git', ['commit', '-qm', 'one'], { cwd: repo, env: gitEnv });
  head = (await sh('git', ['rev-parse', 'HEAD'], { cwd: repo, env: gitEnv })).stdout.trim();
  const home = join(tmp, 'home');
  const img = join(home, 'images', 'img');
  await mkdir(img, { recursive: true });
  await writeFile(join(img, 'manifest.json'), JSON.stringify({
    name: 'img', createdAt: new Date().toISOString(), suite: 'bookworm', builderVersion: 2, identity: 'work-disk', kernel: 'vmlinuz',
    rootfs: 'rootfs.ext4', workSeed: 'work-seed.ext4', packages: 0, sizeBytes: 1, files: {},
  }));
  await writeFile(join(img, 'work-seed.ext4'), 'seed');
  env = { layout: makeLayout({ BANGER_HOME: home, BANGER_RUNTIME_DIR: join(tmp, 'run'), BANGER_CACHE_DIR: join(tmp, 'cache') }), config: configSchema.parse({}), runner: run };
  workDisk = join(tmp, 'work.ext4');
  await sh('mkfs.ext4', ['-F', '-q', workDisk, '32M']);
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function scriptedGuest() {
  const commands: string[] = [];
  const guest: GuestExec = async (command) => {
    commands.push(command);
    return { exitCode: 0, stdout: Buffer.from(command.includes('fsfreeze -f') ? 'frozen\n' : ''), stderr: Buffer.alloc(0) };
  };
  return { guest, commands };
}

const result = (over: Partial<WorkspacePrepareResult> = {}): WorkspacePrepareResult => ({
  sourcePath: repo, repoRoot: repo, repoName: 'repo', guestPath: '/root/repo', mode: 'shallow', readOnly: false, readOnlyMount: false,
  headCommit: head, currentBranch: 'main', branchName: 'main', baseCommit: head, preparedAt: new Date().toISOString(),
  bytesStreamed: 1000, bytesSent: 1000, cache: 'off', incremental: false, ...over,
});

const request = { source: '', mode: 'shallow' as const, guestPath: '/root/repo', plain: true };
/** A resume point as a prepare returns it: the marker it wrote and the delta it laid over HEAD. */
const point = { marker: '{"headCommit":"x"}', delta: { send: Buffer.from('a.txt\0b\xff.txt\0', 'latin1'), deleted: Buffer.from('gone\0') } };

async function keyFor(): Promise<string> {
  const k = await vmWorkspaceKey(env, spec(), { ...request, source: repo });
  if (k.key === null) throw new Error(k.why);
  return k.key;
}

describe('prepareThroughCache', { timeout: 60_000 }, () => {
  it('off for a VM not made for a workspace; miss stores the disk with /root frozen around the copy; later prepares are off', async () => {
    const io = (g: GuestExec) => ({ guest: g, signal: new AbortController().signal, progress: () => {} });
    const plain = scriptedGuest();
    const off = await prepareThroughCache(env, { id: 'vm0', spec: spec(), workDisk }, { ...request, source: repo }, io(plain.guest), async () => result());
    expect(off.cache).toBe('off');
    expect(plain.commands).toEqual([]);

    const key = await keyFor();
    const g = scriptedGuest();
    const missCalls: Array<{ resumeWhen?: Promise<boolean> }> = [];
    const miss = await prepareThroughCache(env, { id: 'vm1', spec: spec({ key }), workDisk }, { ...request, source: repo }, io(g.guest), async (how) => {
      missCalls.push(how);
      return result({ resumePoint: point });
    });
    expect(missCalls).toEqual([{ replace: undefined, resume: undefined, resumeWhen: expect.any(Promise) }]);
    expect(miss.cache).toBe('miss');
    expect(miss.warnings).toBeUndefined();
    expect(g.commands.map((c) => (c.includes('fsfreeze -f') ? 'freeze' : c.includes('fsfreeze -u') ? 'thaw' : c))).toEqual(['freeze', 'thaw']);
    const entries = await workspaceCacheOf(env.layout, env.config).list();
    expect(entries.map((e) => e.key)).toEqual([key]);
    expect(entries[0].parts.headCommit).toBe(head);
    expect(entries[0].resume).toEqual(point);

    const again = await prepareThroughCache(env, { id: 'vm1', spec: spec({ key }), workDisk }, { ...request, source: repo }, io(g.guest), async () => result());
    expect(again.cache).toBe('off');
  });

  it('hit only when the VM has the cached disk and the guest workspace was at the key\'s HEAD; a full copy warns', async () => {
    const key = await keyFor();
    const io = { guest: scriptedGuest().guest, signal: new AbortController().signal, progress: () => {} };
    const cachedDisk = (await workspaceCacheOf(env.layout, env.config).lookup(key))!.disk;
    const clone = join(tmp, 'clone.ext4');
    await sh('cp', [workDisk, clone]);
    await writeFile(cowRecordPath(clone), 'sparse-copy\n');
    const vm = { id: 'vm2', spec: spec({ key, cachedDisk }), workDisk: clone };
    const given: Array<{ resume?: unknown; resumeWhen?: Promise<boolean> }> = [];
    const hit = await prepareThroughCache(env, vm, { ...request, source: repo }, io, async (how) => {
      given.push(how);
      return result({ incremental: true, previousHead: head, bytesSent: 40 });
    });
    expect(given).toEqual([{ replace: undefined, resume: point, resumeWhen: expect.any(Promise) }]);
    expect(await given[0].resumeWhen).toBe(true); // the key still matches: the resume may go ahead
    expect(hit.cache).toBe('hit');
    expect(hit.warnings?.[0]).toMatch(/copied in full/);

    const wrongHead = await prepareThroughCache(env, { ...vm, id: 'vm3' }, { ...request, source: repo }, io, async () => result({ incremental: true, previousHead: '1'.repeat(40) }));
    expect(wrongHead.cache).toBe('miss');

    // the cached workspace is not there as expected (the path holds something else): replaced, a miss
    const calls: Array<boolean | undefined> = [];
    const retried = await prepareThroughCache(env, { ...vm, id: 'vm4' }, { ...request, source: repo }, io, async ({ replace }) => {
      calls.push(replace);
      if (!replace) throw new BangerError('conflict', 'guest path /root/repo already holds a git repository (HEAD x)');
      return result();
    });
    expect(calls).toEqual([undefined, true]);
    expect(retried.cache).toBe('miss');

    // another mode is another key: the VM made for shallow does not count a full_history prepare
    let otherWhen: Promise<boolean> | undefined;
    const other = await prepareThroughCache(env, { ...vm, id: 'vm5' }, { ...request, source: repo, mode: 'full_history' }, io, async (how) => {
      otherWhen = how.resumeWhen;
      return result();
    });
    expect(other.cache).toBe('off');
    expect(await otherWhen).toBe(false); // offered the entry's resume point, told not to use it
  });
});
