import { getCiphers } from 'node:crypto';
import { createConnection } from 'node:net';
import { constants as osConstants } from 'node:os';
import type { Readable } from 'node:stream';
import ssh2, { type ClientChannel, type ConnectConfig } from 'ssh2';
import { BangerError, errorMessage } from '../../errors.js';
import { parsePublicKey } from './keys.js';

/**
 * chacha20-poly1305 first, as OpenSSH's own client has it; ssh2 puts AES-GCM first, which suits the host but not a
 * TCG guest, whose sshd decrypts AES-GCM through emulated AES-NI and carry-less multiplies. Side by side into one
 * 2-vCPU guest, `tar c | ssh tar x` of a 10,000-file repository (81 MB), OpenSSH's client with each cipher, two
 * runs of three: chacha20-poly1305 13.2, 10.8, 12.8 and 10.1, 11.7, 10.9 s; aes128-gcm 14.7, 12.8, 15.4 and 10.4,
 * 11.8, 12.0 s (about 10% on average, never slower). The rest of ssh2's list follows.
 */
const CIPHERS: NonNullable<ConnectConfig['algorithms']>['cipher'] = getCiphers().includes('chacha20-poly1305')
  ? { remove: 'chacha20-poly1305@openssh.com', prepend: 'chacha20-poly1305@openssh.com', append: [] }
  : undefined;

const { Client } = ssh2;
export type Client = InstanceType<typeof Client>;

/** Where and how to reach one guest's sshd. */
export interface SshTarget {
  host: string;
  port: number;
  privateKey: Buffer;
  /** The VM's pinned host key, `ssh-ed25519 AAAA...` (comment optional). No trust on first use. */
  hostPublicKey: string;
  /** Defaults to root. */
  user?: string;
  /** Names the VM in error messages (its name or id). */
  label?: string;
}

export interface ConnectOptions {
  signal?: AbortSignal;
  /** Bound on TCP connect + SSH handshake + authentication. Default 15 s. */
  timeoutMs?: number;
}

/** The guest presented a host key other than the one banger wrote into its disk. Never retried. */
export class HostKeyMismatchError extends BangerError {
  constructor(target: SshTarget, presented: Buffer) {
    super(
      'host',
      `the SSH host key presented by ${describe(target)} did not match the pinned key for ${
        target.label ? `VM ${target.label}` : 'that VM'
      } (got a ${presented.length}-byte key blob that differs from the pinned one)`,
      'something other than this VM answered on its SSH address, or its root disk was changed; refusing to connect',
    );
  }
}

const describe = (t: SshTarget) => `${t.user ?? 'root'}@${t.host}:${t.port}`;

function abortedError(what: string, signal?: AbortSignal): BangerError {
  const reason = signal?.reason;
  const why = reason instanceof Error ? reason.message : typeof reason === 'string' ? reason : undefined;
  return new BangerError('aborted', `${what}: aborted${why ? ` (${why})` : ''}`);
}

function wrapSshError(target: SshTarget | undefined, e: unknown, doing: string): BangerError {
  if (e instanceof BangerError) return e;
  const level = (e as { level?: string })?.level;
  const where = target ? ` ${describe(target)}` : '';
  const hint =
    level === 'client-authentication'
      ? "the guest did not accept banger's SSH key; check /root/.ssh/authorized_keys on the VM's work disk"
      : undefined;
  return new BangerError('host', `SSH${where}: ${doing} failed: ${errorMessage(e)}`, hint, { cause: e });
}

function hostKeyAlgorithms(type: string): string[] | undefined {
  if (type === 'ssh-rsa') return ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'];
  if (type === 'ssh-ed25519' || type.startsWith('ecdsa-sha2-')) return [type];
  return undefined;
}

/**
 * Opens an authenticated SSH connection, verifying the server's host key against the pinned one by
 * comparing the raw key blobs. Rejects with HostKeyMismatchError on a different key, BangerError 'timeout'
 * when the handshake does not finish in time, 'aborted' on abort.
 */
