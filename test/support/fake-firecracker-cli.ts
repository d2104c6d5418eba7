/**
 * The fake Firecracker as an executable for drivers to start (fake-firecracker-bin.mjs), and what it recorded.
 */
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { RecordedRequest } from './fake-firecracker.js';

const fakeBin = join(dirname(fileURLToPath(import.meta.url)), 'fake-firecracker-bin.mjs');

/** A `firecracker` executable in `dir`: a shell wrapper that execs node on the fake with some env knobs. */
export async function makeFakeFirecracker(dir: string, env: Record<string, string> = {}): Promise<{ path: string; record: string }> {
  await mkdir(dir, { recursive: true });
  const record = join(dir, 'requests.jsonl');
  const exports = Object.entries({ FAKE_FC_RECORD: record, ...env })
    .map(([k, v]) => `export ${k}='${v.replace(/'/g, "'\\''")}'`)
    .join('\n');
  const path = join(dir, 'firecracker');
  await writeFile(path, `#!/bin/sh\n${exports}\nexec '${process.execPath}' '${fakeBin}' "$@"\n`);
  await chmod(path, 0o755);
  return { path, record };
}

/** Every request the fakes started from one executable answered, in order. */
export function readRecord(file: string): RecordedRequest[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as RecordedRequest);
}
