import { BangerError } from '../errors.js';
import type { DB } from './db.js';

export interface VmRow {
  id: string;
  name: string;
  image: string;
  created_at: string;
  state: string;
  snapshot: string | null;
  deleted: number;
}

/** The store's rows are the wire's shapes: `vm events` and `vm logs` print them as they are. */
export type { EventRow, LogRow } from '../rpc/types.js';
import type { EventRow, LogRow } from '../rpc/types.js';

/** Typed access to the store. All multi-row writes go through a transaction. */
export class Store {
  constructor(readonly db: DB) {}

  /** A name is unique among live VMs; a racing insert of a live name gets the same `conflict` error as the check before it. */
  insertVm(row: { id: string; name: string; image: string; createdAt: string; state: string }): void {
    try {
      this.db
        .prepare('INSERT INTO vms (id, name, image, created_at, state) VALUES (?, ?, ?, ?, ?)')
        .run(row.id, row.name, row.image, row.createdAt, row.state);
    } catch (e) {
      if (isUniqueNameViolation(e)) throw this.nameInUse(row.name);
      throw e;
    }
  }

  getVm(id: string): VmRow | undefined {
    return this.db.prepare('SELECT * FROM vms WHERE id = ? AND deleted = 0').get(id) as VmRow | undefined;
  }

  listVms(): VmRow[] {
    return this.db.prepare('SELECT * FROM vms WHERE deleted = 0 ORDER BY created_at, id').all() as VmRow[];
  }

  /** Live VMs matching `ref`: exact name or exact id first, else every id that literally starts with `ref`. */
  resolveVm(ref: string): VmRow[] {
    if (ref.length === 0) return [];
    const exact = this.db.prepare('SELECT * FROM vms WHERE deleted = 0 AND (name = ? OR id = ?)').all(ref, ref) as VmRow[];
    if (exact.length) return exact;
    // substr, not LIKE: `_` and `%` in a ref are characters, never wildcards.
    return this.db.prepare('SELECT * FROM vms WHERE deleted = 0 AND substr(id, 1, length(@ref)) = @ref ORDER BY created_at, id').all({ ref }) as VmRow[];
  }

  /** The one live VM `ref` names, or a `not_found` / `conflict` error that says what to type instead. */
  findVm(ref: string): VmRow {
    const rows = this.resolveVm(ref);
    if (rows.length === 1) return rows[0];
    if (rows.length === 0) throw new BangerError('not_found', `no vm named ${JSON.stringify(ref)} (and no vm id starts with it)`, 'banger vm list shows the VMs');
    const candidates = rows.map((r) => `${r.name} (${r.id})`).join(', ');
    throw new BangerError('conflict', `${JSON.stringify(ref)} matches ${rows.length} VMs: ${candidates}`, 'give more of the id, or the name');
  }

  /** Refuses a name a live VM already has; deleted VMs leave their names free. */
  assertNameFree(name: string): void {
    if (this.liveVmNamed(name)) throw this.nameInUse(name);
  }

  private liveVmNamed(name: string): VmRow | undefined {
    return this.db.prepare('SELECT * FROM vms WHERE name = ? AND deleted = 0').get(name) as VmRow | undefined;
  }

  private nameInUse(name: string): BangerError {
    const holder = this.liveVmNamed(name);
    return new BangerError('conflict', `a vm named ${name} already exists${holder ? ` (id ${holder.id}, ${holder.state})` : ''}`, `pick another --name, or delete it first: banger vm delete ${name}`);
  }

