#!/usr/bin/env node
// Entry point. Runs the compiled CLI from dist/ when it was built from the sources as they are (bootstrap and
// `npm run build` build it; a release has only dist/). Otherwise runs src/ through tsx — correct, but every start
// then pays for compiling TypeScript, so it says so on a terminal.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { distState } from './freshness.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const state = distState(root);
if (state === 'fresh' && process.argv.length === 3 && process.argv[2] === '--version') {
  // The one command that needs neither yargs nor the daemon's client: answered before loading them.
  const { versionLine } = await import('../dist/version.js');
  process.stdout.write(`${versionLine()}\n`);
} else if (state === 'fresh') {
  await import('../dist/cli/main.js');
} else {
  if (process.stderr.isTTY && process.env.BANGER_QUIET_SOURCE !== '1') {
    process.stderr.write(`banger: dist/ is ${state === 'stale' ? 'older than src/' : 'not built'}; running from source (npm run build makes the CLI fast)\n`);
  }
  const { register } = await import('tsx/esm/api');
  register();
  await import('../src/cli/main.ts');
}
