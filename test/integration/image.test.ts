import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { run } from '../../src/host/exec/runner.js';
import { BangerError } from '../../src/errors.js';
import { debugfsStat } from '../../src/host/disk/debugfs.js';
import { readDiskFile } from '../../src/host/disk/disks.js';
import {
  BUILDER_VERSION,
  KNOWN_IMAGES,
  detectMirror,
  enableUnitInTree,
  extractVmlinux,
  importImage,
  isCompleteElf,
  payloadCandidates,
  readManifest,
  resolveInTree,
} from '../../src/host/image/image.js';

let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'banger-image-test-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A small but well-formed ELF64: header, one PT_LOAD segment, a section header table at the end. */
function fakeElf(bodyBytes = 256 * 1024): Buffer {
  const bodyOff = 0x1000;
  const shOff = bodyOff + bodyBytes;
  const buf = Buffer.alloc(shOff + 64);
  buf.writeUInt32BE(0x7f454c46, 0);
  buf[4] = 2; // ELFCLASS64
  buf[5] = 1; // little endian
  buf[6] = 1;
  buf.writeUInt16LE(2, 0x10); // ET_EXEC
  buf.writeUInt16LE(0x3e, 0x12); // x86-64
  buf.writeUInt32LE(1, 0x14);
  buf.writeBigUInt64LE(0x1000000n, 0x18);
  buf.writeBigUInt64LE(64n, 0x20); // e_phoff
  buf.writeBigUInt64LE(BigInt(shOff), 0x28); // e_shoff
  buf.writeUInt16LE(64, 0x34);
  buf.writeUInt16LE(56, 0x36); // e_phentsize
  buf.writeUInt16LE(1, 0x38); // e_phnum
  buf.writeUInt16LE(64, 0x3a); // e_shentsize
  buf.writeUInt16LE(1, 0x3c); // e_shnum
  buf.writeUInt32LE(1, 64); // PT_LOAD
  buf.writeBigUInt64LE(BigInt(bodyOff), 64 + 0x08);
  buf.writeBigUInt64LE(BigInt(bodyBytes), 64 + 0x20);
  // compressible but not trivial body
  const text = Buffer.from('banger kernel text segment '.repeat(64));
  for (let o = bodyOff; o < shOff; o += text.length) text.copy(buf, o, 0, Math.min(text.length, shOff - o));
  randomBytes(4096).copy(buf, bodyOff + 8192);
  return buf;
}

const COMPRESS: Record<string, string[]> = {
  lz4: ['lz4', '-l', '-c', '-q'], // -l: the legacy frame format the kernel uses
  xz: ['xz', '-c', '--check=crc32'],
  zstd: ['zstd', '-c', '-q'],
  gzip: ['gzip', '-c', '-n'],
};

async function compress(format: string, data: Buffer): Promise<Buffer> {
  const src = join(dir, `plain-${format}`);
  const out = join(dir, `compressed-${format}`);
  await writeFile(src, data);
  await run('sh', ['-c', 'src=$1; out=$2; shift 2; "$@" < "$src" > "$out"', 'sh', src, out, ...COMPRESS[format]]);
  return readFile(out);
}

/** Setup-ish bytes without any compression magic, the payload, the kernel's appended size, then junk. */
function bzImageLike(payload: Buffer, elfSize: number): Buffer {
  const head = Buffer.alloc(0x4000, 0x90);
  head.write('not really a boot sector', 0x10);
  const size = Buffer.alloc(4);
  size.writeUInt32LE(elfSize);
  return Buffer.concat([head, payload, size, Buffer.from('\x00\x00TRAILING JUNK after the stream'.repeat(50))]);
}

/** A bzImage header (HdrS, boot protocol 2.15) that points at the payload, as a real one does. */
function realishBzImage(payload: Buffer, elfSize: number): Buffer {
  const setupSects = 3;
  const pm = (setupSects + 1) * 512;
  const payloadOffset = 0x200;
  const withSize = Buffer.concat([payload, Buffer.alloc(4)]);
  withSize.writeUInt32LE(elfSize, payload.length);
  const buf = Buffer.alloc(pm + payloadOffset + withSize.length + 1000, 0);
  buf[0x1f1] = setupSects;
  buf.write('HdrS', 0x202, 'latin1');
  buf.writeUInt16LE(0x20f, 0x206);
  buf.writeUInt32LE(payloadOffset, 0x248);
  buf.writeUInt32LE(withSize.length, 0x24c);
  withSize.copy(buf, pm + payloadOffset);
  // a decoy magic before the payload that does not decompress
  Buffer.from([0x02, 0x21, 0x4c, 0x18, 1, 2, 3, 4]).copy(buf, 0x300);
  return buf;
}

