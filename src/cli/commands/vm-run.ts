/** banger vm create and vm run, and the ssh session both vm run and vm ssh open. */
import { resolve } from 'node:path';
import type { Argv } from 'yargs';
import { BangerError, validateName } from '../../errors.js';
import type { ParamsOf } from '../../rpc/protocol.js';
import type { VmView } from '../../rpc/types.js';
import { connectDaemon } from '../connect.js';
import { execStreaming } from '../exec-stream.js';
import type { BangerClient } from '../../index.js';
import { call, out, usage, type GlobalArgs } from '../context.js';
import { parsePublishList, PublishError } from '../../rpc/publish.js';
import { diskFlag, memoryFlag, MIN_DISK_BYTES, vcpusFlag } from '../flags.js';
import { c, fmtMs, progressPrinter } from '../output.js';
import { vmSummary } from './vm-view.js';
import { normalizeAllowCidr } from '../../host/net/firewall-rules.js';

export interface CreateArgs extends GlobalArgs {
  name?: string;
  image?: string;
  vcpus?: string;
  memory?: string;
  disk?: string;
  vmm?: 'auto' | 'firecracker' | 'qemu';
  net?: 'auto' | 'tap' | 'user';
  egress?: 'internet' | 'none';
  'allow-peers'?: boolean;
  allow?: string[];
  publish?: string | Array<string | number>;
  start?: boolean;
  workspace?: string;
  'workspace-mode'?: 'shallow' | 'full_history' | 'full_copy';
}

export interface RunArgs extends CreateArgs {
  rm?: boolean;
  '--'?: Array<string | number>;
}

export const createOptions = <T>(a: Argv<T>) =>
  a
    .option('name', { type: 'string', describe: 'VM name (letters, digits, . _ -)' })
    .option('image', { type: 'string', describe: 'image name (default debian-bookworm)' })
    .option('vcpus', { type: 'string', describe: 'virtual CPUs' })
    .option('memory', { type: 'string', describe: 'MiB' })
    .option('disk', { type: 'string', describe: 'work disk size, e.g. 8G' })
    .option('vmm', { choices: ['auto', 'firecracker', 'qemu'] as const })
    .option('net', { choices: ['auto', 'tap', 'user'] as const })
    .option('egress', { choices: ['internet', 'none'] as const, describe: 'tap: what the guest reaches beyond the host (default internet, through NAT)' })
    .option('allow-peers', { type: 'boolean', describe: 'tap: reach other VMs that were created with --allow-peers too' })
    .option('allow', { type: 'string', array: true, describe: 'tap: a private CIDR the guest may reach (repeatable)' })
    .option('publish', { type: 'string', describe: 'publish a guest TCP port on the host: [HOSTADDR:]HOSTPORT:GUESTPORT (address 127.0.0.1 unless given); repeatable' })
    .option('workspace-mode', { choices: ['shallow', 'full_history', 'full_copy'] as const, describe: 'how --workspace is copied (default shallow)' });

/** Checks every create flag before the daemon is reached: a usage error exits 2 and starts nothing. */
async function createParams(a: CreateArgs): Promise<ParamsOf<'vm.create'>> {
  if (a.name !== undefined) validateName('vm', String(a.name));
  if (a.image !== undefined) validateName('image', String(a.image));
  const vcpus = vcpusFlag(a.vcpus);
  const memoryMiB = memoryFlag(a.memory);
  const disk = await diskFlag(a.disk, MIN_DISK_BYTES);
  const allow = a.allow?.map((x) => normalizeAllowCidr(String(x)));
  const publish = publishFlag(a.publish);
  if (a['workspace-mode'] && !a.workspace) throw new BangerError('usage', '--workspace-mode needs --workspace', 'add --workspace DIR, or drop --workspace-mode');
  const workspace = a.workspace ? { source: resolve(a.workspace), mode: a['workspace-mode'] } : undefined;
  return { name: a.name, image: a.image, vcpus, memoryMiB, disk, vmm: a.vmm, net: a.net, egress: a.egress, allowPeers: a['allow-peers'], allow, ...(publish.length ? { publish } : {}), workspace };
}

/** --publish values checked here (a mistake exits 2 before the daemon is reached) and sent as written. */
function publishFlag(raw: string | Array<string | number> | undefined): string[] {
  const specs = (raw === undefined ? [] : Array.isArray(raw) ? raw : [raw]).map(String);
  try {
    parsePublishList(specs);
  } catch (e) {
    if (e instanceof PublishError) usage(e.message, e.hint);
    throw e;
  }
  return specs;
}

export async function createVm(a: CreateArgs): Promise<void> {
  const params = await createParams(a);
  if (params.workspace && a.start === false) throw new BangerError('usage', '--workspace needs the VM to boot', 'drop --no-start, or prepare later with banger vm workspace prepare');
  const t0 = Date.now();
  const v = await call('vm.create', { ...params, start: a.start });
  if (!params.workspace) return out(a, v, () => `${vmSummary(v)}\n  ${c.dim(`ready in ${fmtMs(Date.now() - t0)}`)}`);
  const w = await prepareFor(v.id, params.workspace, !!a.json);
  out(a, { ...v, workspace: w }, () => `${vmSummary(v)}\n  ${c.dim(`ready in ${fmtMs(Date.now() - t0)}`)}`);
}

