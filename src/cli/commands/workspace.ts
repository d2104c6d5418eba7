/** banger vm workspace prepare / export. */
import { createReadStream } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { pipeline } from 'node:stream/promises';
import { join, resolve } from 'node:path';
import type { Argv } from 'yargs';
import type { ExportResult, WorkspaceMode } from '../../rpc/types.js';
import { call, out, type GlobalArgs } from '../context.js';
import { c } from '../output.js';

interface PrepareArgs extends GlobalArgs {
  vm: string;
  source: string;
  guestPath: string;
  branch?: string;
  from?: string;
  mode: WorkspaceMode;
  readonly: boolean;
  replace: boolean;
}

interface ExportArgs extends GlobalArgs {
  vm: string;
  guestPath: string;
  baseCommit?: string;
  output?: string;
}

async function prepare(a: PrepareArgs): Promise<void> {
  const r = await call('vm.workspace.prepare', { vm: a.vm, source: resolve(a.source), guestPath: a.guestPath, branch: a.branch, from: a.from, mode: a.mode, readOnly: a.readonly, replace: a.replace || undefined });
  out(a, r, () => `prepared ${c.bold(r.repoName)} at ${r.guestPath} (${r.mode}${r.readOnly ? ', read-only' : ''}) HEAD ${String(r.headCommit).slice(0, 12)}${r.branchName ? ` on branch ${r.branchName}` : ''}; ${r.incremental ? 'updated in place, ' : ''}${r.bytesSent} bytes sent, cache ${r.cache}`);
  if (!a.json) for (const warning of r.warnings ?? []) process.stderr.write(`warning: ${warning}\n`);
}

const changes = (r: ExportResult) => `${r.hasChanges ? `${r.changedFiles.length} file(s) changed` : 'no changes'} since ${String(r.baseCommit).slice(0, 12)}`;

/**
 * The daemon writes the patch into a file (whole or not at all, under maxPatchBytes and exportTimeoutMs): the
 * --output file, or a private temp file that is then copied to stdout. On any error nothing reaches stdout.
 */
async function exportPatch(a: ExportArgs): Promise<void> {
  const params = { vm: a.vm, guestPath: a.guestPath, baseCommit: a.baseCommit };
  if (a.output) {
    const r = await call('vm.workspace.export', { ...params, output: resolve(a.output) }, { quiet: true });
    if (a.json) out(a, r, () => '');
    else process.stderr.write(`${changes(r)} → ${a.output}\n`);
    return;
  }
  const dir = await mkdtemp(join(tmpdir(), 'banger-patch-'));
  try {
    const file = join(dir, 'patch');
    const r = await call('vm.workspace.export', { ...params, output: file }, { quiet: true });
    if (a.json) {
      const patch = await readFile(file);
      const utf8 = patch.toString('utf8');
      const binarySafe = Buffer.from(utf8, 'utf8').equals(patch);
      out(a, { ...r, output: undefined, patch: binarySafe ? utf8 : patch.toString('base64'), patchEncoding: binarySafe ? 'utf8' : 'base64' }, () => '');
      return;
    }
    await pipeline(createReadStream(file), process.stdout, { end: false });
    process.stderr.write(`${changes(r)}\n`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export function workspaceCommands(w: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return w
    .command(
      'prepare <vm>',
      'stream the repository (with uncommitted and untracked files) into the guest',
      (a) =>
        a
          .positional('vm', { type: 'string', demandOption: true })
          .option('source', { type: 'string', default: '.', describe: 'host repository' })
          .option('guest-path', { type: 'string', default: '/root/repo' })
          .option('branch', { type: 'string', describe: 'check out a new branch in the guest' })
          .option('from', { type: 'string', describe: 'base ref (default HEAD)' })
          .option('mode', { choices: ['shallow', 'full_history', 'full_copy'] as const, default: 'shallow' as const })
          .option('readonly', { type: 'boolean', default: false })
          .option('replace', { type: 'boolean', default: false, describe: 'replace what is already at the guest path' }),
      (a) => prepare(a),
    )
    .command(
      'export <vm>',
      'print the guest\'s work as a patch for git apply (non-mutating)',
      (a) =>
        a
          .positional('vm', { type: 'string', demandOption: true })
          .option('guest-path', { type: 'string', default: '/root/repo' })
          .option('base-commit', { type: 'string', describe: 'diff against this commit (default the guest HEAD)' })
          .option('output', { alias: 'o', type: 'string', describe: 'write the patch to FILE instead of stdout' }),
      (a) => exportPatch(a),
    )
    .demandCommand(1, 'name a workspace command: prepare or export');
}
