/**
 * The workspace cache on the host: its key (what misses), its store (a hit is checked, eviction keeps to the
 * budget, prune), and the clone a hit makes of a cached work disk (the new VM's files written over the old's).
 * Real git, mkfs.ext4, e2fsck and debugfs; no guest.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WorkspaceCache, workspaceCacheKey, type CacheKeyInput, type CacheKeyParts } from '../../src/host/guest/workspace-cache.js';
import { cloneWorkDisk, stripGitIdentity } from '../../src/host/disk/work-disk-clone.js';
import { CACHED_BASE_NAME, DEFAULT_IDENTITY_NOTE, overlayOnCachedDisk, readDiskFile, withoutGitIdentity } from '../../src/host/disk/disks.js';

const sh = promisify(execFile);
const gitEnv = { ...process.env, GIT_AUTHOR_NAME: 't', GIT_AUTHOR_EMAIL: 't@x', GIT_COMMITTER_NAME: 't', GIT_COMMITTER_EMAIL: 't@x', GIT_CONFIG_NOSYSTEM: '1', HOME: '/nonexistent' };
const git = (cwd: string, ...args: string[]) => sh('git', args, { cwd, env: gitEnv });

let tmp: string;
let repo: string;
let imageDir: string;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'bg-wscache-'));
  repo = join(tmp, 'repo');
  await mkdir(repo);
  await git(repo, 'init', '-q', '-b', 'main');
  await writeFile(join(repo, 'a.txt'), 'a\n');
  await git(repo, 'add', '-A');
  await git(repo, 'commit', '-qm', 'one');
  imageDir = join(tmp, 'image');
  await mkdir(imageDir);
  await writeFile(join(imageDir, 'manifest.json'), '{"name":"img","builderVersion":2}\n');
  await writeFile(join(imageDir, 'work-seed.ext4'), 'seed');
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const input = (over: Partial<CacheKeyInput> = {}): CacheKeyInput => ({
  source: repo,
  mode: 'shallow',
  guestPath: '/root/repo',
  image: { name: 'img', dir: imageDir, workSeed: 'work-seed.ext4' },
  diskBytes: 8 * 2 ** 30,
  net: 'user',
  userPublicKey: 'ssh-ed25519 AAAA user',
  gitIdentity: null,
  fileSync: [],
  ...over,
});

async function keyOf(over: Partial<CacheKeyInput> = {}) {
  const k = await workspaceCacheKey(input(over));
  if (k.key === null) throw new Error(k.why);
  return k;
}

describe('the cache key', { timeout: 60_000 }, () => {
  it('is stable for the same workspace, and uncommitted edits do not change it (they are streamed on a hit)', async () => {
    const a = await keyOf();
    await writeFile(join(repo, 'a.txt'), 'edited, not committed\n');
    const b = await keyOf();
    await git(repo, 'checkout', '--', 'a.txt');
    expect(b.key).toBe(a.key);
    expect(a.key).toMatch(/^[0-9a-f]{64}$/);
  });

  it('misses on a new HEAD, another mode, another image, another guest path or disk size; full_copy has none', async () => {
    const base = (await keyOf()).key;
    expect((await keyOf({ mode: 'full_history' })).key).not.toBe(base);
    expect((await keyOf({ guestPath: '/root/other' })).key).not.toBe(base);
    expect((await keyOf({ diskBytes: 4 * 2 ** 30 })).key).not.toBe(base);
    expect((await keyOf({ image: { name: 'img2', dir: imageDir, workSeed: 'work-seed.ext4' } })).key).not.toBe(base);
    const manifest = join(imageDir, 'manifest.json');
    const old = await readFile(manifest, 'utf8');
    await writeFile(manifest, '{"name":"img","builderVersion":3}\n');
    expect((await keyOf()).key).not.toBe(base); // the same image name, rebuilt
    await writeFile(manifest, old);
    expect((await keyOf()).key).toBe(base);
    const fc = await workspaceCacheKey(input({ mode: 'full_copy' }));
    expect(fc.key).toBeNull();
    const empty = join(tmp, 'empty');
    await mkdir(empty);
    expect(await workspaceCacheKey(input({ source: empty }))).toMatchObject({ key: null, why: expect.stringMatching(/is not a git repository/) });
    await git(empty, 'init', '-q');
    expect(await workspaceCacheKey(input({ source: empty }))).toMatchObject({ key: null, why: expect.stringMatching(/has no commits yet/) });

    await writeFile(join(repo, 'b.txt'), 'b\n');
    await git(repo, 'add', '-A');
    await git(repo, 'commit', '-qm', 'two');
    const moved = await keyOf();
    expect(moved.key).not.toBe(base);
    expect(moved.parts.headCommit).toBe((await git(repo, 'rev-parse', 'HEAD')).stdout.trim());
    await git(repo, 'tag', 'v1'); // full_history carries tags: a new ref misses too
    expect((await keyOf()).key).not.toBe(moved.key);
  });
});

/** An ext4 image of `mib` MiB holding `files` (path relative to the root → contents). */
async function ext4(path: string, mib: number, files: Record<string, string> = {}) {
  const dir = await mkdtemp(join(tmp, 'tree-'));
  for (const [rel, text] of Object.entries(files)) {
    await mkdir(join(dir, rel, '..'), { recursive: true });
    await writeFile(join(dir, rel), text);
  }
  await sh('mkfs.ext4', ['-F', '-q', '-d', dir, path, `${mib}M`]);
  // Fill part of it so it occupies real bytes on the host (the budget counts those).
  await sh('debugfs', ['-w', '-R', `write /etc/hostname /pad`, path]).catch(() => {});
  await rm(dir, { recursive: true, force: true });
}

