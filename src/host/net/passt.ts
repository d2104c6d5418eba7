/**
 * User-mode networking through passt instead of QEMU's built-in slirp. slirp maps its gateway (10.0.2.2) to the
 * host's 127.0.0.1, so a guest reaches every service bound to the host's loopback; passt with `--no-map-gw` does
 * not map the gateway to the host at all, and still gives the guest egress (as the host's own sockets) and
 * inbound forwards (`--tcp-ports`). QEMU (7.2+) connects to passt's Unix socket with `-netdev stream`.
 *
 * Lifecycle: passt runs in the foreground of its own detached process with `--one-off`, so it serves exactly one
 * QEMU and exits when that QEMU disconnects (stops, is killed, crashes): a running VM's passt needs nothing from
 * a restarted daemon. Its pid goes to `<runDir>/<id>.passt.pid`; a passt that QEMU never reached (a launch cut
 * short, a daemon killed in between) is killed by stopPasst from the next launch, a stop or a delete.
 *
 * passt 0.0~git20230309 (Debian 12) mishandles a forwarded connection that the host side closes before the guest
 * answered it (the guest is still booting): it spins on the socket's hang-up and may crash. So nothing may
 * connect to a forwarded port before the guest's network is up (see waitForGuestConsole in vm-steps).
 */
import { open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BangerError, errorMessage } from '../../errors.js';
import type { PublishedPort } from '../../rpc/publish.js';
import { identifyProcess } from '../exec/proc.js';
import { spawnDetached } from '../exec/spawn.js';
import { checkSocketPath, sleep } from '../exec/wait.js';

export interface PasstFiles {
  socket: string;
  pidFile: string;
  logFile: string;
}

/** passt's files for a VM: its Unix socket and pid file in the run directory, its log in the VM's directory. */
export function passtFiles(runDir: string, vmDir: string, id: string): PasstFiles {
  return { socket: checkSocketPath(join(runDir, `${id}.passt`)), pidFile: join(runDir, `${id}.passt.pid`), logFile: join(vmDir, 'passt.log') };
}

/** The `-netdev` value QEMU needs to use the passt at `socket`. */
export function passtNetdev(socket: string): string {
  return `stream,id=n0,server=off,addr.type=unix,addr.path=${socket.replace(/,/g, ',,')}`;
}

/**
 * passt's argument vector. `--no-map-gw`: the gateway is not the host. `--ipv4-only`: the guest gets the host's
 * IPv4 address and route by DHCP, no IPv6 (banger's guests are configured for IPv4). No UDP forwards. As root
 * passt would drop to `nobody`, who cannot write banger's run directory: `--runas` the caller instead (passt still
 * isolates itself in namespaces and a seccomp filter).
 */
export function passtArgv(socket: string, forwards: readonly PublishedPort[], ids: { uid: number; gid: number }): string[] {
  const args = ['--foreground', '--quiet', '--one-off', '--ipv4-only', '--no-map-gw', '--socket', socket, '--udp-ports', 'none'];
  args.push('--runas', `${ids.uid}:${ids.gid}`);
  for (const f of forwards) args.push('--tcp-ports', `${f.hostAddress}/${f.hostPort}:${f.guestPort}`);
  return args;
}

/** Is `pid` still the passt serving `socket`? */
async function isOurPasst(pid: number, socket: string): Promise<boolean> {
  const { id } = await identifyProcess(pid, (argv) => argv.some((a, i) => a === socket && argv[i - 1] === '--socket'));
  return id === 'ours' || id === 'unknown';
}

async function readPid(pidFile: string): Promise<number | undefined> {
  const n = Number.parseInt(await readFile(pidFile, 'utf8').catch(() => ''), 10);
  return Number.isInteger(n) && n > 0 ? n : undefined;
}

/**
 * Starts passt for one VM and waits (bounded) until its socket is there. A passt left from an earlier launch of
 * this VM is killed first. A passt that exits early (a forward's port is taken, passt is missing) is a clear error.
 */
export async function startPasst(
  files: PasstFiles,
  forwards: readonly PublishedPort[],
  opts: { signal?: AbortSignal; timeoutMs?: number; bin?: string } = {},
): Promise<number> {
  const bin = opts.bin ?? process.env.BANGER_PASST_BIN ?? 'passt';
  await stopPasst(files);
  const ids = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
  // passt's messages go to a file (a pipe would kill it with SIGPIPE once we stop reading).
  const log = await open(files.logFile, 'w', 0o600);
  let child;
  try {
    child = spawnDetached(bin, passtArgv(files.socket, forwards, ids), { logFd: log.fd });
  } finally {
    await log.close();
  }
  try {
    await child.started;
  } catch (e) {
    throw new BangerError('unsupported', `user networking needs passt: ${errorMessage(e)}`, 'install passt (apt-get install passt), or use --net tap');
  }
  await writeFile(files.pidFile, `${child.pid}\n`);
  const messages = async () => (await readFile(files.logFile, 'utf8').catch(() => '')).split('\n').filter((l) => l && !/syslog/.test(l)).slice(-5).join(' | ');
  const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
  for (;;) {
    if (!child.isRunning()) {
      await rm(files.pidFile, { force: true });
      throw new BangerError('host', `passt exited before QEMU could connect: ${(await messages()) || 'no message'}`, 'is a forwarded host port already taken?');
    }
    if (await stat(files.socket).then((s) => s.isSocket(), () => false)) return child.pid;
    if (Date.now() > deadline || opts.signal?.aborted) {
      await stopPasst(files);
      throw new BangerError(opts.signal?.aborted ? 'aborted' : 'timeout', `passt did not open ${files.socket} in time`);
    }
    await sleep(20);
  }
}

/** Kills the VM's passt if one still runs (it serves a QEMU that is gone, or none) and removes its files. */
export async function stopPasst(files: Pick<PasstFiles, 'socket' | 'pidFile'>): Promise<void> {
  const pid = await readPid(files.pidFile);
  if (pid !== undefined && (await isOurPasst(pid, files.socket))) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone already */
    }
    for (let i = 0; i < 100 && (await isOurPasst(pid, files.socket)); i++) await sleep(20);
  }
  await Promise.all([rm(files.socket, { force: true }), rm(files.pidFile, { force: true })]);
}
