/**
 * Snapshots in the store: one row per complete snapshot (written last, once its files are all there). What a
 * snapshot is made of lives in its directory, <home>/snapshots/<id>/; `meta` says which files and what VM to make.
 */
import { join } from 'node:path';
import { BangerError } from '../errors.js';
import type { GitIdentity, VmSpec } from '../machines/vm.machine.js';
import type { DB } from './db.js';

export interface SnapshotLayer {
  /** A file name inside the snapshot's directory. */
  file: string;
  format: 'raw' | 'qcow2';
}

export interface SnapshotMeta {
  image: string;
  vcpus: number;
  memoryMiB: number;
  diskBytes: number;
  accel: VmSpec['accel'];
  gitIdentity?: GitIdentity;
  /** Earlier snapshots this one's layers are backed by (a snapshot of a fork), nearest first. */
  chain: string[];
  root: SnapshotLayer;
  work: SnapshotLayer;
  /** QEMU: the migration stream; Firecracker: the VM state file (its memory is in memFile). */
  stateFile: string;
  /** Firecracker: the guest memory file. */
  memFile?: string;
  /** The state's size on disk (Firecracker: state and memory). */
  stateBytes: number;
  /** The VMM the snapshot is for, and so its forks' (absent: QEMU, as every snapshot was before Firecracker's). */
  vmm?: VmSpec['vmm'];
  /** Milliseconds per phase of the save (pause, freeze, migrate, resume/quit). */
  timings: Record<string, number>;
  /** The VM had an identity disk: its restores and forks get one of their own (QEMU restores the same devices). */
  identityDisk?: boolean;
  /** The VM's QEMU had the bulk port, so its restores must have it too (absent: saved before the port existed). */
  bulkPort?: boolean;
  /** The VM's network (absent: user, as every snapshot was before tap restores): each fork gets its own lease. */
  net?: VmSpec['net'];
  /** The builder version of the image the VM ran (absent: before builder 5 recorded it). */
  builderVersion?: number;
  /** The VM's isolation policy, which its forks keep (absent: the default). */
  isolation?: VmSpec['isolation'];
}

export interface SnapshotRecord {
  id: string;
  name: string;
  vmId: string;
  vmName: string;
  createdAt: string;
  meta: SnapshotMeta;
}

/** Where a snapshot's files live. */
export const snapshotDir = (home: string, id: string): string => join(home, 'snapshots', id);

export class SnapshotRepo {
  constructor(private readonly db: DB) {}

  insert(r: SnapshotRecord): void {
    this.db
      .prepare('INSERT INTO snapshots (id, name, vm_id, vm_name, created_at, meta) VALUES (?, ?, ?, ?, ?, ?)')
      .run(r.id, r.name, r.vmId, r.vmName, r.createdAt, JSON.stringify(r.meta));
  }

  get(id: string): SnapshotRecord | undefined {
    const row = this.db.prepare('SELECT * FROM snapshots WHERE id = ?').get(id) as Record<string, string> | undefined;
    return row ? toRecord(row) : undefined;
  }

  list(): SnapshotRecord[] {
    return (this.db.prepare('SELECT * FROM snapshots ORDER BY created_at, id').all() as Array<Record<string, string>>).map(toRecord);
  }

  /** The snapshot a ref names: its exact name or id, else the one id that starts with it. */
  find(ref: string): SnapshotRecord {
    const exact = this.db.prepare('SELECT * FROM snapshots WHERE name = ? OR id = ?').all(ref, ref) as Array<Record<string, string>>;
    const rows = exact.length ? exact : (this.db.prepare('SELECT * FROM snapshots WHERE substr(id, 1, length(?)) = ?').all(ref, ref) as Array<Record<string, string>>);
    if (rows.length === 1) return toRecord(rows[0]);
    if (rows.length === 0) throw new BangerError('not_found', `no snapshot named ${JSON.stringify(ref)} (and no snapshot id starts with it)`, 'banger snapshot list shows the snapshots');
    throw new BangerError('conflict', `${JSON.stringify(ref)} matches ${rows.length} snapshots`, 'give more of the id, or the name');
  }

  assertNameFree(name: string): void {
    const row = this.db.prepare('SELECT id FROM snapshots WHERE name = ?').get(name) as { id: string } | undefined;
    if (row) throw new BangerError('conflict', `a snapshot named ${name} already exists (id ${row.id})`, `pick another --name, or delete it first: banger snapshot delete ${name}`);
  }

  delete(id: string): void {
    this.db.prepare('DELETE FROM snapshots WHERE id = ?').run(id);
  }

  /** Who still needs snapshot `id`'s files: live VMs whose disks are backed by it, and snapshots taken of them. */
  users(id: string): { vms: string[]; snapshots: string[] } {
    const vms = (this.db.prepare('SELECT name, snapshot FROM vms WHERE deleted = 0').all() as Array<{ name: string; snapshot: string | null }>).filter((r) => {
      const chain = (parseJson(r.snapshot) as { context?: { spec?: VmSpec } } | undefined)?.context?.spec?.restore?.chain;
      return Array.isArray(chain) && chain.includes(id);
    });
    const snapshots = this.list().filter((s) => s.meta.chain.includes(id));
    return { vms: vms.map((r) => r.name), snapshots: snapshots.map((s) => s.name) };
  }
}

function toRecord(row: Record<string, string>): SnapshotRecord {
  return { id: row.id, name: row.name, vmId: row.vm_id, vmName: row.vm_name, createdAt: row.created_at, meta: JSON.parse(row.meta) as SnapshotMeta };
}

function parseJson(text: string | null): unknown {
  try {
    return text ? JSON.parse(text) : undefined;
  } catch {
    return undefined;
  }
}