export function connect(target: SshTarget, opts: ConnectOptions = {}): Promise<Client> {
  const { signal } = opts;
  const timeoutMs = opts.timeoutMs ?? 15_000;
  let pinned: ReturnType<typeof parsePublicKey>;
  try {
    pinned = parsePublicKey(target.hostPublicKey);
  } catch (e) {
    return Promise.reject(e);
  }
  if (signal?.aborted) return Promise.reject(abortedError(`SSH connect to ${describe(target)}`, signal));

  return new Promise<Client>((resolve, reject) => {
    const client = new Client();
    let presented: Buffer | undefined;
    let settled = false;
    const finish = (err?: unknown) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      if (err) {
        client.destroy();
        reject(err);
      } else {
        // Errors after this point reach whoever uses the client through 'close'; never let one crash us.
        client.on('error', () => {});
        resolve(client);
      }
    };
    const onAbort = () => finish(abortedError(`SSH connect to ${describe(target)}`, signal));
    // ssh2's readyTimeout covers the handshake only; this also covers a TCP connect that hangs.
    const timer = setTimeout(
      () => finish(new BangerError('timeout', `SSH connect to ${describe(target)} did not complete within ${timeoutMs} ms`)),
      timeoutMs + 250,
    );
    signal?.addEventListener('abort', onAbort, { once: true });
    client.on('ready', () => finish());
    client.on('error', (e: Error) => {
      if (presented) finish(new HostKeyMismatchError(target, presented));
      else if ((e as { level?: string }).level === 'client-timeout')
        finish(new BangerError('timeout', `SSH connect to ${describe(target)}: handshake timed out after ${timeoutMs} ms`));
      else finish(wrapSshError(target, e, 'connect'));
    });
    client.on('close', () => finish(new BangerError('host', `SSH connect to ${describe(target)}: connection closed during the handshake`)));

    const algorithms = hostKeyAlgorithms(pinned.type);
    const config: ConnectConfig = {
      host: target.host,
      port: target.port,
      username: target.user ?? 'root',
      privateKey: target.privateKey,
      readyTimeout: timeoutMs,
      keepaliveInterval: 15_000,
      keepaliveCountMax: 4,
      hostVerifier: (key: Buffer) => {
        if (Buffer.isBuffer(key) && key.equals(pinned.blob)) return true;
        presented = Buffer.isBuffer(key) ? key : Buffer.from(String(key));
        return false;
      },
      algorithms: {
        cipher: CIPHERS,
        ...(algorithms ? { serverHostKey: algorithms as NonNullable<ConnectConfig['algorithms']>['serverHostKey'] } : {}),
      },
    };
    try {
      client.connect(config);
    } catch (e) {
      finish(wrapSshError(target, e, 'connect'));
    }
  });
}

export interface ExecOptions {
  /** Fed to the command's stdin; a stream is piped with backpressure and its end closes the remote stdin. */
  stdin?: NodeJS.ReadableStream | Buffer | string;
  /** Where stdout goes. When absent, stdout is collected into the result. The stream is not ended. */
  stdout?: NodeJS.WritableStream;
  /** Where stderr goes. When absent, stderr is collected into the result. The stream is not ended. */
  stderr?: NodeJS.WritableStream;
  signal?: AbortSignal;
  /** Bound on the whole command (channel open to exit). Expiry closes channel and connection. */
  timeoutMs?: number;
  /** Bound on connecting, when a target rather than a Client is given. */
  connectTimeoutMs?: number;
}

export interface ExecResult {
  /** The remote exit status; 128+N when killed by signal N, 255 when the server reported none. */
  exitCode: number;
  /** e.g. 'SIGKILL' when the remote command died of a signal. */
  signal?: string;
  /** Collected stdout (empty when a stdout stream was given). */
  stdout: Buffer;
  /** Collected stderr (empty when a stderr stream was given). */
  stderr: Buffer;
}

const isClient = (x: unknown): x is Client => x instanceof Client;

/**
 * Runs one command line (interpreted by the remote user's shell: quote with shellQuote) on the guest.
 * Given a target, opens a connection for this command and closes it afterwards; given a Client, uses it and
 * leaves it open. On abort or timeout the command's channel is closed and the connection stays (it may be shared:
 * src/host/guest/pool.ts). Closing a channel does not kill the remote command (OpenSSH ignores the signal request
 * here): bound a command in the guest with timeout(1) when it must die.
 */
