import { describe, expect, it } from 'vitest';
import { ancestors, assertRootOwnedPath, unsafeBecause, type PathStat } from '../../src/host/install/ownership.js';

const dir = (uid: number, gid: number, mode: number): PathStat => ({ uid, gid, mode: 0o040000 | mode });

describe('install path ownership', () => {
  it('accepts root-owned directories nobody else writes, and a root-owned sticky one such as /tmp', () => {
    expect(unsafeBecause(dir(0, 0, 0o755))).toBeUndefined();
    expect(unsafeBecause(dir(0, 0, 0o775))).toBeUndefined(); // group root
    expect(unsafeBecause(dir(0, 0, 0o1777))).toBeUndefined();
  });

  it('refuses a directory owned by another user, or writable by others or by a non-root group', () => {
    expect(unsafeBecause(dir(1000, 0, 0o755))).toBe('it is owned by uid 1000, not root');
    expect(unsafeBecause(dir(0, 0, 0o777))).toBe('it is writable by every user (mode 777)');
    expect(unsafeBecause(dir(0, 100, 0o775))).toBe('it is writable by group 100 (mode 775)');
    expect(unsafeBecause(dir(1000, 1000, 0o1777))).toBe('it is owned by uid 1000, not root');
  });

  it('walks from / down to the path and names the first offending directory; missing ones are skipped', async () => {
    expect(ancestors('/opt/x/y')).toEqual(['/', '/opt', '/opt/x', '/opt/x/y']);
    const stats: Record<string, PathStat> = { '/': dir(0, 0, 0o755), '/opt': dir(0, 0, 0o755), '/opt/x': dir(1000, 1000, 0o755) };
    await expect(assertRootOwnedPath('/opt/x/y', async (p) => stats[p])).rejects.toThrow('refused to install under /opt/x/y: /opt/x is not safe for code that runs as root (it is owned by uid 1000, not root)');
    await expect(assertRootOwnedPath('/opt/z/y', async (p) => stats[p])).resolves.toBeUndefined();
  });
});