  /** Snapshot + event-log row in one transaction: the persisted state never runs ahead of or behind its log. */
  recordTransition(vmId: string, ev: { actor: string; type: string; payload: unknown; from?: string; to: string }, state: string, snapshot: unknown, name?: string): number {
    return this.db.transaction(() => {
      const seq = ((this.db.prepare('SELECT MAX(seq) m FROM vm_events WHERE vm_id = ?').get(vmId) as { m: number | null }).m ?? 0) + 1;
      this.db
        .prepare('INSERT INTO vm_events (vm_id, seq, time, actor, type, payload, from_state, to_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
        .run(vmId, seq, new Date().toISOString(), ev.actor, ev.type, safeJson(ev.payload), ev.from ?? null, ev.to);
      this.db.prepare('UPDATE vms SET state = ?, snapshot = ?, deleted = ? WHERE id = ?').run(state, safeJson(snapshot), state === 'deleted' ? 1 : 0, vmId);
      // A warm-pool VM's claim renames it: the name goes in with the snapshot that holds the claim.
      if (name !== undefined) this.db.prepare('UPDATE vms SET name = ? WHERE id = ? AND name <> ?').run(name, vmId, name);
      return seq;
    })();
  }

  events(vmId: string): EventRow[] {
    const rows = this.db.prepare('SELECT * FROM vm_events WHERE vm_id = ? ORDER BY seq').all(vmId) as Array<Record<string, unknown>>;
    return rows.map((r) => ({
      vmId: r.vm_id as string,
      seq: r.seq as number,
      time: r.time as string,
      actor: r.actor as string,
      type: r.type as string,
      payload: JSON.parse(r.payload as string),
      from: r.from_state as string | null,
      to: r.to_state as string | null,
    }));
  }

  log(vmId: string, stage: string, status: LogRow['status'], durationMs?: number, message?: string): LogRow {
    const time = new Date().toISOString();
    const r = this.db
      .prepare('INSERT INTO vm_logs (vm_id, time, stage, status, duration_ms, message) VALUES (?, ?, ?, ?, ?, ?)')
      .run(vmId, time, stage, status, durationMs ?? null, message ?? null);
    return { vmId, seq: Number(r.lastInsertRowid), time, stage, status, durationMs, message };
  }

  logs(vmId: string, afterSeq = 0): LogRow[] {
    const rows = this.db.prepare('SELECT * FROM vm_logs WHERE vm_id = ? AND seq > ? ORDER BY seq').all(vmId, afterSeq) as Array<Record<string, unknown>>;
    return rows.map((r) => ({
      vmId: r.vm_id as string,
      seq: r.seq as number,
      time: r.time as string,
      stage: r.stage as string,
      status: r.status as LogRow['status'],
      durationMs: r.duration_ms as number | null,
      message: r.message as string | null,
    }));
  }

  upsertImage(name: string, createdAt: string, manifest: unknown): void {
    this.db
      .prepare('INSERT INTO images (name, created_at, manifest) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET created_at = excluded.created_at, manifest = excluded.manifest')
      .run(name, createdAt, JSON.stringify(manifest));
  }

  deleteImage(name: string): void {
    this.db.prepare('DELETE FROM images WHERE name = ?').run(name);
  }

  listImages(): Array<{ name: string; createdAt: string; manifest: unknown }> {
    return (this.db.prepare('SELECT * FROM images ORDER BY name').all() as Array<Record<string, string>>).map((r) => ({
      name: r.name,
      createdAt: r.created_at,
      manifest: JSON.parse(r.manifest),
    }));
  }

  vmsUsingImage(name: string): string[] {
    return (this.db.prepare('SELECT name FROM vms WHERE image = ? AND deleted = 0').all(name) as Array<{ name: string }>).map((r) => r.name);
  }

  /** Allocate the lowest free address from `candidates` for a VM inside one transaction (never shared, also under concurrency). */
  leaseAddress(vmId: string, candidates: string[]): string | undefined {
    return this.db.transaction(() => {
      const existing = this.db.prepare('SELECT address FROM ip_leases WHERE vm_id = ?').get(vmId) as { address: string } | undefined;
      if (existing) return existing.address;
      const taken = new Set((this.db.prepare('SELECT address FROM ip_leases').all() as Array<{ address: string }>).map((r) => r.address));
      const free = candidates.find((c) => !taken.has(c));
      if (!free) return undefined;
      this.db.prepare('INSERT INTO ip_leases (address, vm_id, leased_at) VALUES (?, ?, ?)').run(free, vmId, new Date().toISOString());
      return free;
    }).immediate();
  }

  releaseAddress(vmId: string): void {
    this.db.prepare('DELETE FROM ip_leases WHERE vm_id = ?').run(vmId);
  }
}

function isUniqueNameViolation(e: unknown): boolean {
  const err = e as { code?: unknown; message?: unknown };
  return err?.code === 'SQLITE_CONSTRAINT_UNIQUE' && typeof err.message === 'string' && err.message.includes('vms.name');
}

function safeJson(v: unknown): string {
  return JSON.stringify(v, (_k, val) => {
    if (val instanceof Error) return { name: val.name, message: val.message };
    if (typeof val === 'bigint') return val.toString();
    return val;
  });
}
