/**
 * The daemon's side of the tap firewall (rules: src/host/net/firewall-rules.ts; kept by the root helper). Each
 * tap VM is registered with the helper when its TAP and address are leased and forgotten when they are given
 * back; the whole set is sent again whenever the daemon (re)connects to the helper, because a helper that was
 * restarted (or a daemon that was killed) may have lost or missed changes. That holds for every connection,
 * whether or not the daemon had tap VMs when it started (a helper SIGKILLed under a daemon that started with
 * none knew nothing of the VMs made since, and nothing sent them again).
 */
import { errorMessage } from '../errors.js';
import { DEFAULT_POLICY, type FirewallVm } from '../host/net/firewall-rules.js';
import { macForVm } from '../host/net/net.js';
import type { VmContext, VmSpec } from '../machines/vm.machine.js';
import type { RootHelper } from './root-helper.js';

/** The firewall entry of a tap VM that has its TAP and address, else undefined. */
export function firewallEntryOf(c: VmContext): FirewallVm | undefined {
  if (c.spec.net !== 'tap') return undefined;
  const tap = c.runtime?.tap ?? c.net?.tap;
  const ip = c.runtime?.guestIp ?? c.net?.guestIp;
  if (!tap || !ip) return undefined;
  return firewallEntry(c.id, c.spec, tap, ip);
}

/** A VM's firewall entry: its TAP, its address, the MAC banger gave its NIC, and its isolation policy. */
export function firewallEntry(vmId: string, spec: Pick<VmSpec, 'isolation'>, tap: string, ip: string): FirewallVm {
  return { tap, ip, mac: macForVm(vmId), ...(spec.isolation ?? DEFAULT_POLICY) };
}

/** Register every live tap VM again; stale TAPs (`forget`) are cleared. Failures are logged, one line each. */
export async function syncFirewall(helper: RootHelper, entries: FirewallVm[], forget: string[], log: (l: string) => void): Promise<void> {
  for (const e of entries) {
    await helper.request('firewall.set', { ...e }).catch((err) => log(`firewall: could not register ${e.tap} (${e.ip}): ${errorMessage(err)}`));
  }
  for (const tap of forget) {
    await helper.request('firewall.clear', { tap }).catch((err) => log(`firewall: could not clear ${tap}: ${errorMessage(err)}`));
  }
  if (entries.length || forget.length) log(`firewall: ${entries.length} tap VM(s) registered, ${forget.length} cleared`);
}

/**
 * The daemon's one way to send the set: `resync(forget)` registers the VMs `entries()` names at the time it runs,
 * one sync after the other (a sync asked for while one runs waits for it, so two never interleave their verbs).
 */
export function firewallResync(helper: RootHelper, entries: () => FirewallVm[], log: (l: string) => void): (forget?: string[]) => Promise<void> {
  let chain = Promise.resolve();
  return (forget = []) => (chain = chain.then(() => syncFirewall(helper, entries(), forget, log)));
}
