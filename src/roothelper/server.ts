import { constants as fsConstants } from 'node:fs';
import { chmod, chown, lchown, lstat, open, readFile, readdir, readlink, realpath, rm, type FileHandle } from 'node:fs/promises';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { join, resolve } from 'node:path';
import { BangerError, errorMessage } from '../errors.js';
import { DEFAULT_CHROOT_BASE, launchJailed, removeJail, type JailerConfig, type JailRequest, type JailResult } from '../host/vmm/firecracker/firecracker.js';
import * as net from '../host/net/net.js';
import { Firewall } from '../host/net/firewall.js';
import type { Runner } from '../host/exec/runner.js';
import { Files } from '../paths.js';
import { buildInfo } from '../version.js';
import { LineDecoder } from '../rpc/ndjson.js';
import {
  MAX_LINE_BYTES,
  PROTOCOL_VERSION,
  parseRequestLine,
  refusal,
  validateRequest,
  type Response,
  type ValidatedRequest,
  type Verb,
  type VerbResults,
} from './protocol.js';

/**
 * The root helper: the only banger code that runs as root. It reads newline-delimited JSON requests on a Unix
 * socket (mode 0660, group-owned when a group is configured), validates each one completely before anything
 * runs (protocol.ts), logs every request and every refusal to stderr (one line each), and carries the valid
 * ones out one at a time through src/host. A refused request runs nothing.
 */

/** What the helper does for each verb; the defaults act on the host through src/host. Tests may replace them. */
export interface HelperOps {
  createTap(name: string, uid: number, o: { gid?: number; bridge?: string }, signal?: AbortSignal): Promise<VerbResults['tap.create']>;
  deleteTap(name: string, signal?: AbortSignal): Promise<VerbResults['tap.delete']>;
  listTaps(signal?: AbortSignal): Promise<VerbResults['tap.list']>;
  ensureBridge(name: string, cidr: string, nat: boolean, signal?: AbortSignal): Promise<VerbResults['bridge.ensure']>;
  jail(req: JailRequest, signal?: AbortSignal): Promise<JailResult>;
  unjail(id: string, signal?: AbortSignal): Promise<VerbResults['firecracker.unjail']>;
  chownTree(path: string, uid: number, gid: number, signal?: AbortSignal): Promise<VerbResults['vmdir.chown']>;
  firewall: Pick<Firewall, 'set' | 'clear' | 'status'>;
}

export interface RootHelperOptions {
  socketPath: string;
  /** banger's state directory: every path argument must resolve inside it. */
  stateDir: string;
  /** Group (name or number) that owns the socket; its members may use the helper. */
  group?: string;
  /** Bridge TAPs join when a request names none. Default banger0. */
  bridge?: string;
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
}

export function defaultOps(o: RootHelperOptions): HelperOps {
  const netOpts = (signal?: AbortSignal) => ({ runner: o.runner, netns: o.netns, signal });
  const defaultBridge = o.bridge ?? net.DEFAULT_BRIDGE;
  const jailer: JailerConfig = { jailerBin: o.jailer?.jailerBin, chrootBase: o.jailer?.chrootBase ?? DEFAULT_CHROOT_BASE };
  return {
    createTap: (name, uid, x, signal) => net.createTap(name, uid, { ...netOpts(signal), gid: x.gid, bridge: x.bridge ?? defaultBridge }),
    deleteTap: (name, signal) => net.deleteTap(name, netOpts(signal)),
    listTaps: async (signal) => ({ taps: await net.listTaps(net.TAP_PREFIX, netOpts(signal)) }),
    ensureBridge: async (name, cidr, nat, signal) => {
      const r = await net.ensureBridge(name, cidr, netOpts(signal));
      if (!nat) return r;
      const { backend } = await net.ensureNat(name, cidr, netOpts(signal));
      return { ...r, nat: backend };
    },
    jail: (req) => launchJailed(req, jailer),
    unjail: (id) => removeJail(id, jailer),
    chownTree,
    firewall: new Firewall(netOpts()),
  };
}

