import { existsSync, readFileSync, readdirSync } from 'node:fs';
import {
  chmod,
  link,
  lstat,
  mkdir,
  mkdtemp,
  open,
  readFile,
  readdir,
  readlink,
  realpath,
  rename,
  rm,
  stat,
  symlink,
  unlink,
  writeFile,
} from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, posix } from 'node:path';
import { z } from 'zod';
import { BangerError, errorMessage, validateName } from '../../errors.js';
import { Files } from '../../paths.js';
import { rdumpDir } from '../disk/debugfs.js';
import { readDiskFile } from '../disk/disks.js';
import { Cleanups } from '../exec/cleanups.js';
import { CommandError, run, which, type Runner } from '../exec/runner.js';
import { ensureFreeSpace } from '../disk/space.js';
import { AGENT_FILES, IDENTITY_PATH } from './agent.js';

/**
 * Bump when the image recipe changes, so cached images are rebuilt.
 * 2: banger-identity.service applies the per-VM identity from the work disk at boot (root disks are qcow2 overlays).
 * 3: the guest agent (src/host/image/agent.ts): GET /healthz on a virtio-serial port or vsock, started by udev.
 * 4: the identity comes from a disk of its own (identity-disk.ts), and sshd neither re-executes itself nor runs PAM
 *    for each connection (a connection under TCG: 1.6 s → 0.5 s).
 * 5: the guest agent's POST /identity applies the identity disk again, network and MAC included (banger-identity
 *    --refresh): a fork restored onto a TAP of its own takes its own address. zstd, for full_copy's tar on the link;
 *    sshd is restarted whatever stops it (SSHD_UNIT_DROPIN).
 * 6: banger-identity also finds a disk that starts with the archive member `banger-identity` (Firecracker gives
 *    drives no serial of ours): a Firecracker VM's forks take their own address from an identity disk too.
 */
export const BUILDER_VERSION = 6;

/** The first builder whose guest finds its identity disk without a serial (Firecracker gives drives none of ours). */
export const IDENTITY_MARKER_BUILDER = 6;

export const KNOWN_IMAGES = {
  'debian-bookworm': { suite: 'bookworm' },
  'debian-trixie': { suite: 'trixie' },
} as const satisfies Record<string, { suite: string }>;

export type KnownImageName = keyof typeof KNOWN_IMAGES;

/** Packages on top of Debian's minbase variant. dbus makes logind handle the ACPI power button (clean poweroff). */
export const IMAGE_PACKAGES = [
  'systemd-sysv',
  'udev',
  'dbus',
  'openssh-server',
  'git',
  'ca-certificates',
  'iproute2',
  'linux-image-cloud-amd64',
  'initramfs-tools',
  'e2fsprogs',
  'zstd',
] as const;

export interface ImageManifest {
  name: string;
  createdAt: string;
  suite?: string;
  builderVersion: number;
  /** File name of the bzImage ('vmlinuz'). */
  kernel: string;
  /** File name of the ELF kernel extracted from it ('vmlinux'), when extraction worked. */
  vmlinux?: string;
  initrd?: string;
  rootfs: string;
  workSeed: string;
  packagesFile?: string;
  packages: number;
  sizeBytes: number;
  /** file name → size in bytes */
  files: Record<string, number>;
  /**
   * Where the image's banger-identity.service reads the VM's identity at boot: 'disk', its identity disk (builder
   * 4, identity-disk.ts); 'work-disk', /root/.banger/identity (builders 2 and 3, no longer written: their VMs get
   * the identity written into a cloned root disk, as images without the unit do).
   */
  identity?: 'disk' | 'work-disk';
}

const ManifestSchema = z.object({
  name: z.string(),
  createdAt: z.string(),
  suite: z.string().optional(),
  builderVersion: z.number(),
  kernel: z.string(),
  vmlinux: z.string().optional(),
  initrd: z.string().optional(),
  rootfs: z.string(),
  workSeed: z.string(),
  packagesFile: z.string().optional(),
  packages: z.number(),
  sizeBytes: z.number(),
  files: z.record(z.string(), z.number()),
  identity: z.enum(['disk', 'work-disk']).optional(),
});

export type StageEvent = { stage: string; status: 'start' | 'done'; ms?: number; detail?: string };

// ---------------------------------------------------------------------------------------------------------------
// Mirror detection

const DEBIAN_SUITES = new Set([
  'buster', 'bullseye', 'bookworm', 'trixie', 'forky', 'duke', 'sid',
  'oldoldstable', 'oldstable', 'stable', 'testing', 'unstable', 'experimental',
]);

interface AptSource {
  types: string[];
  uris: string[];
  suites: string[];
  components: string[];
  enabled: boolean;
}

function parseOneLine(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*/, '').trim();
    if (!line) continue;
    // deb [opt=val ...] URI suite [component ...]
    const m = /^(deb|deb-src)\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$/.exec(line);
    if (!m) continue;
    out.push({ types: [m[1]], uris: [m[2]], suites: [m[3]], components: m[4].split(/\s+/).filter(Boolean), enabled: true });
  }
  return out;
}

function parseDeb822(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    let last: string | undefined;
    for (const raw of stanza.split('\n')) {
      if (raw.startsWith('#')) continue;
      if (/^\s/.test(raw) && last) {
        // continuation line
        fields.set(last, `${fields.get(last)} ${raw.trim()}`);
        continue;
      }
      const m = /^([A-Za-z][\w-]*):\s*(.*)$/.exec(raw);
      if (m) {
        last = m[1].toLowerCase();
        fields.set(last, m[2].trim());
      }
    }
    if (!fields.has('uris')) continue;
    const list = (k: string) => (fields.get(k) ?? '').split(/\s+/).filter(Boolean);
    out.push({
      types: list('types'),
      uris: list('uris'),
      suites: list('suites'),
      components: list('components'),
      enabled: !/^(no|false|0)$/i.test(fields.get('enabled') ?? 'yes'),
    });
  }
  return out;
}

const isSecurity = (uri: string, suites: string[]) =>
  /security/i.test(uri) || suites.some((s) => /-security$|\/updates$/.test(s));

const isDebianSuite = (s: string) => DEBIAN_SUITES.has(s.replace(/-(updates|backports|proposed-updates)$/, ''));

/**
 * The host's Debian archive mirror, from its apt sources (sources.list, sources.list.d/*.list, and deb822
 * *.sources): the first `deb` source for a Debian suite with the main component that is not the security archive.
 * `root` replaces "/" (for tests).
 */
