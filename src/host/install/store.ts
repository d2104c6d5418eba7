/** The store across a rollback: the copy db.ts keeps before a newer release migrates it is put back. */
import Database from 'better-sqlite3';
import { copyFile, rename, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { storeBackupPath } from '../../store/db.js';

export type StoreRestore = { restored: false; why: string } | { restored: true; from: string; schema: number };

/** With the daemon stopped: if the store is newer than `understands`, restore the backup made at that schema. */
export async function restoreStoreFor(dbPath: string, understands: number | undefined): Promise<StoreRestore> {
  if (understands === undefined) return { restored: false, why: 'the release does not say which store schema it understands' };
  if (!existsSync(dbPath)) return { restored: false, why: 'no store' };
  const db = new Database(dbPath, { readonly: true, fileMustExist: true });
  const has = db.pragma('user_version', { simple: true }) as number;
  db.close();
  if (has <= understands) return { restored: false, why: `the store (schema ${has}) is one this release understands (${understands})` };
  const backup = storeBackupPath(dbPath, understands);
  if (!existsSync(backup)) return { restored: false, why: `the store is at schema ${has} and there is no ${backup} to restore` };
  await rm(`${dbPath}-wal`, { force: true });
  await rm(`${dbPath}-shm`, { force: true });
  await copyFile(backup, `${dbPath}.restoring`);
  await rename(`${dbPath}.restoring`, dbPath);
  return { restored: true, from: backup, schema: understands };
}
