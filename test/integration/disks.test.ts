import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chmod, chown, mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from '../../src/host/exec/runner.js';
import { BangerError } from '../../src/errors.js';
import { debugfsStat } from '../../src/host/disk/debugfs.js';
import {
  cloneDisk,
  cowRecordPath,
  createWorkDisk,
  growDisk,
  networkdUnit,
  parseSize,
  probeCowStrategies,
  readDiskFile,
} from '../../src/host/disk/disks.js';
import { customizeRootDisk } from '../../src/host/disk/identity-disk.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const isRoot = process.getuid?.() === 0;
let dir: string;
let seed: string;

async function fsckClean(img: string) {
  const r = await run('e2fsck', ['-fn', img], { reject: false });
  expect(r.exitCode, r.stdout + r.stderr).toBe(0);
}

async function label(img: string): Promise<string> {
  const r = await run('dumpe2fs', ['-h', img]);
  return /Filesystem volume name:\s*(\S*)/.exec(r.stdout)?.[1] ?? '';
}

async function fsBytes(img: string): Promise<number> {
  const r = await run('dumpe2fs', ['-h', img]);
  const blocks = Number(/Block count:\s*(\d+)/.exec(r.stdout)?.[1]);
  const bs = Number(/Block size:\s*(\d+)/.exec(r.stdout)?.[1]);
  return blocks * bs;
}

const allocated = async (p: string) => (await stat(p)).blocks * 512;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'banger-disks-test-'));
  // A seed like the image's /root, with a bit of everything.
  const s = join(dir, 'seed-src');
  await mkdir(join(s, 'bin'), { recursive: true });
  await mkdir(join(s, 'a', 'b', 'c'), { recursive: true });
  await mkdir(join(s, '.ssh'), { recursive: true });
  await mkdir(join(s, 'private'), { recursive: true });
  await writeFile(join(s, '.bashrc'), 'export PS1=banger\n');
  await writeFile(join(s, 'bin', 'run.sh'), '#!/bin/sh\necho hi\n');
  await chmod(join(s, 'bin', 'run.sh'), 0o755);
  await writeFile(join(s, 'secret'), 'top secret\n');
  await chmod(join(s, 'secret'), 0o600);
  await writeFile(join(s, 'a', 'b', 'c', 'deep.txt'), 'deep\n');
  await chmod(join(s, 'private'), 0o711);
  await symlink('bin/run.sh', join(s, 'run'));
  await symlink('/etc/hostname', join(s, 'abs-link'));
  await writeFile(join(s, '.ssh', 'authorized_keys'), 'ssh-ed25519 AAAAseedkey old@seed\n');
  await writeFile(join(s, '.gitconfig'), '[core]\n\teditor = vi'); // no final newline on purpose
  if (isRoot) await chown(join(s, 'a', 'b', 'c', 'deep.txt'), 1234, 1234);
  await chmod(s, 0o700);
  seed = join(dir, 'work-seed.ext4');
  await run('truncate', ['-s', '16M', seed]);
  await run('mkfs.ext4', ['-F', '-q', '-L', 'banger-seed', '-E', 'root_owner=0:0', '-d', s, seed]);
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('parseSize', () => {
  it('accepts units, fractions and plain bytes', () => {
    expect(parseSize('512M')).toBe(512 * MiB);
    expect(parseSize('8G')).toBe(8 * GiB);
    expect(parseSize('1.5G')).toBe(1.5 * GiB);
    expect(parseSize('1048576')).toBe(MiB);
    expect(parseSize('64k')).toBe(64 * 1024);
    expect(parseSize('2GiB')).toBe(2 * GiB);
    expect(parseSize('1T')).toBe(2 ** 40);
    expect(parseSize(' 10 MB ')).toBe(10 * MiB);
    expect(parseSize('100b')).toBe(100);
  });
  it('rejects junk with a usage error', () => {
    for (const bad of ['', 'abc', '8GG', '-1G', '1e9', 'G', '1.2.3M', '8 X', '1ib']) {
      let err: unknown;
      try {
        parseSize(bad);
      } catch (e) {
        err = e;
      }
      expect(err, bad).toBeInstanceOf(BangerError);
      expect((err as BangerError).kind).toBe('usage');
    }
  });
});