describe('extractVmlinux', () => {
  const elf = fakeElf();

  for (const format of ['lz4', 'xz', 'zstd', 'gzip']) {
    it(`finds and decompresses a ${format} payload followed by junk`, async () => {
      const payload = await compress(format, elf);
      const img = join(dir, `bz-${format}`);
      await writeFile(img, bzImageLike(payload, elf.length));
      const out = join(dir, `vmlinux-${format}`);
      const r = await extractVmlinux(img, out);
      expect(r).toMatchObject({ ok: true, format, offset: 0x4000, bytes: elf.length });
      expect((await readFile(out)).equals(elf)).toBe(true);
      expect(await isCompleteElf(out)).toBe(true);
      expect((await readdir(dir)).filter((n) => n.startsWith('.vmlinux-'))).toEqual([]);
    });
  }

  it('prefers the payload the bzImage header points at over a decoy magic', async () => {
    const payload = await compress('lz4', elf);
    const buf = realishBzImage(payload, elf.length);
    const cands = payloadCandidates(buf);
    expect(cands[0]).toMatchObject({ source: 'header', offset: 4 * 512 + 0x200, length: payload.length + 4 });
    expect(cands.some((c) => c.offset === 0x300)).toBe(true);
    const img = join(dir, 'bz-header');
    await writeFile(img, buf);
    const r = await extractVmlinux(img, join(dir, 'vmlinux-header'));
    expect(r).toMatchObject({ ok: true, format: 'lz4', offset: 4 * 512 + 0x200 });
  });

  it('reports failure instead of keeping a truncated or missing kernel', async () => {
    const payload = await compress('xz', elf);
    const truncated = join(dir, 'bz-truncated');
    await writeFile(truncated, bzImageLike(payload.subarray(0, payload.length >> 1), elf.length));
    const r1 = await extractVmlinux(truncated, join(dir, 'vmlinux-truncated'));
    expect(r1.ok).toBe(false);
    expect(existsSync(join(dir, 'vmlinux-truncated'))).toBe(false);

    const none = join(dir, 'bz-none');
    await writeFile(none, Buffer.alloc(10000, 0x41));
    const r2 = await extractVmlinux(none, join(dir, 'vmlinux-none'));
    expect(r2).toMatchObject({ ok: false });
    if (!r2.ok) expect(r2.reason).toMatch(/no lz4, xz, zstd or gzip payload/);

    // an ELF whose segment points past its end is not complete
    const short = fakeElf();
    const cut = join(dir, 'elf-cut');
    await writeFile(cut, short.subarray(0, short.length - 5000));
    expect(await isCompleteElf(cut)).toBe(false);
  });
});

describe('detectMirror', () => {
  async function fakeRoot(name: string, files: Record<string, string>): Promise<string> {
    const root = join(dir, name);
    for (const [p, text] of Object.entries(files)) {
      await mkdir(join(root, p, '..'), { recursive: true });
      await writeFile(join(root, p), text);
    }
    return root;
  }

  it('reads deb822 .sources and skips the security archive, disabled stanzas and other vendors', async () => {
    const root = await fakeRoot('apt822', {
      'etc/apt/sources.list.d/a-nodesource.sources':
        'Types: deb\nURIs: https://repo.invalid/node_20.x\nSuites: nodistro\nComponents: main\n',
      'etc/apt/sources.list.d/debian.sources': [
        'Types: deb',
        'URIs: http://mirror-sec.invalid/debian-security',
        'Suites: bookworm-security',
        'Components: main',
        '',
        'Types: deb deb-src',
        'URIs: http://disabled.invalid/debian',
        'Suites: bookworm',
        'Components: main',
        'Enabled: no',
        '',
        'Types: deb',
        '# a comment line inside the stanza',
        'URIs: http://mirror.invalid/debian/',
        'Suites: bookworm bookworm-updates',
        'Components: main contrib',
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg',
        '',
      ].join('\n'),
      'etc/apt/sources.list.d/other.list.disabled': 'deb http://wrong.invalid/debian bookworm main\n',
    });
    expect(detectMirror(root)).toBe('http://mirror.invalid/debian');
  });

  it('reads one-line sources.list with options and comments', async () => {
    const root = await fakeRoot('aptline', {
      'etc/apt/sources.list': [
        '# deb http://commented.invalid/debian bookworm main',
        'deb-src http://src.invalid/debian bookworm main',
        'deb http://security.invalid/debian-security bookworm-security main',
        'deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://line.invalid/debian trixie main non-free-firmware',
      ].join('\n'),
      'etc/apt/sources.list.d/cloud.list': 'deb https://vendor.invalid/apt cloud-sdk-bookworm main\n',
    });
    expect(detectMirror(root)).toBe('http://line.invalid/debian');
  });

  it('returns undefined when nothing fits', async () => {
    const root = await fakeRoot('aptnone', {
      'etc/apt/sources.list.d/x.sources': 'Types: deb\nURIs: http://sec.invalid/debian-security\nSuites: trixie-security\nComponents: main\n',
    });
    expect(detectMirror(root)).toBeUndefined();
    expect(detectMirror(join(dir, 'no-such-root'))).toBeUndefined();
  });
});