async function entryFor(cache: WorkspaceCache, n: number) {
  const k = await keyOf({ guestPath: `/root/r${n}` });
  await cache.store(k.key, k.parts, (dst) => ext4(dst, 16, { [`f${n}`]: `entry ${n}\n` }));
  return k;
}

describe('the store', { timeout: 90_000 }, () => {
  it('serves what it stored, checks it, and prunes', async () => {
    const cache = new WorkspaceCache(join(tmp, 'c1'), () => 2 ** 30);
    const k = await entryFor(cache, 1);
    const hit = await cache.lookup(k.key);
    expect(hit?.disk).toBe(join(tmp, 'c1', k.key, 'disk.img'));
    expect(hit?.hits).toBe(1);
    expect(await readDiskFile(hit!.disk, '/f1')).toBe('entry 1\n');
    expect((await cache.list()).map((e) => e.key)).toEqual([k.key]);

    // An entry whose recorded parts do not hash to its key is not served.
    const entryJson = join(tmp, 'c1', k.key, 'entry.json');
    const stored = JSON.parse(await readFile(entryJson, 'utf8')) as { parts: CacheKeyParts };
    await writeFile(entryJson, JSON.stringify({ ...stored, parts: { ...stored.parts, headCommit: '0'.repeat(40) } }));
    expect(await cache.lookup(k.key)).toBeUndefined();
    await writeFile(entryJson, JSON.stringify(stored));
    expect(await cache.lookup(k.key)).toBeDefined();
    // A cut-short disk is not served either.
    await sh('truncate', ['-s', '1M', join(tmp, 'c1', k.key, 'disk.img')]);
    expect(await cache.lookup(k.key)).toBeUndefined();

    const k2 = await entryFor(cache, 2);
    await expect(cache.prune({ key: 'zz' })).rejects.toThrow(/invalid cache key/);
    expect(await cache.prune({ key: k2.key.slice(0, 10) })).toEqual([k2.key]);
    await entryFor(cache, 3);
    expect((await cache.prune()).length).toBe(1);
    expect(await cache.list()).toEqual([]);
  });

  it('a snapshot that fails its check is not stored', async () => {
    const cache = new WorkspaceCache(join(tmp, 'c2'), () => 2 ** 30);
    const k = await keyOf({ guestPath: '/root/bad' });
    await expect(cache.store(k.key, k.parts, (dst) => writeFile(dst, Buffer.alloc(1 << 20, 7)))).rejects.toThrow(/failed its check/);
    expect(await cache.list()).toEqual([]);
  });

  it('eviction keeps to the budget, least recently used first', async () => {
    const probe = new WorkspaceCache(join(tmp, 'c3probe'), () => 2 ** 30);
    const one = (await probe.lookup((await entryFor(probe, 9)).key))!.bytes;
    const budget = Math.floor(one * 2.5);
    const cache = new WorkspaceCache(join(tmp, 'c3'), () => budget);
    const a = await entryFor(cache, 1);
    const b = await entryFor(cache, 2);
    await new Promise((r) => setTimeout(r, 5));
    expect(await cache.lookup(a.key)).toBeDefined(); // a is now more recently used than b
    await new Promise((r) => setTimeout(r, 5));
    const c = await entryFor(cache, 3);
    const left = await cache.list();
    expect(left.reduce((n, e) => n + e.bytes, 0)).toBeLessThanOrEqual(budget);
    expect(left.map((e) => e.key).sort()).toEqual([a.key, c.key].sort());
    expect(left.some((e) => e.key === b.key)).toBe(false);
  });

  it('a budget of 0 turns the cache off', async () => {
    const cache = new WorkspaceCache(join(tmp, 'c4'), () => 0);
    expect(cache.enabled).toBe(false);
  });
});

