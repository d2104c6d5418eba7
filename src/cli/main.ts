/**
 * banger's CLI. One top-level error handler: known errors print one line and a hint and exit with their
 * code (2 usage, 1 operation failed); anything else prints the stack and exits 1.
 */
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { BangerError } from '../errors.js';
import { daemonCommands } from './commands/daemon.js';
import { imageCommands } from './commands/image.js';
import { vmCommands } from './commands/vm.js';
import { snapshotCommands } from './commands/snapshot.js';
import { systemCommands } from './commands/system.js';
import { cacheCommands } from './commands/cache.js';
import { runInspect } from './commands/inspect.js';
import { c, stripControl } from './output.js';
import { call, out, type GlobalArgs } from './context.js';
import type { DoctorCheck } from '../rpc/types.js';
import { buildInfo, versionLine } from '../version.js';
import { versionCheck } from '../version-skew.js';

function fail(e: unknown): never {
  if (e instanceof BangerError) {
    // An error can quote the guest (a serial console tail, a command's stderr): no control sequences reach the terminal.
    process.stderr.write(`${c.red('error:')} ${stripControl(e.message)}\n`);
    if (e.hint) process.stderr.write(`${c.dim('hint:')} ${stripControl(e.hint)}\n`);
    process.exit(e.exitCode);
  }
  const err = e as Error;
  process.stderr.write(`${c.red('unexpected error:')} ${err?.stack ?? String(e)}\n`);
  process.exit(1);
}

process.on('unhandledRejection', fail);

function checkLine(ch: DoctorCheck): string {
  const mark = ch.status === 'ok' ? c.green('ok  ') : ch.status === 'warn' ? c.yellow('warn') : c.red('fail');
  return `${mark} ${ch.name.padEnd(18)} ${ch.detail}${ch.fix ? `\n     ${''.padEnd(18)} ${c.dim('fix: ' + ch.fix)}` : ''}`;
}

async function doctor(a: GlobalArgs): Promise<void> {
  const r = await call('doctor.run', {});
  const daemon = await call('daemon.status', {});
  r.checks.push(versionCheck({ cli: buildInfo(), daemon }));
  out(a, r, () => r.checks.map(checkLine).join('\n'));
  if (!r.ok) process.exitCode = 1;
}

const cli: Argv<GlobalArgs> = yargs(hideBin(process.argv))
  .scriptName('banger')
  .parserConfiguration({ 'populate--': true })
  .option('json', { type: 'boolean', describe: 'print exactly the RPC result as JSON' })
  .command('daemon', 'manage the owner daemon', (y) => daemonCommands(y))
  .command('image', 'manage images', (y) => imageCommands(y))
  .command('vm', 'manage VMs', (y) => vmCommands(y))
  .command('snapshot', 'list, show and delete VM snapshots', (y) => snapshotCommands(y))
  .command('system', 'install the root helper and daemon as systemd units', (y) => systemCommands(y))
  .command('cache', 'the workspace cache: list, prune', (y) => cacheCommands(y))
  .command((await import('./commands/update.js')).updateCommand)
  .command('doctor', 'check what this host can do, with a fix for each problem', (a) => a, (a) => doctor(a))
  .command('inspect [vm]', 'print live state transitions (time, actor, event, from → to)', (y) => y.positional('vm', { type: 'string' }), (a) => runInspect(a))
  .demandCommand(1, 'name a command (banger --help lists them)')
  .strict()
  .help()
  .version(versionLine())
  .fail((msg, err) => {
    if (err) fail(err);
    // yargs spreads some messages (invalid choices) over several lines: one line names the problem.
    const oneLine = String(msg ?? 'invalid usage').replace(/\s*\n\s*/g, ' ').trim();
    process.stderr.write(`${c.red('usage error:')} ${oneLine}\n${c.dim('hint: banger --help')}\n`);
    process.exit(2);
  });

try {
  await cli.parseAsync();
} catch (e) {
  fail(e);
}