describe('tree helpers', () => {
  it('resolves symlinks inside the tree, never outside it, and enables units like systemctl', async () => {
    const tree = join(dir, 'tree');
    await mkdir(join(tree, 'usr', 'lib', 'systemd', 'system'), { recursive: true });
    await mkdir(join(tree, 'etc'), { recursive: true });
    await run('ln', ['-s', 'usr/lib', join(tree, 'lib')]);
    await run('ln', ['-s', '/usr/lib/systemd', join(tree, 'etc', 'abs')]); // absolute: must stay in the tree
    expect(await resolveInTree(tree, '/lib/systemd/system')).toBe(join(tree, 'usr/lib/systemd/system'));
    expect(await resolveInTree(tree, '/etc/abs/system')).toBe(join(tree, 'usr/lib/systemd/system'));
    expect(await resolveInTree(tree, '/../../etc')).toBe(join(tree, 'etc'));
    const unitDir = join(tree, 'usr/lib/systemd/system');
    await writeFile(join(unitDir, 'a.service'), '[Unit]\n[Install]\nWantedBy=multi-user.target\nAlias=b.service\nAlso=c.socket\n');
    await writeFile(join(unitDir, 'c.socket'), '[Install]\nWantedBy=sockets.target\n');
    const made = await enableUnitInTree(tree, 'a.service');
    expect(made.sort()).toEqual(['b.service', 'multi-user.target.wants/a.service', 'sockets.target.wants/c.socket']);
    expect(await run('readlink', [join(tree, 'etc/systemd/system/multi-user.target.wants/a.service')]).then((r) => r.stdout.trim())).toBe(
      '/usr/lib/systemd/system/a.service',
    );
  });
});

