import Database from 'better-sqlite3';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';

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
];

export type DB = Database.Database;

export function openDb(path: string): DB {
  if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true });
  const db = new Database(path);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = NORMAL');
  db.pragma('foreign_keys = ON');
  db.pragma('busy_timeout = 5000');
  migrate(db);
  return db;
}

export function migrate(db: DB): number {
  const current = db.pragma('user_version', { simple: true }) as number;
  for (let v = current; v < MIGRATIONS.length; v++) {
    db.transaction(() => {
      db.exec(MIGRATIONS[v]);
      db.pragma(`user_version = ${v + 1}`);
    })();
  }
  return MIGRATIONS.length;
}

export const SCHEMA_VERSION = MIGRATIONS.length;