/**
 * chown a directory and everything below it to uid:gid, safe against a user who owns the tree and swaps
 * entries for symlinks while it runs: the directory is opened without following links and checked to be the
 * validated path (readlink of /proc/self/fd/N), and from there every step goes through that pinned descriptor
 * (`/proc/self/fd/N/<name>`), so no path is walked again. Entries are lchown'd (a symlink itself, never its
 * target); subdirectories are opened O_NOFOLLOW. A regular file with other hard links, owned by someone else,
 * is left alone (it could be a link to a file outside the tree).
 */
export async function chownTree(path: string, uid: number, gid: number): Promise<{ path: string; changed: number; skipped?: string[] }> {
  const flags = fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW;
  let changed = 0;
  const skipped: string[] = [];
  const walk = async (dir: FileHandle, rel: string): Promise<void> => {
    await dir.chown(uid, gid);
    changed++;
    const base = `/proc/self/fd/${dir.fd}`;
    for (const name of await readdir(base)) {
      const p = `${base}/${name}`;
      const st = await lstat(p);
      if (st.isDirectory()) {
        const sub = await open(p, flags);
        try {
          await walk(sub, join(rel, name));
        } finally {
          await sub.close();
        }
      } else if (st.isFile() && st.nlink > 1 && st.uid !== uid) {
        skipped.push(join(rel, name));
      } else {
        await lchown(p, uid, gid);
        changed++;
      }
    }
  };
  let top: FileHandle;
  try {
    top = await open(path, flags);
  } catch (e) {
    throw new BangerError('invalid_params', `refused vmdir.chown: ${path} cannot be opened as a directory without following links (${(e as NodeJS.ErrnoException).code ?? errorMessage(e)})`);
  }
  try {
    const real = await readlink(`/proc/self/fd/${top.fd}`);
    if (real !== path) throw new BangerError('invalid_params', `refused vmdir.chown: ${path} changed while it was being checked (it is now ${real})`);
    await walk(top, path);
  } finally {
    await top.close();
  }
  return { path, changed, ...(skipped.length ? { skipped } : {}) };
}

async function resolveGroup(group: string): Promise<number> {
  if (/^\d+$/.test(group)) return Number(group);
  const text = await readFile('/etc/group', 'utf8').catch(() => '');
  for (const line of text.split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined) return Number(gid);
  }
  throw new BangerError('not_found', `group ${JSON.stringify(group)} does not exist`, `create it (groupadd ${group}) and add the users who may use banger's root helper`);
}

