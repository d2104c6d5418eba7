import { chmod, chown, lstat, realpath, rm } from 'node:fs/promises';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { BangerError, errorMessage } from '../errors.js';
import { DEFAULT_CHROOT_BASE, launchJailed, removeJail, type JailerConfig, type JailRequest, type JailResult } from '../host/vmm/firecracker/firecracker.js';
import * as net from '../host/net/net.js';
import { Firewall } from '../host/net/firewall.js';
import { kernelOwnerFor, ownerTag } from '../host/net/tap-owner.js';
import type { Runner } from '../host/exec/runner.js';
import { buildInfo } from '../version.js';
import { LineDecoder } from '../rpc/ndjson.js';
import { authorize, refuseForeignTap } from './authorize.js';
import {
  MAX_LINE_BYTES,
  PROTOCOL_VERSION,
  parseRequestLine,
  validateRequest,
  type Caller,
  type Response,
  type ValidatedRequest,
  type Verb,
  type VerbResults,
} from './protocol.js';

/**
 * The root helper: the only banger code that runs as root. One server serves one owner on its own Unix
 * socket (mode 0600, owned by that owner's uid): whoever can connect is that owner, so the caller comes from
 * the connection, never from a request. It validates each request completely before anything runs
 * (protocol.ts), authorizes it for the caller (authorize.ts: only the owner's own objects), logs every request
 * and every refusal to stderr (one line each), and carries the valid ones out one at a time through src/host.
 * A refused request runs nothing.
 */

/** What the helper does for each verb, for `caller` (its owner); the defaults act on the host through src/host. Tests may replace them. */
export interface HelperOps {
  createTap(caller: Caller, name: string, signal?: AbortSignal): Promise<VerbResults['tap.create']>;
  deleteTap(caller: Caller, name: string, signal?: AbortSignal): Promise<VerbResults['tap.delete']>;
  listTaps(caller: Caller, signal?: AbortSignal): Promise<VerbResults['tap.list']>;
  ensureBridge(caller: Caller, signal?: AbortSignal): Promise<VerbResults['bridge.ensure']>;
  jail(caller: Caller, req: JailRequest, signal?: AbortSignal): Promise<JailResult>;
  unjail(caller: Caller, id: string, signal?: AbortSignal): Promise<VerbResults['firecracker.unjail']>;
  /** The tap guests' firewall: one per helper process, shared by every owner's socket (see host/net/firewall.ts). */
  firewall: Pick<Firewall, 'set' | 'clear' | 'status'>;
}

/** The owner a socket serves: from the helper's own configuration (its config file or its command line). */
export interface HelperOwner {
  uid: number;
  gid: number;
}

/** The helper's bridge: its name, its address (CIDR) and NAT. Configuration, never taken from a request. */
export interface HelperNetwork {
  bridge: string;
  cidr: string;
  nat: boolean;
}

export const DEFAULT_BRIDGE_CIDR = '172.30.0.1/24';

export interface RootHelperOptions {
  socketPath: string;
  /** The owner's banger state directory: every path argument must resolve inside it. */
  stateDir: string;
  /** Whoever connects to this socket is this owner; the socket is theirs (mode 0600). */
  owner: HelperOwner;
  /** Default banger0, 172.30.0.1/24, no NAT. */
  network?: Partial<HelperNetwork>;
  /** Do all network work inside this namespace (tests). */
  netns?: string;
  /** Runs every host command (tests hand in a recording runner). */
  runner?: Runner;
  /** The jailer; chrootBase defaults to /srv/jailer (root-owned, on the same filesystem as the state dir). */
  jailer?: Partial<JailerConfig>;
  /** One line per request, refusal and outcome. Default: stderr. */
  log?: (line: string) => void;
  /** Replace some or all operations (tests). */
  ops?: Partial<HelperOps>;
  /** Bound on one operation; its commands are aborted then. Default 60 s. */
  opTimeoutMs?: number;
  /** The firewall every socket of this helper process shares (main.ts makes one); default: one of its own. */
  firewall?: Firewall;
}

export function helperNetwork(o: RootHelperOptions): HelperNetwork {
  return { bridge: o.network?.bridge ?? net.DEFAULT_BRIDGE, cidr: o.network?.cidr ?? DEFAULT_BRIDGE_CIDR, nat: o.network?.nat ?? false };
}