export async function exec(on: SshTarget | Client, command: string, opts: ExecOptions = {}): Promise<ExecResult> {
  const { signal } = opts;
  if (signal?.aborted) throw abortedError(`ssh ${short(command)}`, signal);
  if (isClient(on)) return execOn(on, undefined, command, opts);
  const client = await connect(on, { signal, timeoutMs: opts.connectTimeoutMs });
  try {
    return await execOn(client, on, command, opts);
  } finally {
    client.end();
  }
}

const short = (s: string) => (s.length > 60 ? `${s.slice(0, 57)}...` : s);

function execOn(client: Client, target: SshTarget | undefined, command: string, opts: ExecOptions): Promise<ExecResult> {
  const { signal } = opts;
  const what = `running \`${short(command)}\``;
  return new Promise<ExecResult>((resolve, reject) => {
    let channel: ClientChannel | undefined;
    let stdinStream: Readable | undefined;
    let settled = false;

    const cleanup = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      client.removeListener('close', onClientClose);
      client.removeListener('error', onClientError);
      if (stdinStream && channel) stdinStream.unpipe(channel);
    };
    const done = (r: ExecResult) => {
      if (settled) return;
      settled = true;
      cleanup();
      resolve(r);
    };
    // Given up on (abort, timeout) or broken: the channel closes, the connection stays (it may be shared).
    const fail = (e: unknown) => {
      if (settled) return;
      settled = true;
      cleanup();
      try {
        channel?.close();
      } catch {
        /* already closed */
      }
      reject(e);
    };
    const onAbort = () => fail(abortedError(`ssh ${short(command)}`, signal));
    const onClientClose = () => fail(new BangerError('host', `SSH connection closed before \`${short(command)}\` finished`));
    const onClientError = (e: Error) => fail(wrapSshError(target, e, what));
    const timer = opts.timeoutMs !== undefined
      ? setTimeout(() => fail(new BangerError('timeout', `ssh \`${short(command)}\` did not finish within ${opts.timeoutMs} ms`)), opts.timeoutMs)
      : undefined;

    signal?.addEventListener('abort', onAbort, { once: true });
    client.on('close', onClientClose);
    client.on('error', onClientError);

    try {
      client.exec(command, (e, ch) => {
        if (e) return fail(wrapSshError(target, e, what));
        if (settled) return void ch.close();
        channel = ch;
        stdinStream = superviseChannel(ch, opts, {
          broken: (ce) => fail(wrapSshError(target, ce, what)),
          stdinFailed: (se) => fail(new BangerError('host', `stdin for \`${short(command)}\` failed: ${se.message}`, undefined, { cause: se })),
          done,
        });
      });
    } catch (e) {
      fail(wrapSshError(target, e, what));
    }
  });
}

/**
 * A started command's channel: its exit status, its output (to the caller's streams, or collected), its stdin
 * fed; `done` at the channel's close with the result, `broken` on a channel error before the command exited.
 * Returns the stream feeding stdin (unpiped when the exec is given up on).
 */
function superviseChannel(
  ch: ClientChannel,
  opts: ExecOptions,
  on: { broken: (e: Error) => void; stdinFailed: (e: Error) => void; done: (r: ExecResult) => void },
): Readable | undefined {
  let exitCode: number | null | undefined;
  let exitSignal: string | undefined;
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  ch.on('exit', (code: number | null, sig?: string) => {
    exitCode = code;
    exitSignal = sig ?? undefined;
  });
  ch.on('error', (ce: Error) => {
    // Writing stdin to a command that already exited is not the command's failure.
    if (exitCode === undefined) on.broken(ce);
  });
  // Always consume stdout and stderr, or the channel's 'close' never comes.
  if (opts.stdout) ch.pipe(opts.stdout, { end: false });
  else ch.on('data', (c: Buffer) => out.push(c));
  if (opts.stderr) ch.stderr.pipe(opts.stderr, { end: false });
  else ch.stderr.on('data', (c: Buffer) => err.push(c));
  ch.on('close', () => on.done({ exitCode: exitStatus(exitCode, exitSignal), signal: exitSignal, stdout: Buffer.concat(out), stderr: Buffer.concat(err) }));
  return feedStdin(ch, opts.stdin, on.stdinFailed);
}

