/**
 * Isolated user networking (config `userNet: "isolated"`, opt-in): QEMU's slirp runs inside a user + network
 * (+ mount) namespace of its own, so the gateway 10.0.2.2, which slirp maps to "the host's" 127.0.0.1, is the
 * namespace's empty loopback. The namespace's only way out is slirp4netns with `--disable-host-loopback` (the real
 * host's 127.0.0.1 refused), and `prohibit` routes inside it refuse the host's own addresses and the private,
 * loopback, link-local, CGNAT and multicast ranges (the tap firewall's BLOCKED_RANGES). No root anywhere.
 *
 * Inbound (SSH, --publish): slirp4netns listens on the host address and port (its API's add_hostfwd) and connects
 * to the namespace's tap address; QEMU's hostfwd there (namespace port 10000+i) carries it to the guest's port.
 * DNS: the namespace sees a resolv.conf naming slirp4netns's resolver 10.0.2.3 (bind-mounted in its own mount
 * namespace), which asks the host's resolvers; the host's resolv.conf could name a loopback or private address.
 *
 * Lifecycle: QEMU holds the write end of a FIFO and slirp4netns gets its read end as `--exit-fd`: slirp4netns exits
 * when that QEMU does (stops, crashes, is killed), daemon or not, and its forwards go with it. A running VM needs
 * nothing from a restarted daemon. Its pid goes to `<runDir>/<id>.s4n.pid` for the stop path's tidy-up.
 */