export function defaultOps(o: RootHelperOptions): HelperOps {
  const netOpts = (signal?: AbortSignal) => ({ runner: o.runner, netns: o.netns, signal });
  const { bridge, cidr, nat } = helperNetwork(o);
  const jailer: JailerConfig = { jailerBin: o.jailer?.jailerBin, chrootBase: o.jailer?.chrootBase ?? DEFAULT_CHROOT_BASE };
  return {
    createTap: (caller, name, signal) => net.createTap(name, caller.uid, { ...netOpts(signal), gid: caller.gid, bridge }),
    deleteTap: async (caller, name, signal) => {
      const found = await net.tapOwnership(name, netOpts(signal));
      if (found.kind === 'tap') refuseForeignTap('tap.delete', name, found.owner, caller);
      return net.deleteTap(name, netOpts(signal));
    },
    listTaps: async (caller, signal) => ({ taps: await net.listTaps(`${net.TAP_PREFIX}${caller.tag}`, { ...netOpts(signal), owner: kernelOwnerFor(caller.uid) }) }),
    ensureBridge: async (_caller, signal) => {
      const r = await net.ensureBridge(bridge, cidr, netOpts(signal));
      if (!nat) return { ...r, cidr };
      const { backend } = await net.ensureNat(bridge, cidr, netOpts(signal));
      return { ...r, cidr, nat: backend };
    },
    jail: (caller, req, signal) => launchJailed(req, jailer, { owner: { uid: caller.uid, tag: caller.tag }, signal }),
    unjail: (caller, id, signal) => removeJail(id, jailer, { owner: { uid: caller.uid, tag: caller.tag }, signal }),
    firewall: o.firewall ?? new Firewall(netOpts()),
  };
}

export class RootHelperServer {
  private server?: Server;
  private readonly sockets = new Set<Socket>();
  private readonly ops: HelperOps;
  private readonly log: (line: string) => void;
  /** Host operations that change something run one at a time. */
  private queue: Promise<unknown> = Promise.resolve();
  /** Every request on this server's socket is this owner's. */
  readonly caller: Caller;

  constructor(readonly options: RootHelperOptions) {
    assertOwner(options.owner);
    this.caller = { uid: options.owner.uid, gid: options.owner.gid, stateDir: options.stateDir, tag: ownerTag(options.owner.uid, options.stateDir) };
    this.ops = { ...defaultOps(options), ...(options.ops ?? {}) };
    const sink = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
    // One line per entry, whatever a command's stderr carried.
    this.log = (line) => sink(line.replace(/\r?\n/g, ' | '));
  }

  get socketPath(): string {
    return this.options.socketPath;
  }

  async listen(): Promise<void> {
    const path = this.options.socketPath;
    if (Buffer.byteLength(path) > 107) throw new BangerError('usage', `socket path too long (the limit is 107 bytes): ${path}`);
    try {
      await realpath(this.options.stateDir);
    } catch {
      throw new BangerError('not_found', `state directory ${this.options.stateDir} does not exist`, 'pass the owner\'s banger state directory (BANGER_HOME) as --state-dir');
    }
    await removeStaleSocket(path);
    const server = createServer((sock) => this.onConnection(sock));
    this.server = server;
    // Create the socket 0600 from the start: no window in which others could connect. Then it is the owner's.
    const oldMask = process.umask(0o177);
    try {
      await new Promise<void>((res, rej) => {
        server.once('error', rej);
        server.listen(path, () => {
          server.off('error', rej);
          res();
        });
      });
    } finally {
      process.umask(oldMask);
    }
    await chmod(path, 0o600);
    if (process.getuid?.() === 0) await chown(path, this.caller.uid, 0);
    else if (process.getuid?.() !== this.caller.uid) {
      await this.close();
      throw new BangerError('usage', `only root can serve uid ${this.caller.uid} a socket of its own`, 'run the helper as root');
    }
    this.log(`roothelper: listening on ${path} for uid ${this.caller.uid} (state dir ${this.options.stateDir}${this.options.netns ? `, netns ${this.options.netns}` : ''})`);
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    if (this.server) await new Promise<void>((r) => this.server!.close(() => r()));
    await rm(this.options.socketPath, { force: true });
  }