/** The remote exit status; 128+N when killed by signal N, 255 when the server reported neither. */
function exitStatus(code: number | null | undefined, signal: string | undefined): number {
  if (typeof code === 'number') return code;
  const n = signal ? (osConstants.signals as Record<string, number>)[signal] : undefined;
  return n ? 128 + n : 255;
}

/** Sends the command its stdin (none: EOF at once); a stream is piped and returned, so a failure can unpipe it. */
function feedStdin(ch: ClientChannel, input: ExecOptions['stdin'], onError: (e: Error) => void): Readable | undefined {
  if (input === undefined) ch.end();
  else if (typeof input === 'string' || Buffer.isBuffer(input)) ch.end(input);
  else {
    const stream = input as Readable;
    stream.once('error', onError);
    stream.pipe(ch); // pipe ends the channel (EOF to the remote) when the input ends
    return stream;
  }
  return undefined;
}

export interface WaitForSshOptions {
  timeoutMs: number;
  signal?: AbortSignal;
  /** Pause between attempts. Default 500 ms. */
  intervalMs?: number;
  /** Bound on one attempt once the banner came (handshake + `true`). Default 30 s (capped by what is left of timeoutMs). */
  attemptTimeoutMs?: number;
  /** How long one attempt waits for the `SSH-` banner before the next try. Default 3 s. */
  bannerTimeoutMs?: number;
  /** Checked before every attempt; false ends the wait at once (the VM process died). */
  isAlive?: () => boolean | Promise<boolean>;
  /** Takes the connection that proved SSH up, to keep (else it is closed). */
  keep?: (client: Client) => void;
  /** What must exit 0 for SSH to count as up (default `true`), e.g. a first step that needs no connection of its own. */
  check?: { command: string; stdin?: () => string };
  onAttempt?: (info: { attempt: number; error?: unknown; elapsedMs: number }) => void;
}

/**
 * Retries until `true` (or opts.check) runs successfully over SSH. A host key mismatch ends the wait at once (never
 * retried). On expiry: BangerError 'timeout' carrying the last connection error.
 */
export async function waitForSsh(target: SshTarget, opts: WaitForSshOptions): Promise<{ attempts: number; elapsedMs: number }> {
  const { signal } = opts;
  const start = Date.now();
  const deadline = start + opts.timeoutMs;
  const interval = opts.intervalMs ?? 500;
  let lastError: unknown;
  let attempt = 0;
  for (;;) {
    if (signal?.aborted) throw abortedError(`waiting for SSH on ${describe(target)}`, signal);
    if (opts.isAlive && !(await opts.isAlive())) {
      throw new BangerError(
        'host',
        `the VM${target.label ? ` ${target.label}` : ''} stopped before SSH answered${lastError ? ` (last SSH error: ${errorMessage(lastError)})` : ''}`,
        "see the VM's serial log (banger vm logs) for why it stopped",
      );
    }
    const remaining = deadline - Date.now();
    if (remaining <= 0) break;
    attempt++;
    const bound = Math.max(250, Math.min(remaining, opts.attemptTimeoutMs ?? 30_000));
    let error: unknown;
    try {
      // Cheap first: does an sshd send its banner? (QEMU's user-mode networking accepts the TCP connection
      // itself and holds it open while the guest has no sshd, so a full handshake attempt would just hang.)
      await sshBanner(target.host, target.port, Math.min(bound, opts.bannerTimeoutMs ?? 3000), signal);
      const client = await connect(target, { signal, timeoutMs: bound });
      let kept = false;
      try {
        const r = await exec(client, opts.check?.command ?? 'true', { stdin: opts.check?.stdin?.(), signal, timeoutMs: bound });
        if (r.exitCode === 0) {
          opts.onAttempt?.({ attempt, elapsedMs: Date.now() - start });
          if (opts.keep) {
            opts.keep(client);
            kept = true;
          }
          return { attempts: attempt, elapsedMs: Date.now() - start };
        }
        error = new Error(`${opts.check ? 'the check' : '`true`'} exited with status ${r.exitCode}: ${r.stderr.toString('utf8').trim()}`);
      } finally {
        if (!kept) client.end();
      }
    } catch (e) {
      if (e instanceof HostKeyMismatchError) throw e;
      if (e instanceof BangerError && e.kind === 'aborted') throw e;
      error = e;
    }
    lastError = error;
    opts.onAttempt?.({ attempt, error, elapsedMs: Date.now() - start });
    const pause = Math.min(interval, deadline - Date.now());
    if (pause > 0) await sleep(pause, signal, `waiting for SSH on ${describe(target)}`);
  }
  throw new BangerError(
    'timeout',
    `SSH on ${describe(target)}${target.label ? ` (VM ${target.label})` : ''} did not answer within ${opts.timeoutMs} ms after ${attempt} attempt(s)${
      lastError ? `; last error: ${errorMessage(lastError)}` : ''
    }`,
    "the guest may still be booting (software emulation is slow) or sshd failed; see the VM's serial log",
  );
}

