/**
 * A VM's identity as a small read-only disk: a ustar archive of its hostname, SSH host key pair, networkd file,
 * resolv.conf (static networks) and the [user] section of its .gitconfig, attached as a third virtio disk with the
 * serial `banger-identity`. The image's banger-identity.service (image.ts IDENTITY_SCRIPT) finds that disk by its
 * serial, or (Firecracker, which gives drives no serial of ours) by the archive's first member, named
 * `banger-identity` as well, extracts it and installs the files into /etc before networkd and sshd start.
 *
 * Written in-process (a few KiB, under a millisecond), so a create neither edits the root disk nor runs debugfs on
 * the work disk: both stay plain copy-on-write clones of what every VM of the image shares. VMs whose root disk is
 * their own (Firecracker, older images) get the same files written into it instead (customizeRootDisk).
 */
import { mkdtemp, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BangerError } from '../../errors.js';
import type { Runner } from '../exec/runner.js';
import { DebugfsScript, existingPaths, runDebugfs, S_IFDIR } from './debugfs.js';
import { gitconfigWithIdentity, networkdUnit, resolvConf, validateIdentity, withNewline, type Identity, type NetworkConfig, type WorkDiskOptions } from './disks.js';

/** The virtio serial the guest looks for (virtio-blk serials are at most 20 bytes). */
export const IDENTITY_DISK_SERIAL = 'banger-identity';

export interface IdentityDiskContent extends Identity {
  /** The git identity, appended to /root/.gitconfig at boot unless that has a [user] section already. */
  gitIdentity?: WorkDiskOptions['gitIdentity'];
}

/** The files of a VM's identity: name → [content, mode]. */
export function identityFiles(id: IdentityDiskContent): Array<[string, string, number]> {
  validateIdentity(id);
  const files: Array<[string, string, number]> = [
    [IDENTITY_DISK_SERIAL, 'the first member: a disk that starts with this name is an identity disk\n', 0o644],
    ['hostname', id.hostname + '\n', 0o644],
    ['ssh_host_ed25519_key', withNewline(id.hostKey.privateKey), 0o600],
    ['ssh_host_ed25519_key.pub', withNewline(id.hostKey.publicKey.trim()), 0o644],
    ['10-banger.network', networkdUnit(id.network), 0o644],
  ];
  if (id.network.mode === 'static') files.push(['resolv.conf', resolvConf(id.network.dns), 0o644]);
  if (id.network.mode === 'static' && id.network.mac) files.push(['mac', id.network.mac + '\n', 0o644]);
  const gi = id.gitIdentity;
  if (gi && (gi.name || gi.email)) files.push(['gitconfig-user', gitconfigWithIdentity('', gi), 0o644]);
  return files;
}

/**
 * Every identity disk's size (a multiple of it when the files need more): a restored guest keeps the size it saw
 * at boot, so a fork's disk must be as large as its source's for the guest to read it whole.
 */
export const IDENTITY_DISK_BYTES = 64 * 1024;

/** Writes the identity disk (atomically: a disk that exists is whole), zero-padded to IDENTITY_DISK_BYTES. */
export async function writeIdentityDisk(path: string, id: IdentityDiskContent): Promise<void> {
  const tmp = `${path}.partial`;
  const archive = ustar(identityFiles(id));
  const size = Math.ceil(archive.length / IDENTITY_DISK_BYTES) * IDENTITY_DISK_BYTES;
  await writeFile(tmp, Buffer.concat([archive, Buffer.alloc(size - archive.length)]), { mode: 0o600 });
  await rename(tmp, path);
}

const BLOCK = 512;

/** A ustar archive of regular files owned by root, ending in two zero blocks. */
export function ustar(files: Array<[string, string, number]>): Buffer {
  const parts: Buffer[] = [];
  for (const [name, content, mode] of files) {
    const body = Buffer.from(content, 'utf8');
    parts.push(ustarHeader(name, body.length, mode), body, Buffer.alloc((BLOCK - (body.length % BLOCK)) % BLOCK));
  }
  parts.push(Buffer.alloc(2 * BLOCK));
  return Buffer.concat(parts);
}

function ustarHeader(name: string, size: number, mode: number): Buffer {
  if (!/^[A-Za-z0-9._-]{1,99}$/.test(name)) throw new BangerError('internal', `identity file name ${JSON.stringify(name)} is not a plain name`);
  const h = Buffer.alloc(BLOCK);
  const put = (value: string, offset: number, length: number) => h.write(value, offset, length, 'ascii');
  const octal = (n: number, length: number) => n.toString(8).padStart(length - 1, '0');
  put(name, 0, 100);
  put(octal(mode, 8), 100, 8);
  put(octal(0, 8), 108, 8); // uid
  put(octal(0, 8), 116, 8); // gid
  put(octal(size, 12), 124, 12);
  put(octal(0, 12), 136, 12); // mtime: the epoch, so the same identity is the same bytes
  put('        ', 148, 8); // the checksum field counts as spaces while summing
  put('0', 156, 1); // a regular file
  put('ustar\0', 257, 6);
  put('00', 263, 2);
  let sum = 0;
  for (const b of h) sum += b;
  put(`${octal(sum, 7)}\0`, 148, 8);
  return h;
}

/** Where each identity file goes in a root disk (customizeRootDisk). */
const IDENTITY_IN_ROOT: Record<string, string> = {
  hostname: '/etc/hostname',
  ssh_host_ed25519_key: '/etc/ssh/ssh_host_ed25519_key',
  'ssh_host_ed25519_key.pub': '/etc/ssh/ssh_host_ed25519_key.pub',
  '10-banger.network': '/etc/systemd/network/10-banger.network',
  'resolv.conf': '/etc/resolv.conf',
};

/**
 * Per-VM changes to a (cloned) root disk, in one debugfs run and without mounting: hostname, the VM's SSH host
 * key, the network configuration (and resolv.conf for static networks). Existing files are replaced.
 */
export async function customizeRootDisk(
  disk: string,
  opts: {
    hostname: string;
    hostKey: { privateKey: string; publicKey: string };
    network: NetworkConfig;
    runner?: Runner;
    signal?: AbortSignal;
  },
): Promise<{ ms: number }> {
  const t0 = performance.now();
  // validates; `mac` is for a refresh from an identity disk only (a fork's), which a cloned root disk never has
  const files = identityFiles(opts).filter(([name]) => name in IDENTITY_IN_ROOT);
  if (!(await stat(disk).then(() => true, () => false))) throw new BangerError('not_found', `root disk ${disk} does not exist`);
  const tmp = await mkdtemp(join(tmpdir(), 'banger-custom-'));
  try {
    // mkdir onto an existing name corrupts the filesystem (see debugfs.ts): look first.
    const dirs = ['/etc', '/etc/ssh', '/etc/systemd', '/etc/systemd/network'];
    const present = await existingPaths(disk, dirs, { runner: opts.runner, signal: opts.signal });
    const s = new DebugfsScript();
    for (const d of dirs) if (!present.has(d)) s.mkdir(d).setAttrs(d, S_IFDIR | 0o755);
    for (const [name, content, mode] of files) {
      const host = join(tmp, name);
      await writeFile(host, content, { mode });
      s.replaceFile(host, IDENTITY_IN_ROOT[name], mode);
    }
    await runDebugfs(disk, s, { runner: opts.runner, signal: opts.signal });
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return { ms: performance.now() - t0 };
}