  /**
   * Every complete line gets exactly one answer and nothing escapes to the process. A line over MAX_LINE_BYTES is
   * refused and ends the connection; the lines that came with it are not run (the client sees them rejected
   * by the close).
   */
  private onConnection(sock: Socket): void {
    this.sockets.add(sock);
    sock.on('close', () => this.sockets.delete(sock));
    sock.on('error', () => {});
    let refused = false;
    const refuseLongLine = () => {
      if (refused) return;
      refused = true;
      this.log(`roothelper: refused a request line over ${MAX_LINE_BYTES} bytes; closing the connection`);
      this.send(sock, { id: null, ok: false, error: { kind: 'invalid_request', message: `refused request: line longer than ${MAX_LINE_BYTES} bytes` } });
      sock.end();
    };
    // A line of more characters than MAX_LINE_BYTES has more bytes too; one of fewer is measured once complete.
    const decoder = new LineDecoder({ maxLine: MAX_LINE_BYTES, onOverflow: refuseLongLine });
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      if (refused) return;
      try {
        const lines = decoder.push(chunk).filter((line) => line.trim());
        if (lines.some((line) => Buffer.byteLength(line) > MAX_LINE_BYTES)) refuseLongLine();
        if (refused) return;
        for (const line of lines) {
          this.onLine(sock, line).catch((e) => this.log(`roothelper: internal error answering a request: ${errorMessage(e)}`));
        }
      } catch (e) {
        this.log(`roothelper: dropping a connection after an unexpected error reading it: ${errorMessage(e)}`);
        sock.destroy();
      }
    });
  }

  private send(sock: Socket, r: Response): void {
    if (sock.destroyed || !sock.writable) return;
    let text: string;
    try {
      text = JSON.stringify(r);
    } catch (e) {
      text = JSON.stringify({ id: r.id, ok: false, error: { kind: 'internal', message: `the answer could not be encoded: ${errorMessage(e)}` } } satisfies Response);
    }
    sock.write(`${text}\n`);
  }

  private async onLine(sock: Socket, line: string): Promise<void> {
    let id: number | string | null = null;
    let verb = '?';
    let v: ValidatedRequest;
    try {
      const req = parseRequestLine(line);
      id = req.id;
      verb = req.verb;
      this.log(`roothelper: request id=${JSON.stringify(id)} uid=${this.caller.uid} verb=${JSON.stringify(verb)} args=${clip(safeJson(req.args))}`);
      v = await validateRequest(req.verb, req.args, this.caller);
      await authorize(v, this.caller);
    } catch (e) {
      const err = toErrorBody(e);
      this.log(`roothelper: REFUSED id=${JSON.stringify(id)} verb=${JSON.stringify(verb)}: ${err.message}`);
      this.send(sock, { id, ok: false, error: err });
      return;
    }
    const started = Date.now();
    try {
      // Reads (ping, tap.list) run at once; changes queue behind each other.
      const result = v.verb === 'ping' || v.verb === 'tap.list' || v.verb === 'firewall.status' ? await this.bounded(v).answer : await this.serialized(v);
      this.log(`roothelper: ok id=${JSON.stringify(id)} verb=${verb} ${Date.now() - started} ms`);
      this.send(sock, { id, ok: true, result });
    } catch (e) {
      const err = toErrorBody(e);
      this.log(`roothelper: FAILED id=${JSON.stringify(id)} verb=${verb} after ${Date.now() - started} ms: ${err.message}`);
      this.send(sock, { id, ok: false, error: err });
    }
  }

  /**
   * Run one operation with a deadline. At the deadline its signal aborts the work (commands are killed, jail
   * steps stop) and the client gets a timeout; `settled` resolves once the work has really stopped (or a grace
   * period after the abort), so the next change never overlaps it.
   */
  private bounded(v: ValidatedRequest): { answer: Promise<unknown>; settled: Promise<void> } {
    const ms = this.options.opTimeoutMs ?? 60_000;
    const ac = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    let graceTimer: NodeJS.Timeout | undefined;
    const work = this.execute(v, ac.signal);
    const deadline = new Promise<never>((_, rej) => {
      timer = setTimeout(() => {
        ac.abort(new Error(`timed out after ${ms} ms`));
        rej(new BangerError('timeout', `${v.verb} did not finish within ${ms} ms; it was aborted`));
      }, ms);
    });
    const answer = Promise.race([work, deadline]).finally(() => clearTimeout(timer));
    const grace = new Promise<void>((res) => {
      ac.signal.addEventListener('abort', () => {
        graceTimer = setTimeout(() => {
          this.log(`roothelper: ${v.verb} still running ${ABORT_GRACE_MS} ms after its abort; the queue moves on`);
          res();
        }, ABORT_GRACE_MS);
      });
    });
    const settled = Promise.race([work.then(noop, noop), grace]).finally(() => clearTimeout(graceTimer));
    return { answer, settled };
  }

  private serialized(v: ValidatedRequest): Promise<unknown> {
    const started = this.queue.then(() => this.bounded(v));
    this.queue = started.then((r) => r.settled);
    return started.then((r) => r.answer);
  }

  /** Every handler gets the caller: the owner this socket serves. */
  private async execute(v: ValidatedRequest, signal: AbortSignal): Promise<unknown> {
    const caller = this.caller;
    switch (v.verb) {
      case 'ping':
        return { version: PROTOCOL_VERSION, release: buildInfo().version, pid: process.pid, uid: process.getuid?.() ?? -1, owner: { uid: caller.uid, tag: caller.tag } } satisfies VerbResults['ping'];
      case 'tap.create':
        return this.ops.createTap(caller, v.args.name, signal);
      case 'tap.delete':
        return this.ops.deleteTap(caller, v.args.name, signal);
      case 'tap.list':
        return this.ops.listTaps(caller, signal);
      case 'bridge.ensure':
        return this.ops.ensureBridge(caller, signal);
      case 'firecracker.jail':
        return this.ops.jail(caller, { ...v.args, uid: caller.uid, gid: caller.gid }, signal);
      case 'firecracker.unjail':
        return this.ops.unjail(caller, v.args.id, signal);
      case 'firewall.set':
        return this.ops.firewall.set(v.args, signal);
      case 'firewall.clear':
        return this.ops.firewall.clear(v.args.tap, signal);
      case 'firewall.status': {
        const st = await this.ops.firewall.status(signal);
        return { ...st, vms: st.vms.filter((vm) => vm.tap.startsWith(`${net.TAP_PREFIX}${caller.tag}`)) };
      }
      default: {
        const never: never = v;
        throw new BangerError('method_not_found', `unhandled verb ${(never as { verb: Verb }).verb}`);
      }
    }
  }
}