export function detectMirror(root = '/'): string | undefined {
  const etc = join(root, 'etc', 'apt');
  const sources: AptSource[] = [];
  const read = (p: string) => {
    try {
      return readFileSync(p, 'utf8');
    } catch {
      return undefined;
    }
  };
  const main = read(join(etc, 'sources.list'));
  if (main !== undefined) sources.push(...parseOneLine(main));
  let names: string[] = [];
  try {
    names = readdirSync(join(etc, 'sources.list.d')).sort();
  } catch {
    /* none */
  }
  for (const n of names) {
    const text = read(join(etc, 'sources.list.d', n));
    if (text === undefined) continue;
    if (n.endsWith('.list')) sources.push(...parseOneLine(text));
    else if (n.endsWith('.sources')) sources.push(...parseDeb822(text));
  }
  for (const s of sources) {
    if (!s.enabled || !s.types.includes('deb')) continue;
    if (!s.components.includes('main')) continue;
    if (!s.suites.some(isDebianSuite)) continue;
    for (const uri of s.uris) {
      if (isSecurity(uri, s.suites)) continue;
      if (!/^(https?|file|ftp):\/\//.test(uri)) continue;
      return uri.replace(/\/+$/, '');
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------------------------
// vmlinux extraction

const PAYLOAD_MAGICS = [
  { format: 'lz4', magic: Buffer.from([0x02, 0x21, 0x4c, 0x18]), cmd: ['lz4', '-dc'] },
  { format: 'xz', magic: Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), cmd: ['xz', '-dc', '--single-stream'] },
  { format: 'zstd', magic: Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), cmd: ['zstd', '-dc'] },
  { format: 'gzip', magic: Buffer.from([0x1f, 0x8b, 0x08]), cmd: ['gzip', '-dc'] },
] as const;

export type KernelPayloadFormat = (typeof PAYLOAD_MAGICS)[number]['format'];

/**
 * Is `file` a complete ELF image? Checks the magic and that every PT_LOAD segment and the section header table lie
 * inside the file (a truncated decompression fails this).
 */
export async function isCompleteElf(file: string): Promise<boolean> {
  const fh = await open(file, 'r');
  try {
    const size = (await fh.stat()).size;
    const h = Buffer.alloc(64);
    const { bytesRead } = await fh.read(h, 0, 64, 0);
    if (bytesRead < 52 || h.readUInt32BE(0) !== 0x7f454c46) return false;
    const is64 = h[4] === 2;
    const le = h[5] === 1;
    const u16 = (b: Buffer, o: number) => (le ? b.readUInt16LE(o) : b.readUInt16BE(o));
    const u32 = (b: Buffer, o: number) => (le ? b.readUInt32LE(o) : b.readUInt32BE(o));
    const u64 = (b: Buffer, o: number) => Number(le ? b.readBigUInt64LE(o) : b.readBigUInt64BE(o));
    const phoff = is64 ? u64(h, 0x20) : u32(h, 0x1c);
    const shoff = is64 ? u64(h, 0x28) : u32(h, 0x20);
    const phentsize = u16(h, is64 ? 0x36 : 0x2a);
    const phnum = u16(h, is64 ? 0x38 : 0x2c);
    const shentsize = u16(h, is64 ? 0x3a : 0x2e);
    const shnum = u16(h, is64 ? 0x3c : 0x30);
    if (phnum === 0 || phoff + phnum * phentsize > size) return false;
    if (shoff && shoff + shnum * shentsize > size) return false;
    const ph = Buffer.alloc(phnum * phentsize);
    await fh.read(ph, 0, ph.length, phoff);
    for (let i = 0; i < phnum; i++) {
      const o = i * phentsize;
      if (u32(ph, o) !== 1) continue; // PT_LOAD
      const off = is64 ? u64(ph, o + 0x08) : u32(ph, o + 0x04);
      const filesz = is64 ? u64(ph, o + 0x20) : u32(ph, o + 0x10);
      if (off + filesz > size) return false;
    }
    return true;
  } finally {
    await fh.close();
  }
}

interface Candidate {
  offset: number;
  length: number;
  source: 'header' | 'scan';
}

/** Where the compressed kernel may start: the bzImage header's payload_offset first, then every magic found. */
export function payloadCandidates(buf: Buffer, maxScan = 8): Candidate[] {
  const out: Candidate[] = [];
  if (buf.length > 0x250 && buf.toString('latin1', 0x202, 0x206) === 'HdrS' && buf.readUInt16LE(0x206) >= 0x208) {
    const setupSects = buf[0x1f1] || 4;
    const offset = (setupSects + 1) * 512 + buf.readUInt32LE(0x248);
    const length = buf.readUInt32LE(0x24c);
    if (length > 0 && offset + length <= buf.length) out.push({ offset, length, source: 'header' });
  }
  const scanned: Candidate[] = [];
  for (const { magic } of PAYLOAD_MAGICS) {
    let from = 0;
    for (let n = 0; n < maxScan; n++) {
      const i = buf.indexOf(magic, from);
      if (i < 0) break;
      if (!out.some((c) => c.offset === i)) scanned.push({ offset: i, length: buf.length - i, source: 'scan' });
      from = i + 1;
    }
  }
  scanned.sort((a, b) => a.offset - b.offset);
  return [...out, ...scanned];
}

export type VmlinuxResult =
  | { ok: true; format: KernelPayloadFormat; offset: number; bytes: number }
  | { ok: false; reason: string };

/**
 * Extract the ELF vmlinux from a bzImage: locate the compressed payload (bzImage header, else magic scan), run the
 * matching decompressor (lz4/xz/zstd/gzip; trailing bytes after the stream are tolerated: the tools' non-zero exit is
 * ignored and the output judged instead) and keep the first output that is a complete ELF file.
 */
export async function extractVmlinux(
  bzImage: string,
  outFile: string,
  opts: { runner?: Runner; signal?: AbortSignal } = {},
): Promise<VmlinuxResult> {
  const runner = opts.runner ?? run;
  const buf = await readFile(bzImage);
  if (buf.length >= 4 && buf.readUInt32BE(0) === 0x7f454c46) {
    return { ok: false, reason: `${bzImage} is already an ELF file, not a bzImage` };
  }
  const candidates = payloadCandidates(buf).slice(0, 12);
  if (candidates.length === 0) return { ok: false, reason: 'no lz4, xz, zstd or gzip payload found in the kernel image' };
  const tmp = await mkdtemp(join(dirname(outFile), '.vmlinux-'));
  const reasons: string[] = [];
  try {
    for (const c of candidates) {
      const kind = PAYLOAD_MAGICS.find((m) => buf.subarray(c.offset, c.offset + m.magic.length).equals(m.magic));
      if (!kind) {
        reasons.push(`payload at ${c.offset} has an unknown compression`);
        continue;
      }
      const payload = join(tmp, 'payload');
      const out = join(tmp, 'vmlinux');
      await writeFile(payload, buf.subarray(c.offset, c.offset + c.length));
      try {
        // sh only redirects stdout to a file (the decompressors' own output options differ per tool).
        const r = await runner('sh', ['-c', 'o=$1; shift; exec "$@" > "$o"', 'sh', out, ...kind.cmd, payload], {
          signal: opts.signal,
          reject: false,
          timeoutMs: 120_000,
        });
        if (r.exitCode === 127) {
          reasons.push(`${kind.cmd[0]} is not installed`);
          continue;
        }
      } catch (e) {
        if ((e as BangerError).kind === 'aborted') throw e;
        reasons.push(`${kind.cmd[0]}: ${errorMessage(e)}`);
        continue;
      }
      if (await isCompleteElf(out).catch(() => false)) {
        const bytes = (await stat(out)).size;
        await rename(out, outFile);
        return { ok: true, format: kind.format, offset: c.offset, bytes };
      }
      reasons.push(`${kind.format} payload at ${c.offset} did not decompress to an ELF file`);
    }
    return { ok: false, reason: reasons.join('; ') };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers: cleanups, stages, paths inside a bootstrap tree

function checkAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw new BangerError('aborted', 'image build aborted');
}

/**
 * Resolve a guest path inside a root tree the way a chroot would: symlinks (absolute ones re-rooted at the tree)
 * never lead outside it. With followLast=false the last component is not followed (to replace a symlink).
 */
export async function resolveInTree(tree: string, guestPath: string, followLast = true): Promise<string> {
  const todo = guestPath.split('/').filter((p) => p && p !== '.');
  let done: string[] = [];
  let hops = 0;
  while (todo.length) {
    const name = todo.shift()!;
    if (name === '..') {
      done.pop();
      continue;
    }
    const host = join(tree, ...done, name);
    const st = await lstat(host).catch(() => undefined);
    if (st?.isSymbolicLink() && (todo.length > 0 || followLast)) {
      if (++hops > 40) throw new BangerError('host', `too many symlinks resolving ${guestPath} in ${tree}`);
      const target = await readlink(host);
      if (target.startsWith('/')) done = [];
      todo.unshift(...target.split('/').filter((p) => p && p !== '.'));
      continue;
    }
    done.push(name);
  }
  return join(tree, ...done);
}

async function writeTreeFile(tree: string, guestPath: string, content: string, mode = 0o644): Promise<void> {
  const parent = await resolveInTree(tree, posix.dirname(guestPath));
  await mkdir(parent, { recursive: true });
  const p = join(parent, posix.basename(guestPath));
  const st = await lstat(p).catch(() => undefined);
  if (st && !st.isFile()) await rm(p, { recursive: true, force: true }); // a symlink could point outside the tree
  await writeFile(p, content, { mode });
  await chmod(p, mode);
}

async function symlinkInTree(tree: string, guestPath: string, target: string): Promise<void> {
  const parent = await resolveInTree(tree, posix.dirname(guestPath));
  await mkdir(parent, { recursive: true });
  const p = join(parent, posix.basename(guestPath));
  const st = await lstat(p).catch(() => undefined);
  if (st) {
    if (st.isSymbolicLink() && (await readlink(p)) === target) return;
    await rm(p, { recursive: true, force: true });
  }
  await symlink(target, p);
}

const UNIT_DIRS = ['/etc/systemd/system', '/usr/lib/systemd/system', '/lib/systemd/system'];

async function findUnit(tree: string, unit: string): Promise<{ guest: string; host: string } | undefined> {
  for (const d of UNIT_DIRS) {
    const guest = `${d}/${unit}`;
    const host = await resolveInTree(tree, guest);
    if (await stat(host).then((s) => s.isFile(), () => false)) return { guest, host };
  }
  return undefined;
}

/** What `systemctl enable UNIT` does, as plain symlinks: WantedBy/RequiredBy links, Alias links, Also units. */
export async function enableUnitInTree(tree: string, unit: string, seen = new Set<string>()): Promise<string[]> {
  if (seen.has(unit)) return [];
  seen.add(unit);
  const found = await findUnit(tree, unit);
  if (!found) throw new BangerError('host', `systemd unit ${unit} is missing from the image`);
  const text = await readFile(found.host, 'utf8');
  const install = new Map<string, string[]>();
  let inInstall = false;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line.startsWith('[')) inInstall = line === '[Install]';
    else if (inInstall && !line.startsWith('#')) {
      const m = /^(\w+)\s*=\s*(.*)$/.exec(line);
      if (m) install.set(m[1], [...(install.get(m[1]) ?? []), ...m[2].split(/\s+/).filter(Boolean)]);
    }
  }
  const made: string[] = [];
  const etc = '/etc/systemd/system';
  const isTemplate = /@\./.test(unit);
  for (const t of install.get('WantedBy') ?? []) {
    if (isTemplate) continue;
    await symlinkInTree(tree, `${etc}/${t}.wants/${unit}`, found.guest);
    made.push(`${t}.wants/${unit}`);
  }
  for (const t of install.get('RequiredBy') ?? []) {
    if (isTemplate) continue;
    await symlinkInTree(tree, `${etc}/${t}.requires/${unit}`, found.guest);
    made.push(`${t}.requires/${unit}`);
  }
  for (const a of install.get('Alias') ?? []) {
    if (a === unit) continue;
    await symlinkInTree(tree, `${etc}/${a}`, found.guest);
    made.push(a);
  }
  for (const also of install.get('Also') ?? []) {
    if (await findUnit(tree, also)) made.push(...(await enableUnitInTree(tree, also, seen)));
  }
  return made;
}

/** `systemctl mask UNIT` as a symlink to /dev/null, plus removal of its .wants links. Skips absent units. */
async function maskUnitInTree(tree: string, unit: string): Promise<boolean> {
  if (!(await findUnit(tree, unit))) return false;
  const etc = await resolveInTree(tree, '/etc/systemd/system');
  for (const d of await readdir(etc).catch(() => [] as string[])) {
    if (d.endsWith('.wants') || d.endsWith('.requires')) await rm(join(etc, d, unit), { force: true });
  }
  await symlinkInTree(tree, `/etc/systemd/system/${unit}`, '/dev/null');
  return true;
}

const BOOTSTRAP_TIMEOUT_S = 3600;

/**
 * Free space a Debian image build needs, checked before it starts: the bootstrap tree (minbase with a kernel,
 * initramfs-tools, git and openssh: about 0.6-0.9 GiB unpacked), the root filesystem made from it (the tree × 1.4,
 * at least 1 GiB, written sparsely), kernel, initrd and work seed copies, and apt's downloaded packages while the
 * tree is built. 3 GiB covers that with room for a suite that grew; a build that would fit in less is refused
 * only when the disk is nearly full anyway.
 */
export const IMAGE_BUILD_BYTES = 3 * 2 ** 30;

/**
 * Names of the temporary directories the builder and the importer make next to an image directory
 * (`.<name>.bootstrap-XXXXXX`, `.<name>.tmp-XXXXXX`, `.<name>.import-XXXXXX`, from mkdtemp). One left behind means
 * a build was killed midway; the daemon removes them at start (no build runs outside a daemon).
 */
export const BUILD_LEFTOVER_RE = /^\..+\.(bootstrap|tmp|import)-[A-Za-z0-9]{6}$/;

const MASKED_UNITS = [
  'apt-daily.timer',
  'apt-daily.service',
  'apt-daily-upgrade.timer',
  'apt-daily-upgrade.service',
  'dpkg-db-backup.timer',
  'e2scrub_all.timer',
  'e2scrub_all.service',
  'e2scrub_reap.service',
  'systemd-timesyncd.service',
  'man-db.timer',
];

export const SSHD_DROPIN = [
  '# written by banger',
  'HostKey /etc/ssh/ssh_host_ed25519_key',
  'PasswordAuthentication no',
  'PermitRootLogin prohibit-password',
  'UseDNS no',
  // No PAM session per connection (logind, env, limits, motd): under TCG it is most of a connection's cost, and
  // the guest is a disposable VM whose only user is root by key.
  'UsePAM no',
  '',
].join('\n');

/** /etc/default/ssh: sshd forks without re-executing itself for each connection (-r), as costly as PAM under TCG. */
export const SSHD_DEFAULTS = '# written by banger\nSSHD_OPTS=-r\n';

/**
 * SSH is the only way in, so sshd is started again whatever made it stop, without a start limit. Debian's unit
 * gives up after an exit status of 255; one guest in some forty boots here (a tap VM, first boot of a new image, a
 * loaded host) had ssh.service fail twice early in boot and never answer, cause not found.
 */
export const SSHD_UNIT_DROPIN = [
  '# written by banger',
  '[Unit]',
  'StartLimitIntervalSec=0',
  '',
  '[Service]',
  'Restart=always',
  'RestartSec=1',
  'RestartPreventExitStatus=',
  '',
].join('\n');

export const FSTAB = [
  '# written by banger: vda is the root disk, the work disk (label banger-work) is /root',
  '/dev/vda / ext4 defaults,noatime 0 1',
  'LABEL=banger-work /root ext4 defaults,nofail 0 2',
  '',
].join('\n');

/**
 * Applies the VM's identity from its identity disk (src/host/disk/identity-disk.ts: a ustar archive on a read-only
 * virtio disk with the serial banger-identity, or whose first member is named so), so the root disk can be a
 * shared, unmodified backing file: hostname, SSH host key, networkd file, resolv.conf for static networks, and the
 * git identity, appended to
 * /root/.gitconfig unless that has a [user] section (a restarted VM keeps what its user set). A VM without an
 * identity disk (its root disk is its own, with the identity written in) is left as it is.
 *
 * With --refresh (the guest agent's POST /identity, after a restore onto another TAP) it reads the disk afresh,
 * past the page cache, and applies the network at once: the MAC, then networkd's addresses and routes.
 */
export const IDENTITY_SCRIPT = [
  '#!/bin/sh',
  "# written by banger: install this VM's identity from its identity disk into /etc (--refresh: and apply it now)",
  'set -eu',
  'refresh=no',
  '[ "${1-}" = --refresh ] && refresh=yes',
  'dev=',
  'for d in /sys/block/vd*; do',
  '  if [ "$(cat "$d/serial" 2>/dev/null)" = banger-identity ]; then dev="/dev/${d##*/}"; fi',
  '  if [ -z "$dev" ] && [ "$(head -c 15 "/dev/${d##*/}" 2>/dev/null)" = banger-identity ]; then dev="/dev/${d##*/}"; fi',
  'done',
  '[ -n "$dev" ] || exit 0',
  'src=/run/banger-identity',
  'rm -rf "$src"',
  'mkdir -m 0700 "$src"',
  'if [ $refresh = yes ]; then blockdev --flushbufs "$dev"; fi',
  'tar -x -f "$dev" -C "$src" --no-same-owner',
  'install -m 0644 "$src/hostname" /etc/hostname',
  'cat /etc/hostname > /proc/sys/kernel/hostname',
  'install -m 0600 "$src/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key',
  'install -m 0644 "$src/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub',
  'install -D -m 0644 "$src/10-banger.network" /etc/systemd/network/10-banger.network',
  'if [ -f "$src/resolv.conf" ]; then install -m 0644 "$src/resolv.conf" /etc/resolv.conf; fi',
  'gc=/root/.gitconfig',
  'if [ -f "$src/gitconfig-user" ] && ! grep -qs "^\\[user\\]" "$gc"; then',
  '  if [ -s "$gc" ] && [ -n "$(tail -c 1 "$gc")" ]; then echo >> "$gc"; fi',
  '  cat "$src/gitconfig-user" >> "$gc"',
  'fi',
  'if [ $refresh = yes ]; then',
  '  # networkd reads the new file before the link comes back up, so that it never applies the old address again',
  '  networkctl reload',
  '  nic=',
  '  for n in /sys/class/net/e*; do if [ -e "$n" ]; then nic="${n##*/}"; fi; done',
  '  if [ -n "$nic" ] && [ -f "$src/mac" ]; then',
  '    ip link set dev "$nic" down',
  '    ip link set dev "$nic" address "$(cat "$src/mac")"',
  '    ip address flush dev "$nic"',
  '    ip link set dev "$nic" up',
  '  fi',
  '  if [ -n "$nic" ]; then networkctl reconfigure "$nic"; fi',
  'fi',
  'rm -rf "$src"',
  '',
].join('\n');

/** After the work disk is at /root (its fstab line is in the image), before networkd and sshd read what it installs. */
export const IDENTITY_UNIT = [
  '# written by banger',
  '[Unit]',
  "Description=banger: apply this VM's identity from its identity disk",
  'DefaultDependencies=no',
  'RequiresMountsFor=/root',
  'Before=systemd-networkd.service ssh.service network-pre.target sysinit.target shutdown.target',
  'Wants=network-pre.target',
  'Conflicts=shutdown.target',
  '',
  '[Service]',
  'Type=oneshot',
  'RemainAfterExit=yes',
  `ExecStart=${IDENTITY_PATH}`,
  '',
  '[Install]',
  'WantedBy=sysinit.target',
  '',
].join('\n');

/** Mount points at or under dir (from /proc/self/mountinfo). */
async function mountsUnder(dir: string): Promise<string[]> {
  const real = await realpath(dir).catch(() => dir);
  const text = await readFile('/proc/self/mountinfo', 'utf8').catch(() => '');
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const mp = line.split(' ')[4];
    if (!mp) continue;
    const p = mp.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (p === real || p.startsWith(real + '/')) out.push(p);
  }
  return out;
}

