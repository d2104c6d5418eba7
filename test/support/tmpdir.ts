/**
 * Setup file (vitest `setupFiles`): each test file gets a TMPDIR of its own, so whatever a test or the code under
 * test puts in the temp directory (and whatever a test counts there) cannot meet another file's or another run's.
 * Processes the tests start inherit it. Removed after the file's last hook.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';

// The machine's temp directory, remembered once per worker process (files that share a worker must not nest).
process.env.BANGER_TEST_TMP_BASE ??= tmpdir();
const own = mkdtempSync(join(process.env.BANGER_TEST_TMP_BASE, 'bt-'));
process.env.TMPDIR = own;

afterAll(() => {
  if (process.env.TMPDIR === own) process.env.TMPDIR = process.env.BANGER_TEST_TMP_BASE;
  rmSync(own, { recursive: true, force: true });
});