const ABORT_GRACE_MS = 10_000;
const noop = () => undefined;

/** The owner from the configuration: a uid and gid in [0, 2^31). */
function assertOwner(o: HelperOwner | undefined): void {
  const ok = (n: unknown) => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0 && n < 2 ** 31;
  if (!o || !ok(o.uid) || !ok(o.gid)) throw new BangerError('usage', `the root helper needs its owner's uid and gid (integers in [0, 2^31)), got ${JSON.stringify(o)}`);
}

function toErrorBody(e: unknown): { kind: string; message: string; hint?: string } {
  if (e instanceof BangerError) return { kind: e.kind, message: e.message, ...(e.hint ? { hint: e.hint } : {}) };
  return { kind: 'internal', message: errorMessage(e) };
}

/** JSON for the log; a value too deep to encode (e.g. 30 000 nested arrays) is named instead of throwing. */
function safeJson(v: unknown): string | undefined {
  try {
    return JSON.stringify(v);
  } catch (e) {
    return `<not encodable: ${errorMessage(e)}>`;
  }
}

const clip = (s: string | undefined, n = 300) => (s === undefined ? '{}' : s.length > n ? `${s.slice(0, n)}…` : s);

/** A socket file nobody answers on is left over from a crash: remove it. A live one is a conflict. */
async function removeStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = await lstat(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new BangerError('conflict', `${path} exists and is not a socket`, 'remove it or choose another --socket');
  const alive = await new Promise<boolean>((res) => {
    const c = createConnection({ path });
    c.once('connect', () => {
      c.destroy();
      res(true);
    });
    c.once('error', () => res(false));
  });
  if (alive) throw new BangerError('conflict', `another root helper is already listening on ${path}`);
  await rm(path, { force: true });
}

export async function startRootHelper(options: RootHelperOptions): Promise<RootHelperServer> {
  const s = new RootHelperServer(options);
  await s.listen();
  return s;
}
