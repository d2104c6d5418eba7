import Database from 'better-sqlite3';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { dirname } from 'node:path';
import { BangerError } from '../errors.js';

/**
 * The SQLite store. Versioned migrations: each entry runs once, in order, inside a transaction,
 * and `PRAGMA user_version` records how far the database has come.
 */
const MIGRATIONS: string[] = [
  // 1: VMs, their persisted actor snapshots, event logs, lifecycle logs, images
  `
  CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    image TEXT NOT NULL,
    created_at TEXT NOT NULL,
    state TEXT NOT NULL,
    snapshot TEXT,
    deleted INTEGER NOT NULL DEFAULT 0
  );
  CREATE TABLE vm_events (
    vm_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    PRIMARY KEY (vm_id, seq)
  );
  CREATE TABLE vm_logs (
    vm_id TEXT NOT NULL,
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    stage TEXT NOT NULL,
    status TEXT NOT NULL,
    duration_ms INTEGER,
    message TEXT
  );
  CREATE INDEX vm_logs_vm ON vm_logs (vm_id, seq);
  CREATE TABLE images (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    manifest TEXT NOT NULL
  );
  `,
  // 2: address leases for TAP networking (unique per subnet), TAP leases
  `
  CREATE TABLE ip_leases (
    address TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL UNIQUE,
    leased_at TEXT NOT NULL
  );
  CREATE TABLE tap_leases (
    tap TEXT PRIMARY KEY,
    vm_id TEXT UNIQUE,
    leased_at TEXT
  );
  `,
  // 3: a VM name is unique among live VMs only, so a deleted VM's name can be used again. SQLite cannot drop the
  // column's UNIQUE: rebuild the table (nothing references vms by foreign key, no index or trigger sits on it).
  `
  CREATE TABLE vms_v3 (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    created_at TEXT NOT NULL,
    state TEXT NOT NULL,
    snapshot TEXT,
    deleted INTEGER NOT NULL DEFAULT 0
  );
  INSERT INTO vms_v3 (id, name, image, created_at, state, snapshot, deleted)
    SELECT id, name, image, created_at, state, snapshot, deleted FROM vms;
  DROP TABLE vms;
  ALTER TABLE vms_v3 RENAME TO vms;
  CREATE UNIQUE INDEX vms_live_name ON vms (name) WHERE deleted = 0;
  `,
  // 4: snapshots of VMs (QEMU: frozen disk layers + saved memory and devices), see src/store/snapshots.ts
  `
  CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    vm_id TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    meta TEXT NOT NULL
  );
  `,
];

export type DB = Database.Database;

export function openDb(path: string): DB {
  if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true });
  const db = new Database(path);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = NORMAL');
  db.pragma('foreign_keys = ON');
  db.pragma('busy_timeout = 5000');
  try {
    refuseNewerStore(db, path);
    if (path !== ':memory:') backupBeforeMigrating(db, path);
    migrate(db);
  } catch (e) {
    db.close();
    throw e;
  }
  return db;
}

/** Where the copy of a store at schema `version` is kept before a newer release migrates it. */
export const storeBackupPath = (path: string, version: number): string => `${path}.schema-${version}.bak`;

/** A store written by a newer banger: refuse it rather than run with (and write into) a schema we do not know. */
function refuseNewerStore(db: DB, path: string): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  if (current <= MIGRATIONS.length) return;
  throw new BangerError(
    'usage',
    `the store ${path} has schema version ${current}, newer than this banger understands (${MIGRATIONS.length}): a newer release wrote it`,
    `run the newer release again (sudo banger update --rollback undoes a rollback), or restore ${storeBackupPath(path, MIGRATIONS.length)} if an update made one`,
  );
}

/** Before migrating an existing store, keep a consistent copy of it (VACUUM INTO), so a rollback can restore it. */
function backupBeforeMigrating(db: DB, path: string): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  if (current === 0 || current >= MIGRATIONS.length) return;
  const backup = storeBackupPath(path, current);
  if (existsSync(backup)) rmSync(backup);
  db.prepare('VACUUM INTO ?').run(backup);
}

/** Brings the schema up to `target` (default: the newest); tests pass an older target to build an old database. */
export function migrate(db: DB, target = MIGRATIONS.length): number {
  const current = db.pragma('user_version', { simple: true }) as number;
  for (let v = current; v < target; v++) {
    db.transaction(() => {
      db.exec(MIGRATIONS[v]);
      db.pragma(`user_version = ${v + 1}`);
    })();
  }
  return Math.max(current, target);
}

export const SCHEMA_VERSION = MIGRATIONS.length;
