/**
 * Root disks in constant time (issue 12): qcow2 overlays on the image's rootfs, made from a per-image template,
 * and the per-VM identity on a disk of its own (the image applies it at boot).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run, type Runner } from '../../src/host/exec/runner.js';
import { BangerError } from '../../src/errors.js';
import { overlayDisk } from '../../src/host/disk/disks.js';
import { IDENTITY_DISK_BYTES, IDENTITY_DISK_SERIAL, identityFiles, ustar, writeIdentityDisk } from '../../src/host/disk/identity-disk.js';
import { generateHostKey } from '../../src/host/guest/keys.js';
import { IDENTITY_SCRIPT, IDENTITY_UNIT } from '../../src/host/image/image.js';

const GiB = 2 ** 30;
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'banger-overlay-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function info(file: string): Promise<Record<string, unknown>> {
  return JSON.parse((await run('qemu-img', ['info', '--output=json', file])).stdout) as Record<string, unknown>;
}

describe('overlayDisk', () => {
  it('makes a qcow2 overlay backed read-only by the raw image, the same for a 1 GiB and an 8 GiB image', async () => {
    const templates = join(dir, 'templates');
    const calls: string[][] = [];
    const counting: Runner = (cmd, args, opts) => {
      calls.push([cmd, ...(args ?? [])]);
      return run(cmd, args, opts);
    };
    const sizes: number[] = [];
    for (const size of [GiB, 8 * GiB]) {
      const rootfs = join(dir, `rootfs-${size}.ext4`);
      await run('truncate', ['-s', String(size), rootfs]);
      for (const vm of ['a', 'b']) {
        const dst = join(dir, `${size}-${vm}.qcow2`);
        expect(await overlayDisk(rootfs, dst, { templateDir: templates, runner: counting })).toBe('qcow2-overlay');
        const i = await info(dst);
        expect(i.format).toBe('qcow2');
        expect(i['backing-filename']).toBe(rootfs);
        expect(i['backing-filename-format']).toBe('raw');
        expect(i['virtual-size']).toBe(size);
        sizes.push((await stat(dst)).size);
      }
    }
    // one qemu-img per image (the template), a copy per VM; every overlay is metadata only (no image data copied)
    expect(calls.map((c) => c[0])).toEqual(['qemu-img', 'qemu-img']);
    for (const s of sizes) expect(s).toBeLessThan(1024 * 1024);
    expect((await readdir(templates)).filter((f) => f.endsWith('.partial'))).toEqual([]);
  });

  it('keeps an existing overlay (idempotent) and refuses a missing or relative backing file', async () => {
    const rootfs = join(dir, 'keep.ext4');
    await run('truncate', ['-s', '64M', rootfs]);
    const dst = join(dir, 'keep.qcow2');
    await writeFile(dst, 'not touched');
    await overlayDisk(rootfs, dst, { templateDir: join(dir, 't2') });
    expect(await readFile(dst, 'utf8')).toBe('not touched');
    await expect(overlayDisk(join(dir, 'missing.ext4'), join(dir, 'm.qcow2'), { templateDir: join(dir, 't2') })).rejects.toThrow(/does not exist/);
    await expect(overlayDisk('rel.ext4', join(dir, 'r.qcow2'), { templateDir: join(dir, 't2') })).rejects.toThrow(/absolute/);
  });

  it('a re-pulled image (new inode) gets a new template, not the old one', async () => {
    const rootfs = join(dir, 'repull.ext4');
    const templates = join(dir, 't3');
    await run('truncate', ['-s', '64M', rootfs]);
    await overlayDisk(rootfs, join(dir, 'r1.qcow2'), { templateDir: templates });
    await rm(rootfs);
    await run('truncate', ['-s', '128M', rootfs]);
    await overlayDisk(rootfs, join(dir, 'r2.qcow2'), { templateDir: templates });
    expect((await readdir(templates)).length).toBe(2);
    expect((await info(join(dir, 'r2.qcow2')))['virtual-size']).toBe(128 * 2 ** 20);
  });
});

describe('writeIdentityDisk', () => {
  /** What the guest's banger-identity does with the disk: `tar -x -f <disk> -C <dir> --no-same-owner`. */
  const extract = async (disk: string) => {
    const out = await mkdtemp(join(dir, 'x-'));
    await run('tar', ['-x', '-f', disk, '-C', out, '--no-same-owner']);
    return out;
  };

  it('is a tar the guest extracts: hostname, host key (0600), networkd file, resolv.conf for static networks, git identity', async () => {
    const hostKey = generateHostKey({ comment: 'test' });
    const disk = join(dir, 'identity.tar');
    const network = { mode: 'static' as const, address: '10.9.0.5/24', gateway: '10.9.0.1', dns: ['10.9.0.1'] };
    await writeIdentityDisk(disk, { hostname: 'vm-1', hostKey, network, gitIdentity: { name: 'Ada L', email: 'ada@example.invalid', source: 'host' } });
    expect((await stat(disk)).size % 512).toBe(0);
    const id = await extract(disk);
    expect(await readFile(join(id, 'hostname'), 'utf8')).toBe('vm-1\n');
    expect((await stat(join(id, 'ssh_host_ed25519_key'))).mode & 0o777).toBe(0o600);
    expect(await readFile(join(id, 'ssh_host_ed25519_key'), 'utf8')).toBe(hostKey.privateKey.endsWith('\n') ? hostKey.privateKey : hostKey.privateKey + '\n');
    expect((await readFile(join(id, 'ssh_host_ed25519_key.pub'), 'utf8')).trim()).toBe(hostKey.publicKey.trim());
    expect((await stat(join(id, 'hostname'))).mode & 0o777).toBe(0o644);
    expect(await readFile(join(id, '10-banger.network'), 'utf8')).toContain('Address=10.9.0.5/24');
    expect(await readFile(join(id, 'resolv.conf'), 'utf8')).toContain('nameserver 10.9.0.1');
    expect(await readFile(join(id, 'gitconfig-user'), 'utf8')).toBe('[user]\n\tname = Ada L\n\temail = ada@example.invalid\n');
    // dhcp and no git identity: neither resolv.conf nor gitconfig-user
    await writeIdentityDisk(disk, { hostname: 'vm-1', hostKey, network: { mode: 'dhcp' } });
    expect((await readdir(await extract(disk))).sort()).toEqual(['10-banger.network', 'banger-identity', 'hostname', 'ssh_host_ed25519_key', 'ssh_host_ed25519_key.pub']);
    // where a drive has no serial (Firecracker), the guest knows the disk by its first 15 bytes: the marker's name
    expect((await readFile(disk)).subarray(0, 16).toString('latin1')).toBe(`${IDENTITY_DISK_SERIAL}\0`);
  });

  it('the same identity is the same bytes (no timestamps)', async () => {
    const hostKey = generateHostKey({ comment: 'test' });
    const files = identityFiles({ hostname: 'vm-2', hostKey, network: { mode: 'dhcp' } });
    expect(ustar(files).equals(ustar(files))).toBe(true);
    await writeIdentityDisk(join(dir, 'a.tar'), { hostname: 'vm-2', hostKey, network: { mode: 'dhcp' } });
    const disk = await readFile(join(dir, 'a.tar'));
    // the archive, then zeros up to the fixed size a fork's disk must share with its source's
    expect(disk.length).toBe(IDENTITY_DISK_BYTES);
    expect(disk.subarray(0, ustar(files).length).equals(ustar(files))).toBe(true);
    expect(disk.subarray(ustar(files).length).every((b) => b === 0)).toBe(true);
  });

  it('refuses a bad hostname or network with a usage error, and writes nothing', async () => {
    const hostKey = generateHostKey({ comment: 'test' });
    const bad = writeIdentityDisk(join(dir, 'bad.tar'), { hostname: 'a b', hostKey, network: { mode: 'dhcp' } });
    await expect(bad).rejects.toBeInstanceOf(BangerError);
    await expect(writeIdentityDisk(join(dir, 'bad.tar'), { hostname: 'ok', hostKey, network: { mode: 'static', address: '10.0.0.2', gateway: 'x', dns: [] } })).rejects.toThrow(/invalid address/);
    await expect(stat(join(dir, 'bad.tar'))).rejects.toThrow();
  });

  it("the image's unit installs the files the disk holds, after /root is mounted and before networkd and sshd", () => {
    for (const f of ['hostname', 'ssh_host_ed25519_key', 'ssh_host_ed25519_key.pub', '10-banger.network', 'resolv.conf', 'gitconfig-user']) expect(IDENTITY_SCRIPT).toContain(`$src/${f}`);
    expect(IDENTITY_SCRIPT).toContain(IDENTITY_DISK_SERIAL);
    expect(IDENTITY_UNIT).toMatch(/^RequiresMountsFor=\/root$/m);
    expect(IDENTITY_UNIT).toMatch(/^Before=.*systemd-networkd\.service.*ssh\.service/m);
  });
});