/** The prepare after a create with --workspace (the daemon made the VM for it: a cached work disk when it had one). */
async function prepareFor(vm: string, w: NonNullable<ParamsOf<'vm.create'>['workspace']>, quiet: boolean) {
  const r = await call('vm.workspace.prepare', { vm, source: w.source, mode: w.mode }, { quiet });
  if (!quiet) {
    process.stderr.write(c.dim(`workspace ${r.repoName} → ${r.guestPath} at ${String(r.headCommit).slice(0, 12)}, cache ${r.cache}, ${r.bytesSent} bytes sent (export with --base-commit ${r.headCommit})\n`));
    for (const warning of r.warnings ?? []) process.stderr.write(`warning: ${warning}\n`);
  }
  return r;
}

async function ensureImage(client: BangerClient, image: string | undefined, quiet: boolean): Promise<void> {
  const name = image ?? 'debian-bookworm';
  const list = await client.call('image.list', {});
  if (list.some((i) => i.name === name)) return;
  if (!quiet) process.stderr.write(`image ${name} is not here yet: pulling it\n`);
  await client.call('image.pull', { name }, { onProgress: progressPrinter(quiet) });
}

/** Create and boot, progress shown as it comes; resolves with the running VM (at once for a warm-pool VM). */
async function bootNew(client: BangerClient, params: ParamsOf<'vm.create'>, quiet: boolean, created: (v: VmView) => void): Promise<VmView> {
  const v = await client.call('vm.create', { ...params, start: true, wait: false }, { onProgress: progressPrinter(quiet) });
  created(v);
  if (v.state === 'running') return v;
  return await client.call('vm.wait', { vm: v.id, state: 'running' }, { onProgress: progressPrinter(quiet) });
}

/**
 * vm run: one daemon connection for the whole run. A command runs over the VM's pooled SSH connection (a
 * warm-pool VM's is open already); no command opens an interactive ssh session. With --rm the exit status is
 * ours as soon as the command ends: the delete is asked for and finishes in the daemon (the VM shows as
 * deleting meanwhile; the deleting state is persisted, so a daemon killed then finishes it when it restarts).
 */
export async function runVm(a: RunArgs): Promise<void> {
  const cmd = (a['--'] ?? []).map(String);
  const params = await createParams(a);
  const quiet = !!a.json;
  const client = await connectDaemon();
  const t0 = Date.now();
  let vm: VmView | undefined;
  let status = 1;
  try {
    await ensureImage(client, a.image, quiet);
    vm = await bootNew(client, params, quiet, (v) => (vm = v));
    if (!quiet) process.stderr.write(c.dim(`vm ${vm.name} ready in ${fmtMs(Date.now() - t0)}\n`));
    let cwd: string | undefined;
    if (params.workspace) cwd = (await prepareFor(vm.id, params.workspace, quiet)).guestPath;
    status = cmd.length ? (await execStreaming(client, { vm: vm.id, argv: cmd, cwd })).exitCode : await sshInto(vm.id, undefined, { cwd });
  } finally {
    if (a.rm && vm) await deleteInBackground(client, vm);
    client.close();
  }
  process.exitCode = status;
}

/** Asks the daemon to delete the VM without waiting; over a new connection when ours was lost (a restarted daemon). */
async function deleteInBackground(client: BangerClient, vm: VmView): Promise<void> {
  try {
    await client.call('vm.delete', { vm: vm.id, wait: false });
  } catch {
    await call('vm.delete', { vm: vm.id, wait: false }, { quiet: true }).catch((e) => process.stderr.write(`banger: could not delete ${vm.name}: ${(e as Error).message}\n`));
  }
}

/** Runs `ssh` with banger's key and the VM's pinned host key; resolves with its exit status. */
export async function sshInto(vm: string, cmd: string[] | undefined, opts: { tty?: boolean; cwd?: string } = {}): Promise<number> {
  const info = await call('vm.ssh', { vm }, { quiet: true });
  // Loaded only for an ssh session: the host layer stays out of the CLI's ordinary path.
  const [{ shellQuote }, { runInteractive }] = await Promise.all([import('../../host/exec/shell.js'), import('../../host/exec/spawn.js')]);
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
    // The guest is untrusted: whatever the user's ssh_config says, hand it no agent, no X11, no forwarded ports,
    // and no shared (multiplexed) connection. Options on the command line win over the config files.
    '-a', '-x',
    '-o', 'ForwardAgent=no',
    '-o', 'ForwardX11=no',
    '-o', 'ClearAllForwardings=yes',
    '-o', 'ControlMaster=no',
    '-o', 'ControlPath=none',
    '-o', 'PermitLocalCommand=no',
    '-o', 'ProxyCommand=none',
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
