import { mkdtempSync, readlinkSync, existsSync, symlinkSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { atomicReplace, rollback } from '../../src/host/install/atomic.js';

let dir: string;
let link: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'atomic-'));
  for (const v of ['1', '2', '3']) mkdirSync(join(dir, 'releases', v), { recursive: true });
  link = join(dir, 'current');
});

const SUFFIX = '.previous';

describe('atomicReplace', () => {
  it('1. happy path: the link names the new target and the old one is kept as the backup', async () => {
    symlinkSync('releases/1', link);
    const r = await atomicReplace(link, 'releases/2', SUFFIX);
    expect(r.previous).toBe('releases/1');
    expect(readlinkSync(link)).toBe('releases/2');
    expect(readlinkSync(link + SUFFIX)).toBe('releases/1');
    expect(readdirSync(dir).sort()).toEqual(['current', 'current.previous', 'releases']); // no temporary link left
  });

  it('2. fresh install: no previous version, no backup made', async () => {
    const r = await atomicReplace(link, 'releases/1', SUFFIX);
    expect(r.previous).toBeUndefined();
    expect(readlinkSync(link)).toBe('releases/1');
    expect(existsSync(link + SUFFIX)).toBe(false);
  });

  it('3. a stale backup and temporary link from a half-finished run are replaced', async () => {
    symlinkSync('releases/2', link);
    symlinkSync('releases/1', link + SUFFIX);
    symlinkSync('releases/1', join(dir, `.current.tmp-${process.pid}`));
    await atomicReplace(link, 'releases/3', SUFFIX);
    expect(readlinkSync(link)).toBe('releases/3');
    expect(readlinkSync(link + SUFFIX)).toBe('releases/2');
    expect(readdirSync(dir).sort()).toEqual(['current', 'current.previous', 'releases']);
  });

  it('4. an empty suffix is refused before anything changes (it would skip the backup and break the rollback)', async () => {
    symlinkSync('releases/1', link);
    await expect(atomicReplace(link, 'releases/2', '')).rejects.toThrow(/empty backup suffix/);
    expect(readlinkSync(link)).toBe('releases/1');
    await expect(rollback(link, '')).rejects.toThrow(/empty backup suffix/);
  });

  it('refuses to replace a path that is not a link', async () => {
    writeFileSync(link, 'x');
    await expect(atomicReplace(link, 'releases/2', SUFFIX)).rejects.toThrow(/not a symlink/);
  });
});

describe('rollback', () => {
  it('5. restores the backup in place of the link, by one rename', async () => {
    symlinkSync('releases/1', link);
    await atomicReplace(link, 'releases/2', SUFFIX);
    const r = await rollback(link, SUFFIX);
    expect(r).toEqual({ restored: true, target: 'releases/1', from: 'releases/2' });
    expect(readlinkSync(link)).toBe('releases/1');
    expect(existsSync(link + SUFFIX)).toBe(false);
  });

  it('6. with no backup it is tolerated: nothing changes and it says so', async () => {
    symlinkSync('releases/1', link);
    const r = await rollback(link, SUFFIX);
    expect(r).toEqual({ restored: false, target: 'releases/1' });
    expect(readlinkSync(link)).toBe('releases/1');
  });
});
