/**
 * User-mode networking through passt instead of QEMU's built-in slirp. slirp maps its gateway (10.0.2.2) to the
 * host's 127.0.0.1, so a guest reaches every service bound to the host's loopback; passt with `--no-map-gw` does
 * not map the gateway to the host at all, and still gives the guest egress (as the host's own sockets) and
 * inbound forwards (`-t`). QEMU (7.2+) connects to passt's Unix socket with `-netdev stream`.
 *
 * Lifecycle: passt runs in the foreground of its own detached process with `--one-off`, so it serves exactly one
 * QEMU and exits when that QEMU disconnects (stops, is killed, crashes). A launch that fails before QEMU connects
 * kills it (stopPasst).
 */
import { open, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { BangerError, errorMessage } from '../../errors.js';
import { identifyProcess } from '../exec/proc.js';
import { spawnDetached } from '../exec/spawn.js';
import { checkSocketPath, sleep } from '../exec/wait.js';

/** One inbound TCP forward: HOSTADDR:HOSTPORT on the host → GUESTPORT in the guest. */
export interface TcpForward {
  hostAddress: string;
  hostPort: number;
  guestPort: number;
}

const IPV4_RE = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

function assertForward(f: TcpForward): TcpForward {
  const port = (n: number) => Number.isInteger(n) && n >= 1 && n <= 65535;
  if (!IPV4_RE.test(f.hostAddress)) throw new BangerError('invalid_params', `invalid host address ${JSON.stringify(f.hostAddress)} for a forward`);
  if (!port(f.hostPort) || !port(f.guestPort)) {
    throw new BangerError('invalid_params', `invalid forward ports ${f.hostPort}:${f.guestPort}`, 'ports are integers 1-65535');
  }
  return f;
}

/** passt's Unix socket for a VM: `<runDir>/<id>.passt`. */
export function passtSocketPath(runDir: string, id: string): string {
  return checkSocketPath(join(runDir, `${id}.passt`));
}

/** The `-netdev` value QEMU needs to use the passt at `socket`. */
export function passtNetdev(socket: string): string {
  return `stream,id=n0,server=off,addr.type=unix,addr.path=${socket.replace(/,/g, ',,')}`;
}

/**
 * passt's argument vector. `--no-map-gw`: the gateway is not the host. No UDP forwards, no DHCPv6 search list.
 * As root passt would drop to `nobody`, who cannot write banger's run directory: run it as the caller instead
 * (passt still isolates itself in namespaces and a seccomp filter).
 */
export function passtArgv(socket: string, forwards: readonly TcpForward[], ids: { uid: number; gid: number }): string[] {
  const args = ['--foreground', '--quiet', '--one-off', '--no-map-gw', '--socket', socket, '--udp-ports', 'none'];
  args.push('--runas', `${ids.uid}:${ids.gid}`);
  for (const f of forwards.map(assertForward)) args.push('--tcp-ports', `${f.hostAddress}/${f.hostPort}:${f.guestPort}`);
  return args;
}

export interface PasstProcess {
  pid: number;
  socket: string;
}

/** Is `pid` still the passt serving `socket`? */
async function isOurPasst(pid: number, socket: string): Promise<boolean> {
  const { id } = await identifyProcess(pid, (argv) => argv.some((a, i) => a === socket && argv[i - 1] === '--socket'));
  return id === 'ours' || id === 'unknown';
}

/**
 * Starts passt for one VM and waits (bounded) until its socket is there. A passt that exits early (a forward's
 * port is taken, passt is missing) is a clear error.
 */
export async function startPasst(
  socket: string,
  forwards: readonly TcpForward[],
  opts: { logFile: string; signal?: AbortSignal; timeoutMs?: number; bin?: string },
): Promise<PasstProcess> {
  const bin = opts.bin ?? process.env.BANGER_PASST_BIN ?? 'passt';
  await rm(socket, { force: true });
  const ids = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
  // passt's messages go to a file (a pipe would kill it with SIGPIPE once we stop reading).
  const log = await open(opts.logFile, 'w', 0o600);
  let child;
  try {
    child = spawnDetached(bin, passtArgv(socket, forwards, ids), { logFd: log.fd });
  } finally {
    await log.close();
  }
  const messages = async () =>
    (await readFile(opts.logFile, 'utf8').catch(() => '')).split('\n').filter((l) => l && !/syslog/.test(l)).slice(-5).join(' | ');
  try {
    await child.started;
  } catch (e) {
    throw new BangerError('unsupported', `user networking needs passt: ${errorMessage(e)}`, 'install passt (apt-get install passt), or use --net tap');
  }
  const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
  for (;;) {
    if (!child.isRunning()) {
      throw new BangerError('host', `passt exited before QEMU could connect: ${(await messages()) || 'no message'}`, 'is a forwarded host port already taken?');
    }
    if (await stat(socket).then((s) => s.isSocket(), () => false)) break;
    if (Date.now() > deadline || opts.signal?.aborted) {
      await stopPasst({ pid: child.pid, socket });
      throw new BangerError(opts.signal?.aborted ? 'aborted' : 'timeout', `passt did not open ${socket} in time`);
    }
    await sleep(20);
  }
  return { pid: child.pid, socket };
}

/** Kills a passt that QEMU never connected to (it would otherwise wait for its one client forever). */
export async function stopPasst(p: PasstProcess): Promise<void> {
  if (await isOurPasst(p.pid, p.socket)) {
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      /* gone already */
    }
  }
  await rm(p.socket, { force: true });
}