describe('importImage and readManifest', () => {
  async function rootfsWith(name: string, withRoot: boolean): Promise<string> {
    const t = join(dir, `${name}-tree`);
    await mkdir(join(t, 'etc'), { recursive: true });
    await mkdir(join(t, 'var', 'lib', 'dpkg'), { recursive: true });
    await writeFile(
      join(t, 'var', 'lib', 'dpkg', 'status'),
      'Package: bash\nStatus: install ok installed\nVersion: 5.2-1\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n\nPackage: git\nStatus: install ok installed\nVersion: 1:2.39\n',
    );
    if (withRoot) {
      await mkdir(join(t, 'root', '.ssh'), { recursive: true });
      await writeFile(join(t, 'root', '.bashrc'), 'alias ll="ls -l"\n');
      await writeFile(join(t, 'root', '.ssh', 'authorized_keys'), 'ssh-ed25519 AAAAold old\n');
    }
    const img = join(dir, `${name}.ext4`);
    await run('truncate', ['-s', '16M', img]);
    await run('mkfs.ext4', ['-F', '-q', '-d', t, img]);
    return img;
  }

  it('imports tiny files into an image directory', async () => {
    const rootfs = await rootfsWith('imp', true);
    const elf = fakeElf();
    const kernel = join(dir, 'imp-vmlinuz');
    await writeFile(kernel, bzImageLike(await compress('lz4', elf), elf.length));
    const initrd = join(dir, 'imp-initrd');
    await writeFile(initrd, 'initrd bytes');
    const imageDir = join(dir, 'images', 'imported');
    const m = await importImage({ name: 'imported', imageDir, rootfs, kernel, initrd, userPubKey: 'ssh-ed25519 AAAAnew banger' });
    expect(m).toMatchObject({
      name: 'imported',
      builderVersion: BUILDER_VERSION,
      kernel: 'vmlinuz',
      vmlinux: 'vmlinux',
      initrd: 'initrd.img',
      rootfs: 'rootfs.ext4',
      workSeed: 'work-seed.ext4',
      packagesFile: 'packages.txt',
      packages: 2,
    });
    expect(m.files['rootfs.ext4']).toBe(16 * 2 ** 20);
    expect(m.files['initrd.img']).toBe(12);
    expect(m.sizeBytes).toBe(Object.values(m.files).reduce((a, b) => a + b, 0));
    expect((await readFile(join(imageDir, 'vmlinux'))).equals(elf)).toBe(true);
    expect(await readFile(join(imageDir, 'packages.txt'), 'utf8')).toBe('bash 5.2-1\ngit 1:2.39\n');
    const seed = join(imageDir, 'work-seed.ext4');
    expect(await readDiskFile(seed, '/.bashrc')).toBe('alias ll="ls -l"\n');
    expect(await readDiskFile(seed, '/.ssh/authorized_keys')).toBe('ssh-ed25519 AAAAold old\nssh-ed25519 AAAAnew banger\n');
    expect(await debugfsStat(seed, '/.ssh/authorized_keys')).toMatchObject({ mode: 0o600 });
    expect(await readManifest(imageDir)).toEqual(m);
    // no temp dirs left next to the image
    expect(await readdir(join(dir, 'images'))).toEqual(['imported']);

    await expect(importImage({ name: 'imported', imageDir, rootfs, kernel })).rejects.toMatchObject({ kind: 'conflict' });
  });

  it('makes an empty seed when the rootfs has no /root, and accepts an ELF kernel as is', async () => {
    const rootfs = await rootfsWith('noroot', false);
    const kernel = join(dir, 'elf-kernel');
    await writeFile(kernel, fakeElf());
    const imageDir = join(dir, 'images2', 'bare');
    const m = await importImage({ name: 'bare', imageDir, rootfs, kernel });
    expect(m.vmlinux).toBe('vmlinux');
    expect(m.initrd).toBeUndefined();
    expect((await stat(join(imageDir, 'vmlinux'))).size).toBe(fakeElf().length);
    const seed = join(imageDir, 'work-seed.ext4');
    expect(await debugfsStat(seed, '/')).toMatchObject({ type: 'directory' });
    expect(await debugfsStat(seed, '/.ssh')).toBeUndefined();
  });

  it('names the missing or wrong input file', async () => {
    const rootfs = await rootfsWith('bad', false);
    const kernel = join(dir, 'k');
    await writeFile(kernel, 'k');
    const imageDir = join(dir, 'images3', 'x');
    await expect(importImage({ name: 'x', imageDir, rootfs: join(dir, 'nope.ext4'), kernel })).rejects.toThrow(/--rootfs .*nope\.ext4/);
    await expect(importImage({ name: 'x', imageDir, rootfs, kernel: join(dir, 'nokernel') })).rejects.toThrow(/--kernel .*nokernel/);
    await expect(importImage({ name: 'x', imageDir, rootfs, kernel, initrd: join(dir, 'noinitrd') })).rejects.toThrow(/--initrd .*noinitrd/);
    await expect(importImage({ name: 'x', imageDir, rootfs: kernel, kernel })).rejects.toThrow(/not an ext2\/3\/4/);
    await expect(importImage({ name: '../evil', imageDir, rootfs, kernel })).rejects.toMatchObject({ kind: 'usage' });
    expect(existsSync(imageDir)).toBe(false);
    // a kernel without a payload still imports, just without vmlinux
    const m = await importImage({ name: 'x', imageDir, rootfs, kernel });
    expect(m.vmlinux).toBeUndefined();
    expect(existsSync(join(imageDir, 'vmlinux'))).toBe(false);
  });

  it('readManifest: not_found with the pull hint, invalid_state for garbage', async () => {
    let err: BangerError | undefined;
    try {
      await readManifest(join(dir, 'images', 'debian-bookworm'));
    } catch (e) {
      err = e as BangerError;
    }
    expect(err?.kind).toBe('not_found');
    expect(err?.hint).toBe('banger image pull debian-bookworm');
    const broken = join(dir, 'images', 'broken');
    await mkdir(broken, { recursive: true });
    await writeFile(join(broken, 'manifest.json'), '{"name": 1}');
    await expect(readManifest(broken)).rejects.toMatchObject({ kind: 'invalid_state' });
  });

  it('knows its images', () => {
    expect(KNOWN_IMAGES['debian-bookworm'].suite).toBe('bookworm');
    expect(KNOWN_IMAGES['debian-trixie'].suite).toBe('trixie');
  });
});
