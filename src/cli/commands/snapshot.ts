/** banger vm snapshot|restore|fork and banger snapshot list|show|delete (QEMU and Firecracker VMs). */
import type { Argv } from 'yargs';
import { validateName } from '../../errors.js';
import type { SnapshotView } from '../../rpc/types.js';
import { call, out, usage, type GlobalArgs } from '../context.js';
import { c, fmtBytes, fmtMs, table } from '../output.js';
import { vmSummary } from './vm-view.js';

interface SnapshotArgs extends GlobalArgs {
  snapshot: string;
}

const show = (s: SnapshotView) =>
  [
    `${c.bold(s.name)}  (${s.id})  of vm ${s.vmName}, created ${s.createdAt}`,
    `  image    ${s.image}, ${s.vcpus} vCPU, ${s.memoryMiB} MiB`,
    `  state    ${fmtBytes(s.stateBytes)} (memory and devices)`,
    `  on disk  ${fmtBytes(s.allocatedBytes)} in ${s.dir}`,
    `  saved in ${Object.entries(s.timings).map(([k, v]) => `${k} ${fmtMs(v)}`).join(', ')}`,
    `  used by  ${[...s.users.vms, ...s.users.snapshots].join(', ') || '-'}`,
  ].join('\n');

const listing = (xs: SnapshotView[]) =>
  xs.length
    ? table([['NAME', 'VM', 'CREATED', 'STATE', 'ON DISK', 'USED BY'], ...xs.map((s) => [c.bold(s.name), s.vmName, s.createdAt, fmtBytes(s.stateBytes), fmtBytes(s.allocatedBytes), [...s.users.vms, ...s.users.snapshots].join(',') || '-'])])
    : 'no snapshots (banger vm snapshot <vm>)';

const positiveCount = (v: unknown): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 32) usage(`--count ${String(v)} is not a whole number from 1 to 32`, 'e.g. --count 4');
  return n;
};

/** `vm snapshot`, `vm restore`, `vm fork`: added to the `vm` command. */
export function vmSnapshotCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y
    .command(
      'snapshot <vm>',
      'save a running VM (memory, devices, disks at one instant), then resume it (or stop it with --stop)',
      (a) => a.positional('vm', { type: 'string', demandOption: true }).option('name', { type: 'string', describe: 'snapshot name' }).option('stop', { type: 'boolean', default: false, describe: 'stop the VM once saved' }),
      async (a) => {
        if (a.name !== undefined) validateName('snapshot', a.name);
        const s = await call('vm.snapshot', { vm: a.vm, name: a.name, stop: a.stop });
        out(a, s, () => show(s));
      },
    )
    .command(
      'restore <snapshot>',
      'start a new VM from a snapshot: its memory and disks as they were, in seconds',
      (a) => a.positional('snapshot', { type: 'string', demandOption: true }).option('name', { type: 'string', describe: 'VM name' }),
      async (a) => {
        if (a.name !== undefined) validateName('vm', a.name);
        const t0 = Date.now();
        const v = await call('vm.restore', { snapshot: a.snapshot, name: a.name });
        out(a, v, () => `${vmSummary(v)}\n  ${c.dim(`ready in ${fmtMs(Date.now() - t0)}`)}`);
      },
    )
    .command(
      'fork <source>',
      'K running copies of a VM (snapshotted without stopping it) or of a snapshot, each on its own disks',
      (a) =>
        a
          .positional('source', { type: 'string', demandOption: true, describe: 'a VM or a snapshot' })
          .option('count', { type: 'string', default: '1', describe: 'how many forks' })
          .option('name-prefix', { type: 'string', describe: 'forks are named PREFIX-1 … PREFIX-K (default <source>-fork)' }),
      async (a) => {
        const count = positiveCount(a.count);
        if (a.namePrefix !== undefined) validateName('vm', a.namePrefix);
        const t0 = Date.now();
        const r = await call('vm.fork', { source: a.source, count, namePrefix: a.namePrefix });
        out(a, r, () => [`from snapshot ${c.bold(r.snapshot.name)}`, ...r.forks.map((v) => vmSummary(v)), c.dim(`${r.forks.length} forks ready in ${fmtMs(Date.now() - t0)}`)].join('\n'));
      },
    );
}

export function snapshotCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  const one = <T>(a: Argv<T>) => a.positional('snapshot', { type: 'string', demandOption: true });
  return y
    .command('list', 'list snapshots with their sizes', (a) => a, async (a) => {
      const r = await call('snapshot.list', {});
      out(a, r, () => listing(r));
    })
    .command('show <snapshot>', 'show a snapshot', one, async (a: SnapshotArgs) => {
      const r = await call('snapshot.show', { snapshot: a.snapshot });
      out(a, r, () => show(r));
    })
    .command('delete <snapshot>', 'delete a snapshot (refused while forks are backed by it)', one, async (a: SnapshotArgs) => {
      const r = await call('snapshot.delete', { snapshot: a.snapshot });
      out(a, r, () => `deleted snapshot ${r.deleted}`);
    })
    .demandCommand(1, 'name a snapshot command: list, show or delete');
}