/** Resolves with the server's identification line once a TCP connection yields one starting with `SSH-`. */
export function sshBanner(host: string, port: number, timeoutMs: number, signal?: AbortSignal): Promise<string> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortedError(`waiting for SSH on ${host}:${port}`, signal));
    const sock = createConnection({ host, port });
    let buf = '';
    const finish = (err: unknown, line?: string) => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      sock.destroy();
      if (err) reject(err);
      else resolve(line!);
    };
    const onAbort = () => finish(abortedError(`waiting for SSH on ${host}:${port}`, signal));
    const timer = setTimeout(() => finish(new Error(`no SSH banner from ${host}:${port} within ${timeoutMs} ms`)), timeoutMs);
    signal?.addEventListener('abort', onAbort, { once: true });
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0 || buf.length > 255) {
        const line = buf.slice(0, nl >= 0 ? nl : 255).trim();
        if (line.startsWith('SSH-')) finish(undefined, line);
        else if (nl >= 0) buf = buf.slice(nl + 1); // RFC 4253 allows other lines before the banner
        else finish(new Error(`${host}:${port} does not speak SSH`));
      }
    });
    sock.on('error', (e) => finish(new Error(`${host}:${port}: ${e.message}`)));
    sock.on('close', () => finish(new Error(`${host}:${port}: connection closed before the SSH banner`)));
  });
}

function sleep(ms: number, signal: AbortSignal | undefined, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(abortedError(what, signal));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Keeps one SSH connection per key (e.g. VM id), reconnecting when it closed. Callers must drop() a VM's
 * entry when the VM stops.
 */
export class SshConnectionCache {
  private readonly conns = new Map<string, Promise<Client>>();

  get(key: string, target: SshTarget, opts: ConnectOptions = {}): Promise<Client> {
    return this.conns.get(key) ?? this.hold(key, connect(target, opts));
  }

  /** Keeps an open connection under `key` (closing the one it replaces). */
  put(key: string, client: Client): void {
    this.drop(key);
    void this.hold(key, Promise.resolve(client));
  }

  private hold(key: string, connecting: Promise<Client>): Promise<Client> {
    const p = connecting.then(
      (client) => {
        client.once('close', () => {
          if (this.conns.get(key) === p) this.conns.delete(key);
        });
        return client;
      },
      (e) => {
        if (this.conns.get(key) === p) this.conns.delete(key);
        throw e;
      },
    );
    this.conns.set(key, p);
    return p;
  }

  drop(key: string): void {
    const p = this.conns.get(key);
    this.conns.delete(key);
    p?.then((c) => c.end(), () => {});
  }

  closeAll(): void {
    for (const key of [...this.conns.keys()]) this.drop(key);
  }

  get size(): number {
    return this.conns.size;
  }

  keys(): string[] {
    return [...this.conns.keys()];
  }
}
