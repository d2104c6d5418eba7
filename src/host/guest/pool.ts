/**
 * One SSH connection per running VM, kept open between commands so a second command skips the TCP connect,
 * key exchange and authentication. A connection is keyed by the VM and the address it had when dialled, so a
 * restarted VM (new port or process) gets a fresh one; a connection that closes is forgotten and redialled.
 */
import { exec, SshConnectionCache, type Client, type ExecOptions, type ExecResult, type SshTarget } from './ssh.js';

export class SshPool {
  private readonly cache = new SshConnectionCache();
  /** How many connections were dialled (for the bench and tests: a warm exec dials none). */
  dials = 0;

  private keyOf(vmId: string, target: SshTarget): string {
    return `${vmId}|${target.host}:${target.port}`;
  }

  client(vmId: string, target: SshTarget, timeoutMs = 15_000): Promise<Client> {
    const key = this.keyOf(vmId, target);
    this.forgetOthers(vmId, key);
    const before = this.cache.size;
    const p = this.cache.get(key, target, { timeoutMs });
    if (this.cache.size > before) this.dials++;
    return p;
  }

  /** Runs one command over the VM's pooled connection. An abort or timeout kills that command, not the connection. */
  async exec(vmId: string, target: SshTarget, command: string, opts: ExecOptions = {}): Promise<ExecResult> {
    const client = await this.client(vmId, target, opts.connectTimeoutMs);
    return exec(client, command, opts);
  }

  /** Forget (and close) every connection to this VM, e.g. when it stops. */
  drop(vmId: string): void {
    this.forgetOthers(vmId, undefined);
  }

  closeAll(): void {
    this.cache.closeAll();
  }

  private forgetOthers(vmId: string, keep: string | undefined): void {
    for (const k of this.keysFor(vmId)) if (k !== keep) this.cache.drop(k);
  }

  private keysFor(vmId: string): string[] {
    return this.cache.keys().filter((k) => k.startsWith(`${vmId}|`));
  }
}
