import Database from 'better-sqlite3';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { migrate, openDb, SCHEMA_VERSION, storeBackupPath } from '../../src/store/db.js';

const tmp = () => mkdtempSync(join(tmpdir(), 'store-safety-'));

describe('store migrations across releases', () => {
  it('keeps a copy of an older store, at its old schema, before migrating it', () => {
    const path = join(tmp(), 'banger.db');
    const old = new Database(path);
    migrate(old, SCHEMA_VERSION - 1);
    old.prepare(`INSERT INTO images (name, created_at, manifest) VALUES ('img', 'now', '{}')`).run();
    old.close();
    openDb(path).close();
    const backup = new Database(storeBackupPath(path, SCHEMA_VERSION - 1), { readonly: true });
    expect(backup.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION - 1);
    expect(backup.prepare('SELECT name FROM images').all()).toEqual([{ name: 'img' }]);
    backup.close();
  });

  it('makes no backup of a new store or of one already current', () => {
    const path = join(tmp(), 'banger.db');
    openDb(path).close();
    openDb(path).close();
    for (let v = 0; v <= SCHEMA_VERSION; v++) expect(existsSync(storeBackupPath(path, v))).toBe(false);
  });

  it('refuses a store newer than this code understands, and leaves it as it was', () => {
    const path = join(tmp(), 'banger.db');
    openDb(path).close();
    const newer = new Database(path);
    newer.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    newer.close();
    expect(() => openDb(path)).toThrow(new RegExp(`schema version ${SCHEMA_VERSION + 1}, newer than this banger understands \\(${SCHEMA_VERSION}\\)`));
    const after = new Database(path, { readonly: true });
    expect(after.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION + 1);
    after.close();
  });
});