export class RootHelperServer {
  private server?: Server;
  private readonly sockets = new Set<Socket>();
  private readonly ops: HelperOps;
  private readonly log: (line: string) => void;
  /** Host operations that change something run one at a time. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(readonly options: RootHelperOptions) {
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
    const gid = this.options.group !== undefined ? await resolveGroup(this.options.group) : undefined;
    const server = createServer((sock) => this.onConnection(sock));
    this.server = server;
    // Create the socket 0660 from the start: no window in which others could connect.
    const oldMask = process.umask(0o117);
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
    await chmod(path, 0o660);
    if (gid !== undefined) await chown(path, 0, gid);
    this.log(`roothelper: listening on ${path} (state dir ${this.options.stateDir}${gid !== undefined ? `, group ${this.options.group}` : ''}${this.options.netns ? `, netns ${this.options.netns}` : ''})`);
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
      this.log(`roothelper: request id=${JSON.stringify(id)} verb=${JSON.stringify(verb)} args=${clip(safeJson(req.args))}`);
      v = await validateRequest(req.verb, req.args, { stateDir: this.options.stateDir });
      await this.checkPolicy(v);
    } catch (e) {
      const err = toErrorBody(e);
      this.log(`roothelper: REFUSED id=${JSON.stringify(id)} verb=${JSON.stringify(verb)}: ${err.message}`);
      this.send(sock, { id, ok: false, error: err });
      return;
    }
    const started = Date.now();
    try {
      // Reads (ping, tap.list) run at once; changes queue behind each other.
      const result = v.verb === 'ping' || v.verb === 'tap.list' || v.verb === 'firewall.status' ? await this.bounded(v) : await this.serialized(() => this.bounded(v));
      this.log(`roothelper: ok id=${JSON.stringify(id)} verb=${verb} ${Date.now() - started} ms`);
      this.send(sock, { id, ok: true, result });
    } catch (e) {
      const err = toErrorBody(e);
      this.log(`roothelper: FAILED id=${JSON.stringify(id)} verb=${verb} after ${Date.now() - started} ms: ${err.message}`);
      this.send(sock, { id, ok: false, error: err });
    }
  }

  /** Rules beyond "under the state dir": VM directories are `<stateDir>/vms/<id>`. */
  private async checkPolicy(v: ValidatedRequest): Promise<void> {
    const vmsDir = resolve(await realpath(this.options.stateDir), Files.vmsDir);
    const isVmDir = (p: string) => resolve(p, '..') === vmsDir;
    if (v.verb === 'vmdir.chown' && !isVmDir(v.args.path)) {
      throw refusal(v.verb, `path ${JSON.stringify(v.args.path)} is not a VM directory (${vmsDir}/<id>)`);
    }
    if (v.verb === 'firecracker.jail' && !isVmDir(v.args.vmDir)) {
      throw refusal(v.verb, `vmDir ${JSON.stringify(v.args.vmDir)} is not a VM directory (${vmsDir}/<id>)`);
    }
  }

  /** Run one operation with a deadline: its commands get an abort signal, and the queue moves on regardless. */
  private bounded(v: ValidatedRequest): Promise<unknown> {
    const ms = this.options.opTimeoutMs ?? 60_000;
    const ac = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, rej) => {
      timer = setTimeout(() => {
        ac.abort(new Error(`timed out after ${ms} ms`));
        rej(new BangerError('timeout', `${v.verb} did not finish within ${ms} ms`));
      }, ms);
    });
    return Promise.race([this.execute(v, ac.signal), deadline]).finally(() => clearTimeout(timer));
  }

  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.queue.then(fn, fn);
    this.queue = p.catch(() => undefined);
    return p;
  }

  private async execute(v: ValidatedRequest, signal: AbortSignal): Promise<unknown> {
    switch (v.verb) {
      case 'ping':
        return { version: PROTOCOL_VERSION, release: buildInfo().version, pid: process.pid, uid: process.getuid?.() ?? -1 } satisfies VerbResults['ping'];
      case 'tap.create':
        return this.ops.createTap(v.args.name, v.args.uid, { gid: v.args.gid, bridge: v.args.bridge }, signal);
      case 'tap.delete':
        return this.ops.deleteTap(v.args.name, signal);
      case 'tap.list':
        return this.ops.listTaps(signal);
      case 'bridge.ensure':
        return this.ops.ensureBridge(v.args.name, v.args.cidr, v.args.nat, signal);
      case 'firecracker.jail':
        return this.ops.jail(v.args, signal);
      case 'firecracker.unjail':
        return this.ops.unjail(v.args.id, signal);
      case 'vmdir.chown':
        return this.ops.chownTree(v.args.path, v.args.uid, v.args.gid, signal);
      case 'firewall.set':
        return this.ops.firewall.set(v.args, signal);
      case 'firewall.clear':
        return this.ops.firewall.clear(v.args.tap, signal);
      case 'firewall.status':
        return this.ops.firewall.status(signal);
      default: {
        const never: never = v;
        throw new BangerError('method_not_found', `unhandled verb ${(never as { verb: Verb }).verb}`);
      }
    }
  }
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