describe('createWorkDisk', () => {
  it('copies the seed (files, symlinks, nested dirs, modes) as root:root and adds keys, git identity and file_sync', async () => {
    const syncSrc = join(dir, 'sync');
    await mkdir(join(syncSrc, 'cfg', 'nested'), { recursive: true });
    await writeFile(join(syncSrc, 'cfg', 'hosts.yml'), 'token: x\n');
    await chmod(join(syncSrc, 'cfg', 'hosts.yml'), 0o600);
    await writeFile(join(syncSrc, 'cfg', 'nested', 'n.txt'), 'n\n');
    await symlink('hosts.yml', join(syncSrc, 'cfg', 'alias.yml'));
    await writeFile(join(syncSrc, 'single'), 'single file\n');
    await writeFile(join(syncSrc, 'we"ird'), 'quote in name\n'); // host name debugfs cannot express: goes through a safe link

    const disk = join(dir, 'work.ext4');
    const r = await createWorkDisk(disk, {
      sizeBytes: GiB,
      seedImage: seed,
      authorizedKeys: 'ssh-ed25519 AAAAnewkey banger',
      gitIdentity: { name: 'Ada Lovelace', email: 'ada@example.com' },
      fileSync: [
        { host: join(syncSrc, 'cfg'), guest: '.config/tool' },
        { host: join(syncSrc, 'single'), guest: 'docs/single.txt' },
        { host: join(syncSrc, 'we"ird'), guest: 'plain-name' },
      ],
    });
    expect(r.ms).toBeGreaterThan(0);
    expect(existsSync(`${disk}.partial`)).toBe(false);
    expect((await stat(disk)).size).toBe(GiB);
    expect(await label(disk)).toBe('banger-work');
    await fsckClean(disk);

    // seed contents
    expect(await readDiskFile(disk, '/.bashrc')).toBe('export PS1=banger\n');
    expect(await debugfsStat(disk, '/bin/run.sh')).toMatchObject({ type: 'regular', mode: 0o755, uid: 0, gid: 0 });
    expect(await debugfsStat(disk, '/secret')).toMatchObject({ type: 'regular', mode: 0o600, uid: 0, gid: 0 });
    expect(await readDiskFile(disk, '/a/b/c/deep.txt')).toBe('deep\n');
    expect(await debugfsStat(disk, '/a/b/c/deep.txt')).toMatchObject({ uid: 0, gid: 0, mode: 0o644 });
    expect(await debugfsStat(disk, '/a/b')).toMatchObject({ type: 'directory', mode: 0o755, uid: 0 });
    expect(await debugfsStat(disk, '/private')).toMatchObject({ type: 'directory', mode: 0o711 });
    expect(await debugfsStat(disk, '/run')).toMatchObject({ type: 'symlink', target: 'bin/run.sh', uid: 0 });
    expect(await debugfsStat(disk, '/abs-link')).toMatchObject({ type: 'symlink', target: '/etc/hostname' });
    expect(await debugfsStat(disk, '/')).toMatchObject({ type: 'directory', mode: 0o700, uid: 0, gid: 0 });

    // keys and git identity
    expect(await readDiskFile(disk, '/.ssh/authorized_keys')).toBe('ssh-ed25519 AAAAnewkey banger\n');
    expect(await debugfsStat(disk, '/.ssh/authorized_keys')).toMatchObject({ mode: 0o600, uid: 0, gid: 0 });
    expect(await debugfsStat(disk, '/.ssh')).toMatchObject({ type: 'directory', mode: 0o700, uid: 0 });
    expect(await readDiskFile(disk, '/.gitconfig')).toBe('[core]\n\teditor = vi\n[user]\n\tname = Ada Lovelace\n\temail = ada@example.com\n');

    // file_sync
    expect(await readDiskFile(disk, '/.config/tool/hosts.yml')).toBe('token: x\n');
    expect(await debugfsStat(disk, '/.config/tool/hosts.yml')).toMatchObject({ mode: 0o600, uid: 0 });
    expect(await readDiskFile(disk, '/.config/tool/nested/n.txt')).toBe('n\n');
    expect(await debugfsStat(disk, '/.config/tool/alias.yml')).toMatchObject({ type: 'symlink', target: 'hosts.yml' });
    expect(await debugfsStat(disk, '/.config')).toMatchObject({ type: 'directory', mode: 0o755, uid: 0 });
    expect(await readDiskFile(disk, '/docs/single.txt')).toBe('single file\n');
    expect(await readDiskFile(disk, '/plain-name')).toBe('quote in name\n');
    expect(await readDiskFile(disk, '/lost+found/nothing')).toBeUndefined();
  });

  it('makes 1 GiB and 64 GiB disks that stay sparse on the host', async () => {
    for (const size of [GiB, 64 * GiB]) {
      const disk = join(dir, `work-${size}.ext4`);
      await createWorkDisk(disk, { sizeBytes: size, seedImage: seed, authorizedKeys: 'ssh-ed25519 AAAAk k' });
      expect((await stat(disk)).size).toBe(size);
      expect(await fsBytes(disk)).toBe(size);
      expect(await allocated(disk)).toBeLessThan(32 * MiB);
      expect(await readDiskFile(disk, '/.bashrc')).toBe('export PS1=banger\n');
      await fsckClean(disk);
      await rm(disk);
    }
  });

  it('validates file_sync entries and leaves nothing behind on failure', async () => {
    const disk = join(dir, 'bad.ext4');
    const base = { sizeBytes: 64 * MiB, seedImage: seed, authorizedKeys: 'k' };
    await expect(createWorkDisk(disk, { ...base, fileSync: [{ host: join(dir, 'no-such-file'), guest: 'x' }] })).rejects.toThrow(
      /no-such-file/,
    );
    for (const guest of ['../etc/passwd', '/etc/passwd', 'a/../../b', '', 'bad"name']) {
      await expect(createWorkDisk(disk, { ...base, fileSync: [{ host: seed, guest }] }), guest).rejects.toMatchObject({ kind: 'usage' });
    }
    await expect(createWorkDisk(disk, { ...base, seedImage: join(dir, 'no-seed.ext4') })).rejects.toMatchObject({ kind: 'not_found' });
    expect(existsSync(disk)).toBe(false);
    expect(existsSync(`${disk}.partial`)).toBe(false);
    // a file where a directory is needed
    await writeFile(join(dir, 'plainfile'), 'x');
    await expect(
      createWorkDisk(disk, { ...base, fileSync: [{ host: join(dir, 'plainfile'), guest: '.bashrc/inside' }] }),
    ).rejects.toMatchObject({ kind: 'conflict' });
    expect(existsSync(`${disk}.partial`)).toBe(false);
  });

  it('refuses to overwrite an existing work disk', async () => {
    const disk = join(dir, 'exists.ext4');
    await writeFile(disk, 'precious');
    await expect(createWorkDisk(disk, { sizeBytes: 64 * MiB, seedImage: seed, authorizedKeys: 'k' })).rejects.toMatchObject({
      kind: 'conflict',
    });
    expect(await readFile(disk, 'utf8')).toBe('precious');
  });
});

