/**
 * Exports in flight write their patch to a temp file next to the user's output path (renamed into place only on
 * success). A daemon killed mid-export cannot clean that up itself, and the next one cannot search the user's
 * directories for it: so each temp file is recorded here first (one small file per export under
 * $BANGER_HOME/exports-in-flight/ naming it), and the next daemon start removes what the records name.
 */
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Layout } from '../paths.js';

/** Only names an export makes (workspace.ts partialPathFor) are ever removed from a record. */
const PARTIAL_NAME = /^\..+\.[0-9a-f]{12}\.partial$/;

const dirOf = (layout: Layout) => join(layout.home, 'exports-in-flight');

/** Runs `fn` with `temp` recorded, so a daemon killed meanwhile leaves a record the next start acts on. */
export async function withRecordedTemp<T>(layout: Layout, temp: string, fn: () => Promise<T>): Promise<T> {
  const dir = dirOf(layout);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const record = join(dir, randomBytes(8).toString('hex'));
  await writeFile(record, temp, { mode: 0o600 });
  try {
    return await fn();
  } finally {
    await rm(record, { force: true });
  }
}

/** At daemon start, before any job runs: the temp files of exports a killed daemon left, and their records. */
export async function clearExportLeftovers(layout: Layout, log: (line: string) => void): Promise<void> {
  const dir = dirOf(layout);
  await mkdir(dir, { recursive: true, mode: 0o700 }); // made here, not by the first export: the home's shape is fixed at start
  const records = await readdir(dir);
  for (const name of records) {
    const record = join(dir, name);
    const temp = (await readFile(record, 'utf8').catch(() => '')).trim();
    if (temp.startsWith('/') && PARTIAL_NAME.test(basename(temp))) {
      await rm(temp, { force: true });
      log(`removed ${temp}, left by an export the previous daemon did not finish`);
    }
    await rm(record, { force: true });
  }
}
