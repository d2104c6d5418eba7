/** Export temp files a SIGKILLed daemon left next to the user's output: recorded first, removed at the next start. */
import { existsSync, mkdtempSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { clearExportLeftovers, withRecordedTemp } from '../../src/daemon/export-journal.js';
import { partialPathFor } from '../../src/host/guest/workspace-export.js';
import { layout } from '../../src/paths.js';

it('a temp file recorded by an export that never finished is removed at the next start; nothing else is', async () => {
  const home = mkdtempSync(join(tmpdir(), 'banger-journal-'));
  const out = mkdtempSync(join(tmpdir(), 'banger-out-'));
  const l = layout({ BANGER_HOME: home, BANGER_RUNTIME_DIR: join(home, 'run') });
  const temp = partialPathFor(join(out, 'out.patch'));
  // The daemon dies inside the export: the record stays, the temp file with it.
  const dying = withRecordedTemp(l, temp, async () => {
    writeFileSync(temp, 'half a patch');
    return new Promise<never>(() => {});
  });
  void dying;
  await new Promise((r) => setTimeout(r, 50));
  const records = readdirSync(join(home, 'exports-in-flight'));
  expect(records).toHaveLength(1);
  // A record naming anything but an export's temp name is dropped without touching the file.
  const precious = join(out, 'precious.txt');
  writeFileSync(precious, 'keep');
  writeFileSync(join(home, 'exports-in-flight', 'forged'), precious);
  await clearExportLeftovers(l, () => {});
  expect(existsSync(temp)).toBe(false);
  expect(existsSync(precious)).toBe(true);
  expect(readdirSync(join(home, 'exports-in-flight'))).toEqual([]);
});

it('a finished export leaves no record', async () => {
  const home = mkdtempSync(join(tmpdir(), 'banger-journal-'));
  const l = layout({ BANGER_HOME: home, BANGER_RUNTIME_DIR: join(home, 'run') });
  expect(await withRecordedTemp(l, partialPathFor('/tmp/x.patch'), async () => 7)).toBe(7);
  expect(readdirSync(join(home, 'exports-in-flight'))).toEqual([]);
});
