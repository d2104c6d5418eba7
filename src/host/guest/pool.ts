/**
 * SSH connections per running VM, kept open between commands so a second command skips the TCP connect, key
 * exchange and authentication. A connection carries at most CHANNELS_PER_CONNECTION commands at once (sshd
 * refuses channels past its MaxSessions, 10 by default); more at once open another connection to the same VM.
 * Connections are keyed by the VM and the address it had when dialled, so a restarted VM (new port or process)
 * gets fresh ones; a connection that closes is forgotten and redialled.
 */
import { exec, SshConnectionCache, type Client, type ExecOptions, type ExecResult, type SshTarget } from './ssh.js';

/** Below sshd's default MaxSessions (10), so a user's own `vm ssh` multiplexing never meets a full connection. */
export const CHANNELS_PER_CONNECTION = 8;

export class SshPool {
  private readonly cache = new SshConnectionCache();
  private readonly inFlight = new Map<string, number>();

  /** Runs one command over one of the VM's pooled connections. An abort or timeout kills that command, not the connection. */
  async exec(vmId: string, target: SshTarget, command: string, opts: ExecOptions = {}): Promise<ExecResult> {
    const key = this.connectionWithRoom(vmId, target);
    this.inFlight.set(key, (this.inFlight.get(key) ?? 0) + 1);
    try {
      const client: Client = await this.cache.get(key, target, { timeoutMs: opts.connectTimeoutMs ?? 15_000 });
      return await exec(client, command, opts);
    } finally {
      const left = (this.inFlight.get(key) ?? 1) - 1;
      if (left > 0) this.inFlight.set(key, left);
      else this.inFlight.delete(key);
    }
  }

  /** Keeps a connection already open to the VM (the one that proved SSH up at boot) as its first. */
  adopt(vmId: string, target: SshTarget, client: Client): void {
    const address = `${vmId}|${target.host}:${target.port}#`;
    this.forgetOthers(vmId, address);
    this.cache.put(`${address}0`, client);
  }

  /** Forget (and close) every connection to this VM, e.g. when it stops. */
  drop(vmId: string): void {
    this.forgetOthers(vmId, undefined);
  }

  closeAll(): void {
    this.cache.closeAll();
  }

  /** The first of this VM's connections (at its current address) with a free channel; older addresses are dropped. */
  private connectionWithRoom(vmId: string, target: SshTarget): string {
    const address = `${vmId}|${target.host}:${target.port}#`;
    this.forgetOthers(vmId, address);
    for (let n = 0; ; n++) {
      const key = `${address}${n}`;
      if ((this.inFlight.get(key) ?? 0) < CHANNELS_PER_CONNECTION) return key;
    }
  }

  /** Drops the VM's connections but those under keepPrefix. `vmId` may carry `#<incarnation>`; any incarnation matches. */
  private forgetOthers(vmId: string, keepPrefix: string | undefined): void {
    const vm = vmOf(vmId);
    for (const k of this.cache.keys()) if (vmOf(k) === vm && !(keepPrefix && k.startsWith(keepPrefix))) this.cache.drop(k);
  }
}

/** The VM id a pool key starts with (before any `#incarnation` or `|address`). */
function vmOf(key: string): string {
  const end = key.search(/[#|]/);
  return end < 0 ? key : key.slice(0, end);
}
