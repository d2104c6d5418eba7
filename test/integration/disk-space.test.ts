import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, statfs, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BangerError } from '../../src/errors.js';
import { clearLeftovers } from '../../src/host/image/image.js';
import { run } from '../../src/host/exec/runner.js';
import { ensureFreeSpace, freeBytes, humanBytes } from '../../src/host/disk/space.js';

const GiB = 2 ** 30;
const isRoot = process.getuid?.() === 0;
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bspace-'));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('free space', () => {
  it('freeBytes agrees with statfs, also for a path that does not exist yet', async () => {
    const s = await statfs(dir);
    const free = await freeBytes(dir);
    // Others write to this filesystem meanwhile: close, not equal.
    expect(Math.abs(free - s.bavail * s.bsize)).toBeLessThan(256 * 2 ** 20);
    expect(Math.abs((await freeBytes(join(dir, 'not', 'yet'))) - free)).toBeLessThan(256 * 2 ** 20);
  });

  it('refuses more than is free, naming what is needed, what is free and the fix', async () => {
    const free = await freeBytes(dir);
    const err = await ensureFreeSpace(dir, free + GiB, 'building image test').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BangerError);
    const e = err as BangerError;
    expect(e.kind).toBe('host');
    expect(e.message).toContain('building image test');
    expect(e.message).toContain(`needs about ${humanBytes(free + GiB)}`);
    expect(e.message).toMatch(/only [0-9.]+ (bytes|KiB|MiB|GiB|TiB) is free/);
    expect(e.hint).toMatch(/free space.*BANGER_HOME/);
  });

  it('lets a need that fits through', async () => {
    expect(await ensureFreeSpace(dir, 1, 'a one-byte file')).toBeGreaterThan(0);
  });

  it('writes sizes for humans', () => {
    expect(humanBytes(512)).toBe('512 bytes');
    expect(humanBytes(1536)).toBe('1.5 KiB');
    expect(humanBytes(3 * GiB)).toBe('3.0 GiB');
    expect(humanBytes(300 * GiB)).toBe('300 GiB');
  });
});

describe('leftovers of killed builds and creates', () => {
  async function home(): Promise<{ imagesDir: string; vmsDir: string }> {
    const h = await mkdtemp(join(dir, 'home-'));
    const d = { imagesDir: join(h, 'images'), vmsDir: join(h, 'vms') };
    await mkdir(d.imagesDir, { recursive: true });
    await mkdir(d.vmsDir, { recursive: true });
    return d;
  }

  it('removes build directories and *.partial files, and nothing else', async () => {
    const d = await home();
    const bootstrap = join(d.imagesDir, '.debian-bookworm.bootstrap-AbC123');
    await mkdir(join(bootstrap, 'tree', 'usr', 'bin'), { recursive: true });
    await writeFile(join(bootstrap, 'tree', 'usr', 'bin', 'x'), 'x');
    const out = join(d.imagesDir, '.debian-bookworm.tmp-q1W2e3');
    await mkdir(out);
    await writeFile(join(out, 'rootfs.ext4'), 'r');
    const imp = join(d.imagesDir, '.mine.import-zzZZ99');
    await mkdir(imp);
    const image = join(d.imagesDir, 'debian-bookworm');
    await mkdir(image);
    await writeFile(join(image, 'manifest.json'), '{}');
    await writeFile(join(image, 'rootfs.ext4'), 'keep');
    await writeFile(join(image, 'stray.partial'), 'p');
    const vm = join(d.vmsDir, 'vm1');
    await mkdir(vm);
    await writeFile(join(vm, 'rootfs.ext4'), 'keep');
    await writeFile(join(vm, 'work.ext4.partial'), 'p');
    await writeFile(join(vm, 'rootfs.ext4.cow.partial'), 'p');
    // Look-alikes that are not ours stay.
    const other = join(d.imagesDir, '.notes');
    await mkdir(other);
    const almost = join(d.imagesDir, '.x.bootstrap-short');
    await mkdir(almost);

    const lines: string[] = [];
    const r = await clearLeftovers(d, { runner: run, log: (l) => lines.push(l) });
    expect(r.removed.sort()).toEqual([join(image, 'stray.partial'), join(vm, 'rootfs.ext4.cow.partial'), join(vm, 'work.ext4.partial')].sort());
    const big = await r.removing;
    expect(big.removed.sort()).toEqual([bootstrap, imp, out].sort());
    expect(big.skipped).toEqual([]);
    for (const p of [bootstrap, out, imp, join(image, 'stray.partial'), join(vm, 'work.ext4.partial')]) expect(existsSync(p), p).toBe(false);
    for (const p of [other, almost, join(image, 'manifest.json'), join(vm, 'rootfs.ext4')]) expect(existsSync(p), p).toBe(true);
    expect(await readFile(join(image, 'rootfs.ext4'), 'utf8')).toBe('keep');
    expect(lines.filter((l) => l.startsWith('removed')).length).toBe(6);
  });

  it('takes its list before returning: a build started afterwards is not touched', async () => {
    const d = await home();
    const r = await clearLeftovers(d, { runner: run });
    const later = join(d.imagesDir, '.img.bootstrap-Later1');
    await mkdir(later);
    await r.removing;
    expect(existsSync(later)).toBe(true);
  });

  it.skipIf(!isRoot)('never removes across a mount: a tree with a mount inside is unmounted first (needs root to mount)', async () => {
    const d = await home();
    const bootstrap = join(d.imagesDir, '.img.bootstrap-Mnt001');
    const mnt = join(bootstrap, 'tree', 'proc');
    await mkdir(mnt, { recursive: true });
    await run('mount', ['-t', 'tmpfs', 'tmpfs', mnt]);
    try {
      await writeFile(join(mnt, 'on-the-mount'), 'x');
      const r = await clearLeftovers(d, { runner: run });
      const big = await r.removing;
      expect(big.removed).toEqual([bootstrap]);
      expect(existsSync(bootstrap)).toBe(false);
      const mounts = await readFile('/proc/self/mountinfo', 'utf8');
      expect(mounts).not.toContain(mnt);
    } finally {
      await run('umount', ['-l', mnt], { reject: false });
    }
  });

  it('leaves (and logs) a tree it cannot remove, and goes on', async () => {
    const d = await home();
    const bootstrap = join(d.imagesDir, '.img.bootstrap-Stuck1');
    await mkdir(join(bootstrap, 'tree'), { recursive: true });
    await writeFile(join(bootstrap, 'tree', 'f'), 'f');
    // rm failing stands in for a busy tree (the daemon must start anyway, with the tree left and a log line).
    const lines: string[] = [];
    const failingRm = (async (file: string, args: readonly string[], o?: object) => {
      if (file === 'rm') throw new Error('rm: cannot remove: Device or resource busy');
      return run(file, args, o as never);
    }) as typeof run;
    const r = await clearLeftovers(d, { runner: failingRm, log: (l) => lines.push(l) });
    const big = await r.removing;
    expect(big.skipped).toEqual([bootstrap]);
    expect(existsSync(join(bootstrap, 'tree', 'f'))).toBe(true);
    expect(lines.join('\n')).toContain(`left the leftover build directory ${bootstrap} in place`);
  });
});