describe('growDisk', () => {
  it('grows a filesystem and refuses to shrink', async () => {
    const disk = join(dir, 'grow.ext4');
    await createWorkDisk(disk, { sizeBytes: 64 * MiB, seedImage: seed, authorizedKeys: 'k' });
    expect(await fsBytes(disk)).toBe(64 * MiB);
    await growDisk(disk, 256 * MiB);
    expect((await stat(disk)).size).toBe(256 * MiB);
    expect(await fsBytes(disk)).toBe(256 * MiB);
    expect(await readDiskFile(disk, '/secret')).toBe('top secret\n');
    await fsckClean(disk);

    let err: BangerError | undefined;
    try {
      await growDisk(disk, 128 * MiB);
    } catch (e) {
      err = e as BangerError;
    }
    expect(err?.kind).toBe('usage');
    expect(err?.message).toContain(String(256 * MiB));
    expect(err?.message).toContain(String(128 * MiB));
    expect((await stat(disk)).size).toBe(256 * MiB);
    await expect(growDisk(join(dir, 'nope.ext4'), GiB)).rejects.toMatchObject({ kind: 'not_found' });
  });
});

describe('customizeRootDisk', () => {
  async function rootfs(name: string, withNetworkDir: boolean): Promise<string> {
    const t = join(dir, `${name}-tree`);
    await mkdir(join(t, 'etc', 'ssh'), { recursive: true });
    if (withNetworkDir) await mkdir(join(t, 'etc', 'systemd', 'network'), { recursive: true });
    await writeFile(join(t, 'etc', 'hostname'), 'banger\n');
    await writeFile(join(t, 'etc', 'ssh', 'ssh_host_ed25519_key'), 'OLD KEY\n');
    await symlink('../run/systemd/resolve/stub-resolv.conf', join(t, 'etc', 'resolv.conf'));
    const img = join(dir, `${name}.ext4`);
    await run('truncate', ['-s', '32M', img]);
    await run('mkfs.ext4', ['-F', '-q', '-E', 'root_owner=0:0', '-d', t, img]);
    return img;
  }
  const hostKey = {
    privateKey: '-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----',
    publicKey: 'ssh-ed25519 AAAAhost root@vm',
  };

  it('writes hostname, host keys and a static network, replacing what is there', async () => {
    const img = await rootfs('static', true);
    await customizeRootDisk(img, {
      hostname: 'vm-1',
      hostKey,
      network: { mode: 'static', address: '10.77.0.2/24', gateway: '10.77.0.1', dns: ['10.77.0.1', '9.9.9.9'] },
    });
    expect(await readDiskFile(img, '/etc/hostname')).toBe('vm-1\n');
    expect(await readDiskFile(img, '/etc/ssh/ssh_host_ed25519_key')).toBe(hostKey.privateKey + '\n');
    expect(await debugfsStat(img, '/etc/ssh/ssh_host_ed25519_key')).toMatchObject({ mode: 0o600, uid: 0, gid: 0 });
    expect(await readDiskFile(img, '/etc/ssh/ssh_host_ed25519_key.pub')).toBe(hostKey.publicKey + '\n');
    expect(await debugfsStat(img, '/etc/ssh/ssh_host_ed25519_key.pub')).toMatchObject({ mode: 0o644, uid: 0 });
    const net = await readDiskFile(img, '/etc/systemd/network/10-banger.network');
    expect(net).toContain('Name=e* en*');
    expect(net).toContain('Address=10.77.0.2/24');
    expect(net).toContain('Gateway=10.77.0.1');
    expect(net).toContain('DNS=9.9.9.9');
    expect(net).not.toContain('DHCP');
    expect(await debugfsStat(img, '/etc/resolv.conf')).toMatchObject({ type: 'regular', mode: 0o644 });
    expect(await readDiskFile(img, '/etc/resolv.conf')).toContain('nameserver 10.77.0.1\nnameserver 9.9.9.9\n');
    await fsckClean(img);

    // again (idempotent: files replaced, not duplicated)
    await customizeRootDisk(img, { hostname: 'vm-2', hostKey, network: { mode: 'dhcp' } });
    expect(await readDiskFile(img, '/etc/hostname')).toBe('vm-2\n');
    expect(await readDiskFile(img, '/etc/systemd/network/10-banger.network')).toBe(networkdUnit({ mode: 'dhcp' }));
    await fsckClean(img);
  });

  it('creates missing directories for dhcp and validates its input', async () => {
    const img = await rootfs('dhcp', false);
    await customizeRootDisk(img, { hostname: 'dev', hostKey, network: { mode: 'dhcp' } });
    expect(await readDiskFile(img, '/etc/systemd/network/10-banger.network')).toContain('DHCP=ipv4');
    // dhcp leaves resolv.conf alone
    expect(await debugfsStat(img, '/etc/resolv.conf')).toMatchObject({ type: 'symlink' });
    await fsckClean(img);

    await expect(customizeRootDisk(img, { hostname: 'bad_name!', hostKey, network: { mode: 'dhcp' } })).rejects.toMatchObject({ kind: 'usage' });
    await expect(
      customizeRootDisk(img, { hostname: 'x', hostKey, network: { mode: 'static', address: '10.0.0.2', gateway: '10.0.0.1', dns: [] } }),
    ).rejects.toMatchObject({ kind: 'usage' });
    await expect(
      customizeRootDisk(img, { hostname: 'x', hostKey, network: { mode: 'static', address: '10.0.0.2/24', gateway: 'gw', dns: [] } }),
    ).rejects.toMatchObject({ kind: 'usage' });
  });
});