describe('cloneWorkDisk', { timeout: 60_000 }, () => {
  it("clones the cached disk and writes the new VM's git identity over the old", async () => {
    const cached = join(tmp, 'cached.img');
    await ext4(cached, 32, {
      '.gitconfig': '[core]\n\tpager = cat\n[user]\n\tname = old-vm\n',
      'repo/kept.txt': 'workspace\n',
    });
    const seed = join(tmp, 'seed.img');
    await ext4(seed, 16, { '.gitconfig': '[core]\n\tpager = cat\n' });
    const dst = join(tmp, 'work.img');
    const strategy = await cloneWorkDisk(cached, dst, { gitIdentity: { name: 'new-vm', email: 'n@x', source: 'default' }, seedImage: seed });
    expect(['reflink', 'sparse-copy']).toContain(strategy);
    const gc = await readDiskFile(dst, '/.gitconfig');
    expect(gc).toMatch(/^\[core\]\n\tpager = cat\n/);
    expect(gc).toMatch(/name = new-vm/);
    expect(gc).not.toMatch(/old-vm/);
    expect(await readDiskFile(dst, '/repo/kept.txt')).toBe('workspace\n');
    expect(await readDiskFile(cached, '/.gitconfig')).toMatch(/old-vm/); // the cache is untouched
    const fsck = await sh('e2fsck', ['-fn', dst]).then(() => 0, (e: { code: number }) => e.code);
    expect(fsck).toBe(0);
  });

  it('a stored disk carries no git identity: the [user] section and the default note go, the rest stays', async () => {
    expect(withoutGitIdentity(`[core]\n\tpager = cat\n${DEFAULT_IDENTITY_NOTE}\n[user]\n\tname = vm\n\temail = e@x\n[alias]\n\tst = status\n`)).toBe('[core]\n\tpager = cat\n[alias]\n\tst = status\n');
    expect(withoutGitIdentity('[User]\n\tname = vm\n')).toBe('');
    const disk = join(tmp, 'stored.img');
    await ext4(disk, 32, { '.gitconfig': '[core]\n\tpager = cat\n[user]\n\tname = old-vm\n', 'repo/kept.txt': 'workspace\n' });
    await stripGitIdentity(disk);
    expect(await readDiskFile(disk, '/.gitconfig')).toBe('[core]\n\tpager = cat\n');
    expect(await readDiskFile(disk, '/repo/kept.txt')).toBe('workspace\n');
  });
});

describe('overlayOnCachedDisk', { timeout: 60_000 }, () => {
  it('links the cached disk beside a qcow2 overlay that names it relative, from one template per size', async () => {
    const cached = join(tmp, 'entry', 'disk.img');
    await mkdir(join(tmp, 'entry'));
    await ext4(cached, 32, { 'repo/kept.txt': 'workspace\n' });
    const templates = join(tmp, 'templates');
    const vmDir = join(tmp, 'vm-a');
    await mkdir(vmDir);
    expect(await overlayOnCachedDisk(cached, join(vmDir, 'work.qcow2'), { templateDir: templates })).toBe('qcow2-overlay');
    const base = join(vmDir, CACHED_BASE_NAME);
    expect((await stat(base)).ino).toBe((await stat(cached)).ino); // a hard link: nothing copied
    const info = JSON.parse((await sh('qemu-img', ['info', '--output=json', join(vmDir, 'work.qcow2')])).stdout);
    expect(info).toMatchObject({ format: 'qcow2', 'backing-filename': CACHED_BASE_NAME, 'backing-filename-format': 'raw', 'virtual-size': (await stat(cached)).size });
    // the chain opens from the VM's directory, and the cached disk's data shows through
    const chain = JSON.parse((await sh('qemu-img', ['info', '--output=json', '--backing-chain', join(vmDir, 'work.qcow2')])).stdout);
    expect(chain.map((i: { filename: string }) => i.filename)).toEqual([join(vmDir, 'work.qcow2'), base]);
    // evicting the entry leaves the VM's disk whole
    await rm(join(tmp, 'entry'), { recursive: true });
    expect((await stat(base)).size).toBeGreaterThan(0);
    expect(await readdir(templates)).toHaveLength(1);
  });
});
