/** banger vm …: lifecycle verbs over one or more VMs, and what there is to see of them. create/run live in vm-run.ts. */
import type { Argv } from 'yargs';
import type { LogRow } from '../../rpc/types.js';
import { call, out, type GlobalArgs } from '../context.js';
import { diskFlag, memoryFlag, vcpusFlag } from '../flags.js';
import { c, stripControl } from '../output.js';
import { createOptions, createVm, runVm, sshInto } from './vm-run.js';
import { logLine, vmSummary, vmTable } from './vm-view.js';
import { workspaceCommands } from './workspace.js';
import { guestCommands } from './session.js';
import { vmSnapshotCommands } from './snapshot.js';

type Verb = 'start' | 'stop' | 'restart' | 'delete';

interface VmArgs extends GlobalArgs {
  vm: string;
}

interface ManyVmArgs extends GlobalArgs {
  vms: string[];
}

interface SetArgs extends VmArgs {
  vcpus?: string;
  memory?: string;
  disk?: string;
}

interface LogsArgs extends VmArgs {
  follow?: boolean;
  serial?: boolean;
}

interface SshArgs extends VmArgs {
  '--'?: Array<string | number>;
}

const DONE: Record<Verb, string> = { start: 'running', stop: 'stopped', restart: 'running', delete: 'deleted' };

/** One verb over each VM named; with several, one failure does not stop the rest (exit status 1 at the end). */
async function eachVm(verb: Verb, a: ManyVmArgs): Promise<void> {
  const results: unknown[] = [];
  let failed = 0;
  for (const vm of a.vms) {
    try {
      const r = await call(`vm.${verb}`, { vm });
      results.push(r);
      if (!a.json) process.stdout.write(`${DONE[verb]} ${c.bold(r.name)}\n`);
    } catch (e) {
      if (a.vms.length === 1) throw e;
      failed++;
      process.stderr.write(`${c.red('error')} ${vm}: ${(e as Error).message}\n`);
    }
  }
  if (a.json) process.stdout.write(JSON.stringify(a.vms.length === 1 ? results[0] : results, null, 2) + '\n');
  if (failed) process.exitCode = 1;
}

async function setVm(a: SetArgs): Promise<void> {
  const params = { vm: a.vm, vcpus: vcpusFlag(a.vcpus), memoryMiB: memoryFlag(a.memory), disk: await diskFlag(a.disk) };
  const v = await call('vm.set', params);
  out(a, v, () => vmSummary(v));
}

async function logs(a: LogsArgs): Promise<void> {
  const print = (r: LogRow) => process.stdout.write((a.json ? JSON.stringify(r) : logLine(r)) + '\n');
  if (a.serial) {
    const r = await call('vm.logs', { vm: a.vm, serial: true });
    if ('serial' in r) process.stdout.write(process.stdout.isTTY ? stripControl(r.serial) : r.serial);
    return;
  }
  const r = await call('vm.logs', { vm: a.vm, follow: a.follow }, { onStream: print });
  const rows = 'serial' in r ? [] : r;
  // --json: exactly the RPC result (the array); with --follow, one JSON object per line as rows arrive
  if (a.json && !a.follow) return void process.stdout.write(JSON.stringify(rows, null, 2) + '\n');
  for (const row of rows) print(row);
}

const oneVm = <T>(a: Argv<T>) => a.positional('vm', { type: 'string', demandOption: true });

export function vmCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  const each = (verb: Verb, describe: string) => y.command(`${verb} <vms..>`, describe, (a) => a.positional('vms', { type: 'string', array: true, demandOption: true }), (a) => eachVm(verb, a));
  each('start', 'start stopped VMs');
  each('stop', 'stop VMs (ACPI power-off, then kill after a timeout)');
  each('restart', 'restart VMs');
  each('delete', 'delete VMs and their disks');
  guestCommands(y);
  vmSnapshotCommands(y);
  return y
    .command('create', 'create a VM and boot it', (a) => createOptions(a).option('start', { type: 'boolean', default: true, describe: 'boot it (--no-start leaves it stopped)' }).option('workspace', { type: 'string', describe: 'a git repository to prepare into /root/repo (from the workspace cache when it has it)' }), (a) => createVm(a))
    .command(
      'run',
      'create + start + wait for SSH (+ prepare --workspace), then run CMD or a shell',
      (a) =>
        createOptions(a)
          .option('workspace', { type: 'string', describe: 'a git repository to prepare into /root/repo first' })
          .option('rm', { type: 'boolean', default: false, describe: 'delete the VM afterwards' })
          .usage('banger vm run [create flags] [--workspace PATH] [--rm] [-- CMD...]'),
      (a) => runVm(a),
    )
    .command('set <vm>', 'change a stopped VM (disks only grow)', (a) => oneVm(a).option('vcpus', { type: 'string' }).option('memory', { type: 'string', describe: 'MiB' }).option('disk', { type: 'string' }), (a) => setVm(a))
    .command('list', 'list VMs', (a) => a, async (a) => {
      const r = await call('vm.list', {});
      out(a, r, () => vmTable(r));
    })
    .command('show <vm>', 'show a VM', oneVm, async (a: VmArgs) => {
      const v = await call('vm.show', { vm: a.vm });
      out(a, v, () => vmSummary(v));
    })
    .command('events <vm>', 'print the VM\'s event log as JSON lines', oneVm, async (a: VmArgs) => {
      for (const r of await call('vm.events', { vm: a.vm })) process.stdout.write(JSON.stringify(r) + '\n');
    })
    .command('logs <vm>', 'print the VM\'s lifecycle log (every stage with its duration)', (a) => oneVm(a).option('follow', { alias: 'f', type: 'boolean' }).option('serial', { type: 'boolean', describe: 'the serial console instead' }), (a) => logs(a))
    .command('ssh <vm>', 'open a shell in the VM, or run `-- CMD` and exit with its status', oneVm, async (a: SshArgs) => {
      process.exitCode = await sshInto(a.vm, (a['--'] ?? []).map(String));
    })
    .command('workspace', 'copy a git repository into a VM, and get its work back as a patch', (w) => workspaceCommands(w))
    .demandCommand(1, 'name a vm command');
}
