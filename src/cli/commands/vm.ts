// eslint-disable-next-line @typescript-eslint/no-explicit-any -- yargs builder typing is loose on purpose here
import type { Argv as YArgv } from 'yargs';
type Argv<_T = any> = any;
import { writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { BangerError, validateName } from '../../errors.js';
import { shellQuote } from '../../host/shell.js';
import { runInteractive } from '../../host/spawn.js';
import { connectDaemon } from '../connect.js';
import { call, out, usage, type GlobalArgs } from '../context.js';
import { diskFlag, memoryFlag, MIN_DISK_BYTES, vcpusFlag } from '../flags.js';
import { c, fmtBytes, fmtMs, progressPrinter, stateColor, table } from '../output.js';

interface CreateArgs extends GlobalArgs {
  name?: string;
  image?: string;
  vcpus?: string;
  memory?: string;
  disk?: string;
  vmm?: 'auto' | 'firecracker' | 'qemu';
  net?: 'auto' | 'tap' | 'user';
  start?: boolean;
}

const createOptions = (a: Argv) : Argv =>
  a
    .option('name', { type: 'string', describe: 'VM name (letters, digits, . _ -)' })
    .option('image', { type: 'string', describe: 'image name (default debian-bookworm)' })
    .option('vcpus', { type: 'string', describe: 'virtual CPUs' })
    .option('memory', { type: 'string', describe: 'MiB' })
    .option('disk', { type: 'string', describe: 'work disk size, e.g. 8G' })
    .option('vmm', { choices: ['auto', 'firecracker', 'qemu'] as const })
    .option('net', { choices: ['auto', 'tap', 'user'] as const });

/** Checks every create flag before the daemon is reached: a usage error exits 2 and starts nothing. */
function createParams(a: CreateArgs) {
  if (a.name !== undefined) validateName('vm', String(a.name));
  if (a.image !== undefined) validateName('image', String(a.image));
  const vcpus = vcpusFlag(a.vcpus);
  const memoryMiB = memoryFlag(a.memory);
  const disk = diskFlag(a.disk, MIN_DISK_BYTES);
  return { name: a.name, image: a.image, vcpus, memoryMiB, disk, vmm: a.vmm, net: a.net };
}

export function vmSummary(v: any): string {
  const addr = v.guestIp ? v.guestIp : v.sshPort ? `127.0.0.1:${v.sshPort}` : '-';
  const lines = [
    `${c.bold(v.name)} ${c.dim(v.id)} ${stateColor(v.state)}`,
    `  image ${v.image}, ${v.vmm}/${v.accel}, net ${v.net} ${addr}, ${v.vcpus} vcpu, ${v.memoryMiB} MiB, disk ${fmtBytes(v.diskBytes)}${v.pid ? `, pid ${v.pid}` : ''}`,
  ];
  if (v.error) lines.push(`  ${c.red('error')} while ${v.error.stage}: ${v.error.message}`);
  if (v.stopReason && v.state === 'stopped') lines.push(`  ${c.dim(`stopped: ${v.stopReason}`)}`);
  return lines.join('\n');
}

async function ensureImage(image: string | undefined, quiet: boolean): Promise<void> {
  const name = image ?? 'debian-bookworm';
  const list = await call('image.list', {});
  if (list.some((i: any) => i.name === name)) return;
  if (!quiet) process.stderr.write(`image ${name} is not here yet: pulling it\n`);
  await call('image.pull', { name }, { quiet });
}

/** Runs `ssh` with banger's key and the VM's pinned host key; resolves with its exit status. */
export async function sshInto(vm: string, cmd: string[] | undefined, opts: { tty?: boolean; cwd?: string } = {}): Promise<number> {
  const info = await call('vm.ssh', { vm }, { quiet: true });
  const args = [
    '-i', info.identityFile,
    '-p', String(info.port),
    '-o', 'IdentitiesOnly=yes',
    '-o', `UserKnownHostsFile=${info.knownHostsFile}`,
    '-o', `HostKeyAlias=${info.hostKeyAlias}`,
    '-o', 'StrictHostKeyChecking=yes',
    '-o', 'GlobalKnownHostsFile=/dev/null',
    '-o', 'LogLevel=ERROR',
    '-o', 'ConnectTimeout=30',
  ];
  const interactive = !cmd || cmd.length === 0;
  if (interactive || opts.tty) args.push('-t');
  else args.push('-T');
  args.push(`${info.user}@${info.host}`);
  if (opts.cwd) {
    // Run in the workspace: cd there first (the path is quoted; the command stays an argv).
    args.push('--', interactive ? `cd ${shellQuote([opts.cwd])} && exec "\${SHELL:-/bin/sh}" -l` : `cd ${shellQuote([opts.cwd])} && exec ${shellQuote(cmd!)}`);
  } else if (!interactive) args.push('--', shellQuote(cmd!));
  return runInteractive('ssh', args, 'apt-get install openssh-client');
}

export function vmCommands(y: Argv<any>): Argv<any> {
  const each = (verb: 'start' | 'stop' | 'restart' | 'delete', describe: string) =>
    y.command(
      `${verb} <vms..>`,
      describe,
      (a: Argv) => a.positional('vms', { type: 'string', array: true, demandOption: true }),
      async (a: GlobalArgs & { vms: string[] }) => {
        const results: unknown[] = [];
        let failed = 0;
        for (const vm of a.vms) {
          try {
            const r = await call(`vm.${verb}`, { vm });
            results.push(r);
            if (!a.json) process.stdout.write(`${verb === 'delete' ? 'deleted' : verb === 'stop' ? 'stopped' : 'running'} ${c.bold(r.name)}\n`);
          } catch (e) {
            if (a.vms.length === 1) throw e;
            failed++;
            process.stderr.write(`${c.red('error')} ${vm}: ${(e as Error).message}\n`);
          }
        }
        if (a.json) process.stdout.write(JSON.stringify(a.vms.length === 1 ? results[0] : results, null, 2) + '\n');
        if (failed) process.exitCode = 1;
      },
    );

  each('start', 'start stopped VMs');
  each('stop', 'stop VMs (ACPI power-off, then kill after a timeout)');
  each('restart', 'restart VMs');
  each('delete', 'delete VMs and their disks');

  return y
    .command(
      'create',
      'create a VM and boot it',
      (a: Argv) => createOptions(a).option('start', { type: 'boolean', default: true, describe: 'boot it (--no-start leaves it stopped)' }),
      async (a: CreateArgs) => {
        const t0 = Date.now();
        const v = await call('vm.create', { ...createParams(a), start: a.start });
        out(a, v, () => `${vmSummary(v)}\n  ${c.dim(`ready in ${fmtMs(Date.now() - t0)}`)}`);
      },
    )
    .command(
      'run',
      'create + start + wait for SSH (+ prepare --workspace), then run CMD or a shell',
      (a: Argv) =>
        createOptions(a)
          .option('workspace', { type: 'string', describe: 'a git repository to prepare into /root/repo first' })
          .option('rm', { type: 'boolean', default: false, describe: 'delete the VM afterwards' })
          .usage('banger vm run [create flags] [--workspace PATH] [--rm] [-- CMD...]'),
      async (a: CreateArgs & { workspace?: string; rm?: boolean; '--'?: string[] }) => {
        const cmd = (a['--'] ?? []).map(String);
        const params = createParams(a);
        const quiet = !!a.json;
        await ensureImage(a.image, quiet);
        const t0 = Date.now();
        let vm: any;
        let status = 1;
        try {
          const client = await connectDaemon();
          try {
            vm = await client.call('vm.create', { ...params, start: true, wait: false }, { onProgress: progressPrinter(quiet) });
            vm = await client.call('vm.wait', { vm: vm.id, state: 'running' }, { onProgress: progressPrinter(quiet) });
          } finally {
            client.close();
          }
          if (!quiet) process.stderr.write(c.dim(`vm ${vm.name} ready in ${fmtMs(Date.now() - t0)}\n`));
          let cwd: string | undefined;
          if (a.workspace) {
            const r = await call('vm.workspace.prepare', { vm: vm.id, source: resolve(a.workspace) }, { quiet });
            cwd = r.guestPath;
            if (!quiet) process.stderr.write(c.dim(`workspace ${r.repoName} → ${r.guestPath} at ${String(r.headCommit).slice(0, 12)} (export with --base-commit ${r.headCommit})\n`));
          }
          status = await sshInto(vm.id, cmd, { cwd });
        } finally {
          if (a.rm && vm) {
            await call('vm.delete', { vm: vm.id }, { quiet: true }).catch((e) => process.stderr.write(`banger: could not delete ${vm.name}: ${(e as Error).message}\n`));
          }
        }
        process.exitCode = status;
      },
    )
    .command(
      'set <vm>',
      'change a stopped VM (disks only grow)',
      (a: Argv) => a.positional('vm', { type: 'string', demandOption: true }).option('vcpus', { type: 'string' }).option('memory', { type: 'string', describe: 'MiB' }).option('disk', { type: 'string' }),
      async (a: GlobalArgs & { vm: string; vcpus?: string; memory?: string; disk?: string }) => {
        const params = { vm: a.vm, vcpus: vcpusFlag(a.vcpus), memoryMiB: memoryFlag(a.memory), disk: diskFlag(a.disk) };
        const v = await call('vm.set', params);
        out(a, v, () => vmSummary(v));
      },
    )
    .command('list', 'list VMs', {}, async (a: GlobalArgs) => {
      const r = await call('vm.list', {});
      out(a, r, () =>
        r.length
          ? table([
              ['NAME', 'ID', 'STATE', 'IMAGE', 'VMM', 'NET', 'ADDRESS', 'CPU', 'MEM', 'DISK'],
              ...r.map((v: any) => [c.bold(v.name), v.id, stateColor(v.state), v.image, `${v.vmm}/${v.accel}`, v.net, v.guestIp ?? (v.sshPort ? `127.0.0.1:${v.sshPort}` : '-'), String(v.vcpus), `${v.memoryMiB}M`, fmtBytes(v.diskBytes)]),
            ])
          : 'no VMs (banger vm run -- uname -a)',
      );
    })
    .command('show <vm>', 'show a VM', (a: Argv) => a.positional('vm', { type: 'string', demandOption: true }), async (a: GlobalArgs & { vm: string }) => {
      const v = await call('vm.show', { vm: a.vm });
      out(a, v, () => vmSummary(v));
    })
    .command('events <vm>', 'print the VM\'s event log as JSON lines', (a: Argv) => a.positional('vm', { type: 'string', demandOption: true }), async (a: GlobalArgs & { vm: string }) => {
      const rows = await call('vm.events', { vm: a.vm });
      for (const r of rows) process.stdout.write(JSON.stringify(r) + '\n');
    })
    .command(
      'logs <vm>',
      'print the VM\'s lifecycle log (every stage with its duration)',
      (a: Argv) => a.positional('vm', { type: 'string', demandOption: true }).option('follow', { alias: 'f', type: 'boolean' }).option('serial', { type: 'boolean', describe: 'the serial console instead' }),
      async (a: GlobalArgs & { vm: string; follow?: boolean; serial?: boolean }) => {
        const print = (r: any) => {
          if (a.json) return process.stdout.write(JSON.stringify(r) + '\n');
          const mark = r.status === 'done' ? c.green('done ') : r.status === 'error' ? c.red('error') : r.status === 'start' ? c.dim('start') : c.blue('info ');
          process.stdout.write(`${c.dim(r.time)} ${mark} ${r.stage}${r.durationMs !== null && r.durationMs !== undefined ? ` ${c.bold(fmtMs(r.durationMs))}` : ''}${r.message ? ` ${r.message}` : ''}\n`);
        };
        if (a.serial) {
          const r = await call('vm.logs', { vm: a.vm, serial: true });
          process.stdout.write(r.serial);
          return;
        }
        const rows = await call('vm.logs', { vm: a.vm, follow: a.follow }, { onStream: print });
        // --json: exactly the RPC result (the array); with --follow, one JSON object per line as rows arrive
        if (a.json && !a.follow) return void process.stdout.write(JSON.stringify(rows, null, 2) + '\n');
        for (const r of rows) print(r);
      },
    )
    .command(
      'ssh <vm>',
      'open a shell in the VM, or run `-- CMD` and exit with its status',
      (a: Argv) => a.positional('vm', { type: 'string', demandOption: true }),
      async (a: GlobalArgs & { vm: string; '--'?: string[] }) => {
        process.exitCode = await sshInto(a.vm, (a['--'] ?? []).map(String));
      },
    )
    .command(
      'workspace',
      'copy a git repository into a VM, and get its work back as a patch',
      (w: Argv) =>
        w
          .command(
            'prepare <vm>',
            'stream the repository (with uncommitted and untracked files) into the guest',
            (a: Argv) =>
              a
                .positional('vm', { type: 'string', demandOption: true })
                .option('source', { type: 'string', default: '.', describe: 'host repository' })
                .option('guest-path', { type: 'string', default: '/root/repo' })
                .option('branch', { type: 'string', describe: 'check out a new branch in the guest' })
                .option('from', { type: 'string', describe: 'base ref (default HEAD)' })
                .option('mode', { choices: ['shallow', 'full_history', 'full_copy'] as const, default: 'shallow' as const })
                .option('readonly', { type: 'boolean', default: false })
                .option('replace', { type: 'boolean', default: false, describe: 'replace what is already at the guest path' }),
            async (a: GlobalArgs & { vm: string; source: string; guestPath: string; branch?: string; from?: string; mode: 'shallow' | 'full_history' | 'full_copy'; readonly: boolean; replace: boolean }) => {
              const r = await call('vm.workspace.prepare', { vm: a.vm, source: resolve(a.source), guestPath: a.guestPath, branch: a.branch, from: a.from, mode: a.mode, readOnly: a.readonly, replace: a.replace || undefined });
              out(a, r, () => `prepared ${c.bold(r.repoName)} at ${r.guestPath} (${r.mode}${r.readOnly ? ', read-only' : ''}) HEAD ${String(r.headCommit).slice(0, 12)}${r.branchName ? ` on branch ${r.branchName}` : ''}`);
            },
          )
          .command(
            'export <vm>',
            'print the guest\'s work as a patch for git apply (non-mutating)',
            (a: Argv) =>
              a
                .positional('vm', { type: 'string', demandOption: true })
                .option('guest-path', { type: 'string', default: '/root/repo' })
                .option('base-commit', { type: 'string', describe: 'diff against this commit (default the guest HEAD)' })
                .option('output', { alias: 'o', type: 'string', describe: 'write the patch to FILE instead of stdout' }),
            async (a: GlobalArgs & { vm: string; guestPath: string; baseCommit?: string; output?: string }) => {
              const r = await call('vm.workspace.export', { vm: a.vm, guestPath: a.guestPath, baseCommit: a.baseCommit }, { quiet: true });
              const patch = Buffer.from(r.patch, r.patchEncoding === 'base64' ? 'base64' : 'utf8');
              if (a.output) {
                writeFileSync(a.output, patch);
                if (a.json) out(a, { ...r, patch: undefined, output: a.output }, () => '');
                else process.stderr.write(`${r.hasChanges ? `${r.changedFiles.length} file(s) changed` : 'no changes'} since ${String(r.baseCommit).slice(0, 12)} → ${a.output}\n`);
              } else if (a.json) {
                out(a, r, () => '');
              } else {
                process.stdout.write(patch);
                process.stderr.write(`${r.hasChanges ? `${r.changedFiles.length} file(s) changed` : 'no changes'} since ${String(r.baseCommit).slice(0, 12)}\n`);
              }
            },
          )
          .demandCommand(1, 'name a workspace command: prepare or export'),
    )
    .demandCommand(1, 'name a vm command');
}