describe('cloneDisk and probeCowStrategies', () => {
  it('clones through a .partial file, keeps holes, records the strategy and is idempotent', async () => {
    const src = join(dir, 'clone-src.ext4');
    await run('truncate', ['-s', '64M', src]);
    await run('mkfs.ext4', ['-F', '-q', '-E', 'lazy_itable_init=1,lazy_journal_init=1', src]);
    const dst = join(dir, 'clone-dst.ext4');
    const strategy = await cloneDisk(src, dst);
    expect(['reflink', 'sparse-copy']).toContain(strategy);
    expect(existsSync(`${dst}.partial`)).toBe(false);
    expect((await readFile(cowRecordPath(dst), 'utf8')).trim()).toBe(strategy);
    expect((await stat(dst)).size).toBe(64 * MiB);
    expect(await allocated(dst)).toBeLessThan(16 * MiB);
    expect((await run('cmp', [src, dst], { reject: false })).exitCode).toBe(0);
    await fsckClean(dst);

    const mtime = (await stat(dst)).mtimeMs;
    expect(await cloneDisk(src, dst)).toBe(strategy);
    expect((await stat(dst)).mtimeMs).toBe(mtime);

    const foreign = join(dir, 'foreign.ext4');
    await writeFile(foreign, 'x');
    await expect(cloneDisk(src, foreign)).rejects.toMatchObject({ kind: 'conflict' });
    await expect(cloneDisk(join(dir, 'missing.ext4'), join(dir, 'x.ext4'))).rejects.toMatchObject({ kind: 'not_found' });

    const probe = await probeCowStrategies(dir);
    expect(probe.map((p) => p.strategy)).toEqual(['reflink', 'sparse-copy', 'qcow2-overlay']);
    expect(probe[0].ok).toBe(strategy === 'reflink');
    expect(probe[1].ok).toBe(true);
    for (const p of probe) expect(p.why.length).toBeGreaterThan(5);
    if (!probe[0].ok) expect(probe[0].why).toMatch(/does not support reflink/);
  });
});
