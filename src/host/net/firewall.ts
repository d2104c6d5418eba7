import { readFile } from 'node:fs/promises';
import { BangerError } from '../../errors.js';
import { run as defaultRun } from '../exec/runner.js';
import { FIREWALL_TABLE, removalScript, renderFirewall, type FirewallVm } from './firewall-rules.js';
import { listTaps, type NetOptions } from './net.js';

/**
 * The tap guests' firewall on the host (rules: firewall-rules.ts). The root helper keeps one `Firewall`: the
 * VMs registered with it, by TAP. Every change renders the whole ruleset from that list and replaces the
 * tables in one `nft -f -` transaction (stdin, no shell); the tables exist while at least one VM is
 * registered. Entries whose TAP no longer exists are dropped at every change, so a VM deleted while its
 * daemon was dead does not keep rules. A helper that starts finds the tables of a crashed run: it keeps them
 * (still in force, fail-closed) until the daemons register their VMs again, or removes them when no banger
 * TAP is left (`reconcileAtStart`).
 */

export interface FirewallStatus {
  /** Both tables are in the kernel. */
  installed: boolean;
  vms: FirewallVm[];
}

function exec(opts: NetOptions) {
  const runner = opts.runner ?? defaultRun;
  return (file: string, args: string[], input?: string) =>
    opts.netns
      ? runner('ip', ['netns', 'exec', opts.netns, file, ...args], { signal: opts.signal, input })
      : runner(file, args, { signal: opts.signal, input });
}

/** Replace the tables with the ruleset for `vms` (an empty list removes them). */
export async function applyFirewall(vms: FirewallVm[], dns: string[], opts: NetOptions = {}): Promise<void> {
  await exec(opts)('nft', ['-f', '-'], renderFirewall({ vms, dns }));
}

export async function removeFirewall(opts: NetOptions = {}): Promise<void> {
  await exec(opts)('nft', ['-f', '-'], removalScript());
}

/** Are banger's tables in the kernel (`nft list tables`)? */
export async function firewallInstalled(opts: NetOptions = {}): Promise<boolean> {
  const r = await exec(opts)('nft', ['list', 'tables']);
  const lines = r.stdout.split('\n').map((l) => l.trim());
  return lines.includes(`table inet ${FIREWALL_TABLE}`) && lines.includes(`table bridge ${FIREWALL_TABLE}`);
}

/** The host's IPv4 DNS servers (loopback ones excepted: a guest could not use them), as guests are told. */
export async function hostDnsServers(path = '/etc/resolv.conf'): Promise<string[]> {
  const text = await readFile(path, 'utf8').catch(() => '');
  return text
    .split('\n')
    .map((l) => /^\s*nameserver\s+([0-9]{1,3}(?:\.[0-9]{1,3}){3})\s*$/.exec(l)?.[1])
    .filter((x): x is string => !!x && !x.startsWith('127.'));
}

export class Firewall {
  private readonly vms = new Map<string, FirewallVm>();

  constructor(private readonly opts: NetOptions & { dns?: () => Promise<string[]> } = {}) {}

  private netOpts(signal?: AbortSignal): NetOptions {
    return { runner: this.opts.runner, netns: this.opts.netns, signal };
  }

  /** Register (or update) a VM and apply. */
  async set(vm: FirewallVm, signal?: AbortSignal): Promise<FirewallStatus> {
    for (const [tap, other] of this.vms) {
      if (tap !== vm.tap && other.ip === vm.ip) {
        throw new BangerError('conflict', `firewall: ${vm.ip} is registered for ${tap} already`, `clear ${tap} first (its VM was deleted?)`);
      }
    }
    this.vms.set(vm.tap, vm);
    return this.apply(signal);
  }

  /** Forget a VM's TAP and apply; with the last one gone the tables are removed. */
  async clear(tap: string, signal?: AbortSignal): Promise<FirewallStatus> {
    this.vms.delete(tap);
    return this.apply(signal);
  }

  async status(signal?: AbortSignal): Promise<FirewallStatus> {
    return { installed: await firewallInstalled(this.netOpts(signal)), vms: [...this.vms.values()] };
  }

  /** A helper that starts knows no VM: tables left by a crashed run go when no banger TAP exists any more. */
  async reconcileAtStart(signal?: AbortSignal): Promise<'removed' | 'kept' | 'none'> {
    if (!(await firewallInstalled(this.netOpts(signal)))) return 'none';
    if ((await listTaps(undefined, this.netOpts(signal))).length > 0) return 'kept';
    await removeFirewall(this.netOpts(signal));
    return 'removed';
  }

  private async apply(signal?: AbortSignal): Promise<FirewallStatus> {
    const live = new Set((await listTaps(undefined, this.netOpts(signal))).map((t) => t.name));
    for (const tap of [...this.vms.keys()]) if (!live.has(tap)) this.vms.delete(tap);
    const dns = await (this.opts.dns ?? (() => hostDnsServers()))();
    await applyFirewall([...this.vms.values()], dns, this.netOpts(signal));
    return { installed: this.vms.size > 0, vms: [...this.vms.values()] };
  }
}