import { constants as fsConstants, openSync, closeSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import { BangerError, errorMessage } from '../../errors.js';
import type { PublishedPort } from '../../rpc/publish.js';
import { run, type Runner } from '../exec/runner.js';
import { identifyProcess } from '../exec/proc.js';
import { spawnDetached } from '../exec/spawn.js';
import { checkSocketPath, sleep } from '../exec/wait.js';
import { BLOCKED_RANGES } from './firewall-rules.js';

/** slirp4netns's default network inside the namespace: its tap's address, its resolver. */
const NS_TAP_ADDRESS = '10.0.2.100';
const NS_RESOLVER = '10.0.2.3';
/** QEMU's hostfwd for forward i listens on this port + i inside the namespace (a namespace of its own: no clash). */
const NS_PORT_BASE = 10_000;

export interface UserNsFiles {
  fifo: string;
  apiSocket: string;
  pidFile: string;
  logFile: string;
  resolvConf: string;
  routes: string;
}

export function userNsFiles(runDir: string, vmDir: string, id: string): UserNsFiles {
  return {
    fifo: join(runDir, `${id}.s4n.exit`),
    apiSocket: checkSocketPath(join(runDir, `${id}.s4n`)),
    pidFile: join(runDir, `${id}.s4n.pid`),
    logFile: join(vmDir, 'slirp4netns.log'),
    resolvConf: join(vmDir, 'netns-resolv.conf'),
    routes: join(vmDir, 'netns-routes'),
  };
}

/** The forwards in order (SSH first) with the namespace port QEMU's hostfwd listens on for each. */
export function nsForwards(forwards: readonly PublishedPort[]): Array<PublishedPort & { nsPort: number }> {
  return forwards.map((f, i) => ({ ...f, nsPort: NS_PORT_BASE + i }));
}

/**
 * The command that runs QEMU in its namespace: unshare makes the user (root mapped to the caller), network and
 * mount namespaces; a shell opens the FIFO (fd 3, inherited by QEMU), puts the prohibit routes in, binds the
 * resolv.conf and execs QEMU. Arguments only, no shell string built from input.
 */
export function wrapInNamespace(files: UserNsFiles, qemuBin: string, argv: readonly string[]): { file: string; args: string[] } {
  const script = 'exec 3<>"$1" && ip -batch "$2" && mount --bind "$3" /etc/resolv.conf && shift 3 && exec "$@"';
  return { file: 'unshare', args: ['--user', '--map-root-user', '--net', '--mount', '--', 'sh', '-c', script, 'sh', files.fifo, files.routes, files.resolvConf, qemuBin, ...argv] };
}

/** The namespace's `ip -batch` lines: loopback up, the blocked ranges and the host's own IPv4 addresses prohibited. */
export function prohibitRoutes(hostAddresses: readonly string[]): string {
  const targets = [...BLOCKED_RANGES, ...hostAddresses.map((a) => `${a}/32`)];
  return ['link set lo up', ...[...new Set(targets)].map((t) => `route add prohibit ${t}`), ''].join('\n');
}

/** The host's IPv4 addresses outside the blocked ranges' obvious cases (public ones too: the guest must not reach them). */
export function hostIpv4Addresses(): string[] {
  return Object.values(networkInterfaces())
    .flat()
    .filter((a) => a && a.family === 'IPv4' && !a.address.startsWith('127.'))
    .map((a) => a!.address);
}

/** Writes what the namespace's shell reads: the FIFO, the routes, the resolv.conf. */
export async function prepareNamespace(files: UserNsFiles, runner: Runner = run): Promise<void> {
  await stopUserNs(files);
  await runner('mkfifo', ['-m', '0600', files.fifo]);
  await writeFile(files.routes, prohibitRoutes(hostIpv4Addresses()));
  await writeFile(files.resolvConf, `nameserver ${NS_RESOLVER}\n`);
}

/**
 * Starts slirp4netns for the QEMU `qemuPid` (already in its namespace), then asks it for each forward. Bounded;
 * on failure slirp4netns is stopped and the error names what went wrong (the caller kills QEMU).
 */
export async function startUserNs(
  files: UserNsFiles,
  qemuPid: number,
  forwards: readonly PublishedPort[],
  opts: { signal?: AbortSignal; timeoutMs?: number; bin?: string } = {},
): Promise<number> {
  const bin = opts.bin ?? process.env.BANGER_SLIRP4NETNS_BIN ?? 'slirp4netns';
  const args = ['--configure', '--mtu', '65520', '--disable-host-loopback', '--exit-fd', '3', '--api-socket', files.apiSocket];
  args.push('--userns-path', `/proc/${qemuPid}/ns/user`, String(qemuPid), 'tap0');
  // The read end: slirp4netns sees end-of-file once QEMU, the only writer, is gone. Non-blocking: no wait here.
  const exitFd = openSync(files.fifo, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  const logFd = openSync(files.logFile, 'w', 0o600);
  let child;
  try {
    child = spawnDetached(bin, args, { logFd, extraFds: [exitFd] });
  } finally {
    closeSync(exitFd);
    closeSync(logFd);
  }
  try {
    await child.started;
  } catch (e) {
    throw new BangerError('unsupported', `isolated user networking needs slirp4netns: ${errorMessage(e)}`, 'install slirp4netns (apt-get install slirp4netns), or set config userNet "slirp" (the guest then reaches the host\'s loopback)');
  }
  await writeFile(files.pidFile, `${child.pid}\n`);
  const deadline = Date.now() + (opts.timeoutMs ?? 15_000);
  try {
    for (const f of nsForwards(forwards)) {
      await untilDone(deadline, opts.signal, child.isRunning, () =>
        apiCall(files.apiSocket, { execute: 'add_hostfwd', arguments: { proto: 'tcp', host_addr: f.hostAddress, host_port: f.hostPort, guest_addr: NS_TAP_ADDRESS, guest_port: f.nsPort } }),
      );
    }
  } catch (e) {
    const log = (await readFile(files.logFile, 'utf8').catch(() => '')).split('\n').filter(Boolean).slice(-3).join(' | ');
    await stopUserNs(files);
    throw new BangerError('host', `slirp4netns did not set up the VM's forwards: ${errorMessage(e)}${log ? ` (${log})` : ''}`, 'is a forwarded host port already taken?');
  }
  return child.pid;
}

/** Retries `call` until it succeeds, slirp4netns exits, the deadline passes or the signal aborts. */
async function untilDone(deadline: number, signal: AbortSignal | undefined, alive: () => boolean, call: () => Promise<void>): Promise<void> {
  for (;;) {
    try {
      return await call();
    } catch (e) {
      if (!alive()) throw new BangerError('host', 'slirp4netns exited');
      if (signal?.aborted) throw new BangerError('aborted', 'aborted');
      if (Date.now() > deadline) throw e;
      // a refused port is final; a socket not there yet (or not answering) is worth another try
      if (e instanceof BangerError && e.kind === 'conflict') throw e;
      await sleep(50);
    }
  }
}

/** One request to slirp4netns's API socket; its `error` is a conflict (the host port is taken, usually). */
function apiCall(socket: string, request: object): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = connect(socket);
    let answer = '';
    const timer = setTimeout(() => c.destroy(new Error('no answer from slirp4netns within 3 s')), 3000);
    c.on('connect', () => c.end(JSON.stringify(request)));
    c.on('data', (d) => (answer += String(d)));
    c.on('error', (e) => (clearTimeout(timer), reject(e)));
    c.on('close', () => {
      clearTimeout(timer);
      let parsed: { return?: unknown; error?: { desc?: string } };
      try {
        parsed = JSON.parse(answer) as typeof parsed;
      } catch {
        return reject(new Error(`slirp4netns answered ${JSON.stringify(answer)}`));
      }
      if (parsed.error) return reject(new BangerError('conflict', `slirp4netns refused ${JSON.stringify(request)}: ${parsed.error.desc ?? JSON.stringify(parsed.error)}`));
      resolve();
    });
  });
}

async function isOurSlirp(pid: number, apiSocket: string): Promise<boolean> {
  const { id } = await identifyProcess(pid, (argv) => argv.some((a, i) => a === apiSocket && argv[i - 1] === '--api-socket'));
  return id === 'ours' || id === 'unknown';
}

/** Kills the VM's slirp4netns if one still runs (it exits with its QEMU by itself) and removes its files. */
export async function stopUserNs(files: Pick<UserNsFiles, 'apiSocket' | 'pidFile' | 'fifo'>): Promise<void> {
  const pid = Number.parseInt(await readFile(files.pidFile, 'utf8').catch(() => ''), 10);
  if (Number.isInteger(pid) && pid > 0 && (await isOurSlirp(pid, files.apiSocket))) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone already */
    }
    for (let i = 0; i < 100 && (await isOurSlirp(pid, files.apiSocket)); i++) await sleep(20);
  }
  await Promise.all([rm(files.apiSocket, { force: true }), rm(files.pidFile, { force: true }), rm(files.fifo, { force: true })]);
}
