/**
 * A VM's files on the host, in its directory under <home>/vms/<id>/: its disks, identity disk, host key, serial
 * log and VMM record, and layers.json, which names the files it writes into once a snapshot layered its disks.
 */
import { randomBytes } from 'node:crypto';
import { readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Files, type Layout } from '../paths.js';
import type { DiskLayers } from '../host/vmm/qemu/snapshot.js';

export interface VmFiles {
  dir: string;
  /** A raw root disk: a reflink or sparse copy of the image's rootfs, customised with debugfs. */
  rootDisk: string;
  /** A qcow2 root disk: an overlay on the image's rootfs (QEMU, images that read their identity from a disk). */
  rootOverlay: string;
  /** The VM's identity disk (hostname, host key, network, git identity) for the image to apply at boot. */
  identityDisk: string;
  /** A raw work disk: a clone of the image's template, a fresh one, or a copy of a cached one. */
  workDisk: string;
  /** A qcow2 work disk: an overlay on a cached disk linked beside it (QEMU), or on a snapshot's layer (a fork). */
  workOverlay: string;
  serialLog: string;
  hostKey: string;
  hostKeyPub: string;
  knownHosts: string;
  vmmState: string;
}

export function vmFiles(layout: Layout, id: string): VmFiles {
  const dir = layout.vmDir(id);
  return {
    dir,
    rootDisk: join(dir, Files.rootfs),
    rootOverlay: join(dir, 'root.qcow2'),
    identityDisk: join(dir, 'identity.tar'),
    workDisk: join(dir, Files.workDisk),
    workOverlay: join(dir, 'work.qcow2'),
    serialLog: join(dir, Files.serialLog),
    hostKey: join(dir, Files.hostKey),
    hostKeyPub: join(dir, `${Files.hostKey}.pub`),
    knownHosts: join(dir, Files.knownHosts),
    vmmState: join(dir, 'vmm.json'),
  };
}

/**
 * The files a VM writes into now, when a snapshot layered its disks (or it is a fork); absent: the defaults.
 * `base`: the VM's last snapshot, whose directory holds the layers its current files sit on.
 */
export type VmLayers = DiskLayers & { base?: string };

export async function readLayers(f: VmFiles): Promise<VmLayers | undefined> {
  try {
    return JSON.parse(await readFile(join(f.dir, 'layers.json'), 'utf8')) as VmLayers;
  } catch {
    return undefined;
  }
}

export async function writeLayers(f: VmFiles, layers: VmLayers): Promise<void> {
  const tmp = join(f.dir, `layers.json.${randomBytes(3).toString('hex')}`);
  await writeFile(tmp, JSON.stringify(layers));
  await rename(tmp, join(f.dir, 'layers.json'));
}