/** Sum of allocated bytes under dir (does not cross filesystems). */
async function treeBytes(dir: string, exec: TreeExec): Promise<number> {
  const r = await exec('du', ['-s', '-x', '-B1', dir], { reject: false });
  const n = Number(r.stdout.trim().split(/\s+/)[0]);
  if (!Number.isFinite(n) || n <= 0) throw new BangerError('host', `du ${dir} failed: ${r.stderr.trim()}`);
  return n;
}

type TreeExec = (file: string, args: string[], o?: { reject?: boolean; timeoutMs?: number }) => ReturnType<Runner>;

const MiB = 2 ** 20;
const withNewline = (s: string) => (s.endsWith('\n') ? s : s + '\n');
const GiB = 2 ** 30;

async function fsyncPath(p: string): Promise<void> {
  const fh = await open(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Sizes of the image's files, fsync'd. */
async function finishDir(dir: string, manifest: Omit<ImageManifest, 'files' | 'sizeBytes'>): Promise<ImageManifest> {
  const files: Record<string, number> = {};
  let sizeBytes = 0;
  for (const f of (await readdir(dir)).sort()) {
    const st = await stat(join(dir, f));
    if (!st.isFile()) continue;
    files[f] = st.size;
    sizeBytes += st.size;
    await fsyncPath(join(dir, f));
  }
  const full: ImageManifest = { ...manifest, sizeBytes, files };
  const mf = join(dir, Files.manifest);
  const fh = await open(mf, 'w', 0o644);
  try {
    await fh.writeFile(JSON.stringify(full, null, 2) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsyncPath(dir);
  return full;
}

async function publishDir(tmp: string, imageDir: string, name: string): Promise<void> {
  if (existsSync(imageDir)) {
    throw new BangerError('conflict', `image ${name} already exists at ${imageDir}`, `banger image delete ${name}`);
  }
  await rename(tmp, imageDir);
  await fsyncPath(dirname(imageDir));
}

async function makeSeed(
  seed: string,
  fromDir: string | undefined,
  exec: TreeExec,
  minBytes = 16 * MiB,
): Promise<void> {
  let size = minBytes;
  if (fromDir) size = Math.max(minBytes, Math.ceil(((await treeBytes(fromDir, exec)) * 1.5 + 8 * MiB) / MiB) * MiB);
  await exec('truncate', ['-s', String(size), seed]);
  const args = ['-F', '-q', '-L', 'banger-seed', '-E', 'root_owner=0:0'];
  if (fromDir) args.push('-d', fromDir);
  await exec('mkfs.ext4', [...args, seed]);
}

function parseDpkgStatus(text: string): string[] {
  const out: string[] = [];
  for (const stanza of text.split(/\n\n+/)) {
    const pkg = /^Package:\s*(\S+)/m.exec(stanza)?.[1];
    const ver = /^Version:\s*(\S+)/m.exec(stanza)?.[1];
    const st = /^Status:\s*(.*)$/m.exec(stanza)?.[1];
    if (pkg && ver && st?.trim().endsWith(' installed')) out.push(`${pkg} ${ver}`);
  }
  return out.sort();
}

// ---------------------------------------------------------------------------------------------------------------
// Build

export interface BuildImageOptions {
  name: string;
  suite: string;
  imageDir: string;
  mirror?: string;
  /** banger's SSH public key, authorised for root in the image's work seed. */
  userPubKey: string;
  runner?: Runner;
  signal?: AbortSignal;
  onStage?: (ev: StageEvent) => void;
  /** Where the bootstrap tree is built (default: next to imageDir). */
  workDir?: string;
}

/**
 * Build a Debian image with mmdebstrap (or debootstrap) from the host's mirror, without mounting anything into the
 * host: bootstrap → configure → kernel → packages → workseed → rootfs → finish. Everything is built in temporary
 * directories next to imageDir, which appears (atomic rename) only once complete; any failure or abort removes them.
 */
export async function buildImage(opts: BuildImageOptions): Promise<ImageManifest> {
  const mirror = checkBuildOptions(opts);
  const runner = opts.runner ?? run;
  const signal = opts.signal;
  const b = await bootstrapTool(runner);
  // In unshare mode the tree's files belong to sub-uids: tools that read ownership or delete files run inside
  // mmdebstrap's user namespace, where they appear as root.
  const execIn = (sig: AbortSignal | undefined): TreeExec => (file, args, o = {}) =>
    b.mode === 'unshare' ? runner('mmdebstrap', ['--unshare-helper', file, ...args], { signal: sig, ...o }) : runner(file, args, { signal: sig, ...o });
  const treeExec = execIn(signal);
  const cleanups = new Cleanups();
  const parent = dirname(opts.imageDir);
  const base = basename(opts.imageDir);
  // The tree and the finished image may live on different filesystems: each must hold the whole build.
  for (const dir of new Set([opts.workDir ?? parent, parent])) await ensureFreeSpace(dir, IMAGE_BUILD_BYTES, `building image ${opts.name}`);
  const stage = buildStage(opts);
  try {
    await mkdir(parent, { recursive: true });
    const workParent = opts.workDir ?? parent;
    await mkdir(workParent, { recursive: true });
    const treeHolder = await mkdtemp(join(workParent, `.${base}.bootstrap-`));
    const tree = join(treeHolder, 'tree');
    // Cleanups run after an abort too: without the (aborted) signal.
    cleanups.add(`remove ${treeHolder}`, () => removeTree(treeHolder, execIn(undefined)));
    const out = await mkdtemp(join(parent, `.${base}.tmp-`));
    const forgetOut = cleanups.add(`remove ${out}`, () => rm(out, { recursive: true, force: true }));
    await chmod(out, 0o755);
    await stage('bootstrap', () => bootstrapTree(tree, { ...b, suite: opts.suite, mirror, runner, signal }));
    await stage('configure', () => configureTree(tree, opts.userPubKey));
    const kernel = await stage('kernel', () => copyKernel(tree, out, { treeExec, runner, signal }));
    const packages = await stage('packages', () => listPackages(tree, out, runner, signal));
    await stage('workseed', async () => {
      const root = await resolveInTree(tree, '/root');
      await makeSeed(join(out, Files.workSeed), root, treeExec);
      return { value: undefined, detail: `from /root (${(await readdir(root)).join(' ')})` };
    });
    const rootfsBytes = await stage('rootfs', () => makeRootfs(tree, out, { treeExec, runner, signal }));
    return await stage('finish', async () => {
      const manifest = await finishDir(out, {
        name: opts.name,
        createdAt: new Date().toISOString(),
        suite: opts.suite,
        builderVersion: BUILDER_VERSION,
        identity: 'disk',
        kernel: Files.vmlinuz,
        vmlinux: kernel.vmlinux ? Files.vmlinux : undefined,
        initrd: Files.initrd,
        rootfs: Files.rootfs,
        workSeed: Files.workSeed,
        packagesFile: Files.packages,
        packages,
      });
      await publishDir(out, opts.imageDir, opts.name);
      forgetOut();
      const failures = await cleanups.runAll(); // the bootstrap tree
      const sizes = `${Math.round(manifest.sizeBytes / MiB)} MiB (rootfs ${Math.round(rootfsBytes / MiB)} MiB, kernel ${kernel.version})`;
      return { value: manifest, detail: sizes + (failures.length ? `; warning: ${failures.join('; ')}` : '') };
    });
  } catch (e) {
    const failures = await cleanups.runAll();
    if (failures.length && e instanceof Error) e.message += ` (cleanup also failed: ${failures.join('; ')})`;
    if (signal?.aborted && !(e instanceof BangerError && e.kind === 'aborted')) {
      throw new BangerError('aborted', 'image build aborted', undefined, { cause: e });
    }
    throw e;
  }
}

/** Checks a build's options before anything is made; returns the mirror to use. */
function checkBuildOptions(opts: BuildImageOptions): string {
  validateName('image', opts.name);
  if (!/^[a-z][a-z0-9-]*$/.test(opts.suite)) throw new BangerError('usage', `invalid Debian suite ${JSON.stringify(opts.suite)}`);
  if (!opts.userPubKey?.trim()) throw new BangerError('invalid_params', 'buildImage needs the user public key');
  const mirror = (opts.mirror ?? detectMirror())?.replace(/\/+$/, '');
  if (!mirror) throw new BangerError('usage', 'no Debian mirror found in the host apt sources', 'give one with --mirror URL');
  if (!/^(https?|file|ftp):\/\/\S+$/.test(mirror)) {
    throw new BangerError('usage', `invalid mirror ${JSON.stringify(mirror)}`, 'give --mirror URL, e.g. http://<host>/debian');
  }
  if (existsSync(opts.imageDir)) {
    throw new BangerError('conflict', `image ${opts.name} already exists at ${opts.imageDir}`, `banger image delete ${opts.name}`);
  }
  return mirror;
}

/** mmdebstrap (as root, else --mode=unshare), else debootstrap as root. */
async function bootstrapTool(runner: Runner): Promise<{ tool: 'mmdebstrap' | 'debootstrap'; mode: 'root' | 'unshare' }> {
  const isRoot = process.getuid?.() === 0;
  if (await which('mmdebstrap', runner)) return { tool: 'mmdebstrap', mode: isRoot ? 'root' : 'unshare' };
  if (isRoot && (await which('debootstrap', runner))) return { tool: 'debootstrap', mode: 'root' };
  throw new BangerError(
    'unsupported',
    isRoot ? 'neither mmdebstrap nor debootstrap is installed' : 'building an image as a normal user needs mmdebstrap',
    isRoot ? 'install mmdebstrap (apt install mmdebstrap)' : 'run as root, or install mmdebstrap (apt install mmdebstrap) so the build can use --mode=unshare',
  );
}

/** A build stage: checks for an abort, reports start and done (with its duration and detail) to opts.onStage. */
function buildStage(opts: BuildImageOptions) {
  const emit = opts.onStage ?? (() => {});
  return async <T>(name: string, fn: () => Promise<{ value: T; detail?: string }>): Promise<T> => {
    checkAborted(opts.signal);
    emit({ stage: name, status: 'start' });
    const t0 = performance.now();
    const { value, detail } = await fn();
    emit({ stage: name, status: 'done', ms: Math.round(performance.now() - t0), detail });
    return value;
  };
}

interface BootstrapOptions {
  tool: 'mmdebstrap' | 'debootstrap';
  mode: 'root' | 'unshare';
  suite: string;
  mirror: string;
  runner: Runner;
  signal?: AbortSignal;
}

/** The Debian tree, minbase plus IMAGE_PACKAGES. */
async function bootstrapTree(tree: string, o: BootstrapOptions): Promise<{ value: undefined; detail: string }> {
  await mkdir(tree, { mode: 0o755 });
  const include = IMAGE_PACKAGES.join(',');
  const argv =
    o.tool === 'mmdebstrap'
      ? [
          'mmdebstrap',
          '--variant=minbase',
          `--mode=${o.mode}`,
          '--format=directory',
          '--components=main',
          `--include=${include}`,
          '--aptopt=Acquire::Retries "3"',
          '--dpkgopt=path-exclude=/usr/share/man/*',
          '--dpkgopt=path-exclude=/usr/share/info/*',
          '--dpkgopt=path-exclude=/usr/share/doc/*',
          '--dpkgopt=path-include=/usr/share/doc/*/copyright',
          o.suite,
          tree,
          o.mirror,
        ]
      : ['debootstrap', '--variant=minbase', `--include=${include}`, '--components=main', o.suite, tree, o.mirror];
  // Under coreutils' timeout, in its own process group: a SIGTERM (abort) reaches every process of the
  // bootstrap. Sent to mmdebstrap alone, it waits for its whole setup (minutes) before exiting; sent to the
  // group, it unmounts what it mounted in the tree and exits within a second.
  try {
    await o.runner('timeout', ['--kill-after=30', String(BOOTSTRAP_TIMEOUT_S), ...argv], { signal: o.signal });
  } catch (e) {
    if (!(e instanceof CommandError)) throw e;
    const lines = e.stderr.trim().split('\n');
    const tail = lines.filter((l) => /^(E|W): /.test(l)).slice(-4).join('\n') || lines.slice(-4).join('\n');
    throw new BangerError(
      'host',
      e.exitCode_ === 124 ? `${o.tool} took longer than ${BOOTSTRAP_TIMEOUT_S} s` : `${o.tool} failed (exit ${e.exitCode_}): ${tail}`,
      `check that the mirror ${o.mirror} is reachable (or pass another with --mirror URL)`,
      { cause: e },
    );
  }
  await chmod(tree, 0o755); // becomes the guest's "/"
  return { value: undefined, detail: `${o.tool}${o.tool === 'mmdebstrap' ? ` --mode=${o.mode}` : ''} ${o.suite} from ${o.mirror}` };
}

/** banger's files in the tree: fstab, sshd, the identity unit, the agent, units enabled and masked, root's key. */
async function configureTree(tree: string, userPubKey: string): Promise<{ value: undefined; detail: string }> {
  await writeTreeFile(tree, '/etc/fstab', FSTAB);
  await writeTreeFile(tree, '/etc/hostname', 'banger\n');
  // The build host's resolver means nothing in a guest; static networks get theirs per VM.
  await writeTreeFile(tree, '/etc/resolv.conf', '# banger writes this file for VMs with a static network\n');
  await writeTreeFile(tree, '/etc/ssh/sshd_config.d/banger.conf', SSHD_DROPIN);
  await writeTreeFile(tree, '/etc/default/ssh', SSHD_DEFAULTS);
  await writeTreeFile(tree, '/etc/systemd/system/ssh.service.d/banger.conf', SSHD_UNIT_DROPIN);
  await writeTreeFile(tree, IDENTITY_PATH, IDENTITY_SCRIPT, 0o755);
  await writeTreeFile(tree, '/etc/systemd/system/banger-identity.service', IDENTITY_UNIT);
  for (const [path, [content, mode]] of Object.entries(AGENT_FILES)) await writeTreeFile(tree, path, content, mode);
  const sshDir = await resolveInTree(tree, '/etc/ssh');
  for (const f of await readdir(sshDir)) if (f.startsWith('ssh_host_')) await unlink(join(sshDir, f));
  const machineId = await resolveInTree(tree, '/etc/machine-id');
  if (/^[0-9a-f]{32}\s*$/.test(await readFile(machineId, 'utf8').catch(() => ''))) await writeFile(machineId, '');
  const enabled = [
    ...(await enableUnitInTree(tree, 'systemd-networkd.service')),
    ...(await enableUnitInTree(tree, 'ssh.service')),
    ...(await enableUnitInTree(tree, 'banger-identity.service')),
  ];
  const masked: string[] = [];
  for (const u of MASKED_UNITS) if (await maskUnitInTree(tree, u)) masked.push(u);
  const root = await resolveInTree(tree, '/root');
  await mkdir(join(root, '.ssh'), { recursive: true });
  await chmod(root, 0o700);
  await chmod(join(root, '.ssh'), 0o700);
  await writeTreeFile(tree, '/root/.ssh/authorized_keys', withNewline(userPubKey.trim()), 0o600);
  return { value: undefined, detail: `enabled ${enabled.length} unit links, masked ${masked.join(' ')}` };
}

interface TreeStepOptions {
  treeExec: TreeExec;
  runner: Runner;
  signal?: AbortSignal;
}

/** The newest kernel and initrd of the tree, copied out, and the ELF vmlinux extracted for Firecracker. */
async function copyKernel(tree: string, out: string, o: TreeStepOptions): Promise<{ value: { version: string; vmlinux: boolean }; detail: string }> {
  const boot = await resolveInTree(tree, '/boot');
  const names = await readdir(boot);
  const newest = (prefix: string) =>
    names
      .filter((n) => n.startsWith(prefix))
      .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }))
      .pop();
  const vmlinuz = newest('vmlinuz-');
  const initrd = newest('initrd.img-');
  if (!vmlinuz) throw new BangerError('host', 'the bootstrap installed no kernel (/boot/vmlinuz-* is missing)');
  if (!initrd) throw new BangerError('host', 'the bootstrap made no initrd (/boot/initrd.img-* is missing)');
  await o.treeExec('cp', [join(boot, vmlinuz), join(out, Files.vmlinuz)]);
  await o.treeExec('cp', [join(boot, initrd), join(out, Files.initrd)]);
  const x = await extractVmlinux(join(out, Files.vmlinuz), join(out, Files.vmlinux), { runner: o.runner, signal: o.signal });
  const detail = x.ok
    ? `${vmlinuz}; vmlinux from the ${x.format} payload at offset ${x.offset} (${x.bytes} bytes)`
    : `${vmlinuz}; warning: no vmlinux (${x.reason}); Firecracker will not be able to use this image`;
  return { value: { version: vmlinuz.slice('vmlinuz-'.length), vmlinux: x.ok }, detail };
}

/** packages.txt: every installed package with its version. */
async function listPackages(tree: string, out: string, runner: Runner, signal?: AbortSignal): Promise<{ value: number; detail: string }> {
  const admindir = await resolveInTree(tree, '/var/lib/dpkg');
  const r = await runner('dpkg-query', [`--admindir=${admindir}`, '-W', '-f', '${Package} ${Version}\n'], { signal });
  const lines = r.stdout.split('\n').filter(Boolean).sort();
  await writeFile(join(out, Files.packages), lines.join('\n') + '\n', { mode: 0o644 });
  return { value: lines.length, detail: `${lines.length} packages` };
}

/** rootfs.ext4 from the tree without /root (the work disk): 1.4 × what the tree uses, at least 1 GiB. */
async function makeRootfs(tree: string, out: string, o: TreeStepOptions): Promise<{ value: number; detail: string }> {
  const root = await resolveInTree(tree, '/root');
  await o.treeExec('find', [root, '-mindepth', '1', '-delete']); // /root is the work disk
  const used = await treeBytes(tree, o.treeExec);
  const size = Math.max(GiB, Math.ceil((used * 1.4) / (64 * MiB)) * 64 * MiB);
  const img = join(out, Files.rootfs);
  await o.runner('truncate', ['-s', String(size), img], { signal: o.signal });
  await o.treeExec(
    'mkfs.ext4',
    ['-F', '-q', '-L', 'banger-root', '-E', 'lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0', '-d', tree, img],
    { timeoutMs: 30 * 60_000 },
  );
  return { value: size, detail: `tree ${Math.round(used / MiB)} MiB → ${Math.round(size / MiB)} MiB ext4` };
}

/**
 * Remove a bootstrap tree. Refuses while anything is mounted inside it (a killed debootstrap may leave /proc or
 * /dev mounted; rm -rf would then reach into the host's), and never crosses filesystems.
 */
async function removeTree(dir: string, exec: TreeExec): Promise<void> {
  let mounts = await mountsUnder(dir);
  if (mounts.length) {
    for (const m of mounts.sort().reverse()) await exec('umount', ['-l', m], { reject: false });
    mounts = await mountsUnder(dir);
    if (mounts.length) {
      throw new BangerError('host', `not removing ${dir}: still mounted inside it: ${mounts.join(', ')}`, `unmount them, then rm -rf ${dir}`);
    }
  }
  await exec('rm', ['-rf', '--one-file-system', dir]);
}

// ---------------------------------------------------------------------------------------------------------------
// Leftovers of killed builds and creates

/** `<disk>.partial` (cloneDisk, createWorkDisk, the clone record) and the doctor's copy-on-write probe directories. */
const PARTIAL_RE = /(\.partial$|^\.banger-cow-probe-[A-Za-z0-9]{6}$)/;

export interface Leftovers {
  /** Removed before clearLeftovers returned: `*.partial` files in VM and image directories. */
  removed: string[];
  /** Build directories being removed in the background (gigabytes, slow). */
  removing: Promise<{ removed: string[]; skipped: string[] }>;
}

/**
 * Removes what a daemon or a build killed midway left behind: `.bootstrap-`/`.tmp-`/`.import-` build directories
 * under imagesDir and `*.partial` files in image and VM directories. Call it at daemon start, before any VM actor
 * or build runs (they run only inside the daemon). The list is taken before it returns, so a build started later
 * is never touched; the big directories are then removed in the background. A tree with something mounted
 * inside is unmounted or, when that fails, skipped with a log line: nothing is removed across a mount.
 */
export async function clearLeftovers(
  dirs: { imagesDir: string; vmsDir: string },
  opts: { runner?: Runner; log?: (line: string) => void } = {},
): Promise<Leftovers> {
  const runner = opts.runner ?? run;
  const log = opts.log ?? (() => {});
  const names = async (dir: string) => (await readdir(dir).catch(() => [] as string[])).map((n) => join(dir, n));
  const buildDirs: string[] = [];
  const partials: string[] = [];
  for (const p of await names(dirs.imagesDir)) {
    if (BUILD_LEFTOVER_RE.test(basename(p))) buildDirs.push(p);
    else if (PARTIAL_RE.test(basename(p))) partials.push(p);
    else if (!basename(p).startsWith('.')) partials.push(...(await names(p)).filter((f) => PARTIAL_RE.test(basename(f))));
  }
  for (const vm of await names(dirs.vmsDir)) partials.push(...(await names(vm)).filter((f) => PARTIAL_RE.test(basename(f))));
  const removed: string[] = [];
  for (const p of partials) {
    try {
      await rm(p, { recursive: true, force: true });
      removed.push(p);
      log(`removed leftover ${p}`);
    } catch (e) {
      log(`could not remove leftover ${p}: ${errorMessage(e)}`);
    }
  }
  return { removed, removing: removeBuildDirs(buildDirs, runner, log) };
}

async function removeBuildDirs(dirs: string[], runner: Runner, log: (line: string) => void): Promise<{ removed: string[]; skipped: string[] }> {
  const out = { removed: [] as string[], skipped: [] as string[] };
  if (!dirs.length) return out;
  const plain: TreeExec = (file, args, o = {}) => runner(file, args, o);
  // An unprivileged build's tree holds files of mmdebstrap's sub-uids: only its user namespace can delete them.
  const helper = process.getuid?.() !== 0 && (await which('mmdebstrap', runner)) !== undefined;
  const inNamespace: TreeExec = (file, args, o = {}) => runner('mmdebstrap', ['--unshare-helper', file, ...args], o);
  for (const dir of dirs) {
    try {
      if (helper) await removeTree(dir, inNamespace).catch(() => removeTree(dir, plain));
      else await removeTree(dir, plain);
      out.removed.push(dir);
      log(`removed the leftover build directory ${dir}`);
    } catch (e) {
      out.skipped.push(dir);
      log(`left the leftover build directory ${dir} in place: ${errorMessage(e)}`);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Import

export interface ImportImageOptions {
  name: string;
  imageDir: string;
  rootfs: string;
  kernel: string;
  initrd?: string;
  /** Added to the work seed's /root/.ssh/authorized_keys. */
  userPubKey?: string;
  runner?: Runner;
  signal?: AbortSignal;
}

/**
 * Import an image from files: an ext2/3/4 root filesystem image, a kernel (bzImage or ELF) and optionally an initrd.
 * The files are copied (reflink where possible, sparse otherwise); the work seed is made from the rootfs's /root.
 */
export async function importImage(opts: ImportImageOptions): Promise<ImageManifest> {
  validateName('image', opts.name);
  const runner = opts.runner ?? run;
  const signal = opts.signal;
  const neededBytes = await checkImportInputs(opts);
  const parent = dirname(opts.imageDir);
  await mkdir(parent, { recursive: true });
  await ensureFreeSpace(parent, neededBytes, `importing image ${opts.name}`);
  const cleanups = new Cleanups();
  try {
    const out = await mkdtemp(join(parent, `.${basename(opts.imageDir)}.import-`));
    const forgetOut = cleanups.add(`remove ${out}`, () => rm(out, { recursive: true, force: true }));
    await chmod(out, 0o755);
    const cp = (src: string, dst: string) => runner('cp', ['--reflink=auto', '--sparse=always', '--', src, join(out, dst)], { signal });
    await cp(opts.rootfs, Files.rootfs);
    await cp(opts.kernel, Files.vmlinuz);
    if (opts.initrd) await cp(opts.initrd, Files.initrd);
    const vmlinux = await importVmlinux(out, runner, signal);
    checkAborted(signal);
    const dump = await mkdtemp(join(tmpdir(), 'banger-import-'));
    cleanups.add(`remove ${dump}`, () => rm(dump, { recursive: true, force: true }));
    await importWorkSeed(opts, join(dump, 'root'), join(out, Files.workSeed), runner);
    // package list, if the rootfs is Debian-like
    const status = await readDiskFile(opts.rootfs, '/var/lib/dpkg/status', { runner, signal }).catch(() => undefined);
    const pkgs = status ? parseDpkgStatus(status) : [];
    if (pkgs.length) await writeFile(join(out, Files.packages), pkgs.join('\n') + '\n', { mode: 0o644 });
    const manifest = await finishDir(out, {
      name: opts.name,
      createdAt: new Date().toISOString(),
      builderVersion: BUILDER_VERSION,
      kernel: Files.vmlinuz,
      vmlinux: vmlinux ? Files.vmlinux : undefined,
      initrd: opts.initrd ? Files.initrd : undefined,
      rootfs: Files.rootfs,
      workSeed: Files.workSeed,
      packagesFile: pkgs.length ? Files.packages : undefined,
      packages: pkgs.length,
    });
    await publishDir(out, opts.imageDir, opts.name);
    forgetOut();
    await cleanups.runAll();
    return manifest;
  } catch (e) {
    await cleanups.runAll();
    throw e;
  }
}

/** Checks the import's files (regular files; the rootfs an ext2/3/4 image) and name; returns the bytes it needs. */
async function checkImportInputs(opts: ImportImageOptions): Promise<number> {
  const inputs: Array<[string, string | undefined]> = [
    ['--rootfs', opts.rootfs],
    ['--kernel', opts.kernel],
    ['--initrd', opts.initrd],
  ];
  // The copies are sparse: they take what the inputs take on disk, plus a work seed and the vmlinux (≤ 64 MiB).
  let neededBytes = 64 * MiB;
  for (const [flag, p] of inputs) {
    if (p === undefined) continue;
    const st = await stat(p).catch(() => undefined);
    if (!st) throw new BangerError('not_found', `${flag} file ${p} does not exist`, `check the path given to ${flag}`);
    if (!st.isFile()) throw new BangerError('usage', `${flag} ${p} is not a regular file`, `give a file to ${flag}`);
    neededBytes += Math.min(st.size, st.blocks * 512);
  }
  const magic = await readBytes(opts.rootfs, 1080, 2);
  if (magic[0] !== 0x53 || magic[1] !== 0xef) {
    throw new BangerError('usage', `--rootfs ${opts.rootfs} is not an ext2/3/4 filesystem image`, 'give a raw ext4 image (e.g. made with mkfs.ext4 -d)');
  }
  if (existsSync(opts.imageDir)) {
    throw new BangerError('conflict', `image ${opts.name} already exists at ${opts.imageDir}`, `banger image delete ${opts.name}`);
  }
  return neededBytes;
}

async function readBytes(file: string, position: number, length: number): Promise<Buffer> {
  const fh = await open(file, 'r');
  const b = Buffer.alloc(length);
  await fh.read(b, 0, length, position).finally(() => fh.close());
  return b;
}

/** vmlinux next to the imported kernel: the kernel itself if it is ELF, else extracted from the bzImage (best effort). */
async function importVmlinux(out: string, runner: Runner, signal?: AbortSignal): Promise<boolean> {
  if ((await readBytes(join(out, Files.vmlinuz), 0, 4)).readUInt32BE(0) === 0x7f454c46) {
    await link(join(out, Files.vmlinuz), join(out, Files.vmlinux));
    return true;
  }
  return (await extractVmlinux(join(out, Files.vmlinuz), join(out, Files.vmlinux), { runner, signal })).ok;
}

/** The work seed from the rootfs's /root (dumped into rootDir), with the user's key added to authorized_keys. */
async function importWorkSeed(opts: ImportImageOptions, rootDir: string, seed: string, runner: Runner): Promise<void> {
  const signal = opts.signal;
  let hasRoot = await rdumpDir(opts.rootfs, '/root', rootDir, { runner, signal });
  if (opts.userPubKey?.trim()) {
    if (!hasRoot) await mkdir(rootDir, { recursive: true, mode: 0o700 });
    hasRoot = true;
    await mkdir(join(rootDir, '.ssh'), { recursive: true, mode: 0o700 });
    const akPath = join(rootDir, '.ssh', 'authorized_keys');
    const prev = await readFile(akPath, 'utf8').catch(() => '');
    const key = opts.userPubKey.trim();
    if (!prev.split('\n').some((l) => l.trim() === key)) {
      await writeFile(akPath, (prev && !prev.endsWith('\n') ? prev + '\n' : prev) + key + '\n', { mode: 0o600 });
    }
    await chmod(akPath, 0o600);
  }
  const hostExec: TreeExec = (file, args, o = {}) => runner(file, args, { signal, ...o });
  await makeSeed(seed, hasRoot ? rootDir : undefined, hostExec);
}

// ---------------------------------------------------------------------------------------------------------------
// Read

/** Read and validate images/<name>/manifest.json. */
export async function readManifest(imageDir: string): Promise<ImageManifest> {
  const name = basename(imageDir);
  let text: string;
  try {
    text = await readFile(join(imageDir, Files.manifest), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new BangerError('not_found', `image ${name} not found`, `banger image pull ${name}`);
    }
    throw e;
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new BangerError('invalid_state', `image ${name}: manifest.json is not valid JSON (${errorMessage(e)})`, `banger image delete ${name} && banger image pull ${name}`);
  }
  const r = ManifestSchema.safeParse(data);
  if (!r.success) {
    throw new BangerError('invalid_state', `image ${name}: manifest.json is invalid: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`, `banger image delete ${name} && banger image pull ${name}`);
  }
  return r.data;
}
