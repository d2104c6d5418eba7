/**
 * TAP networking for VMs: the bridge (ensured once through the root helper), a TAP leased from the warm
 * pool, and the guest's address allocated inside a SQLite transaction (never shared, also under
 * concurrent creates). The guest's address, gateway and DNS go into its root disk as a networkd file.
 */
import { readFileSync } from 'node:fs';
import { BangerError } from '../errors.js';
import type { Config } from '../config.js';
import type { Store } from '../store/repo.js';
import { gatewayAddress, hostAddresses, intToIp, ipToInt, parseCidr } from '../host/net/net.js';
import { firewallEntry } from './firewall-sync.js';
import type { NetworkProvider } from './vm-steps.js';
import type { RootHelper } from './root-helper.js';
import type { TapPool } from './tap-pool.js';

export function guestAddresses(subnet: string): string[] {
  const { first, count } = hostAddresses(subnet);
  const start = ipToInt(first);
  return Array.from({ length: count }, (_, i) => intToIp(start + i));
}

function hostNameservers(): string[] {
  try {
    return readFileSync('/etc/resolv.conf', 'utf8')
      .split('\n')
      .map((l) => /^\s*nameserver\s+([0-9.]+)\s*$/.exec(l)?.[1])
      .filter((x): x is string => !!x && !x.startsWith('127.'));
  } catch {
    return [];
  }
}

/** The helper's bridge (its own config) must be the one this daemon's config describes: the guests' addresses come from it. */
function assertSameBridge(r: { name: string; cidr: string }, bridge: string, cidr: string): void {
  if (r.name !== bridge || r.cidr !== cidr) {
    throw new BangerError(
      'invalid_state',
      `the root helper's bridge is ${r.name} ${r.cidr}, but this daemon's config says ${bridge} ${cidr}`,
      'make "bridge" and "subnet" in config.json match the helper\'s config (banger system install writes it), or the other way round',
    );
  }
}

export function makeNetwork(helper: RootHelper, pool: TapPool, store: Store, config: Config): NetworkProvider & { ensureBridge(): Promise<void> } {
  const c = parseCidr(config.subnet);
  const gateway = gatewayAddress(config.subnet);
  const candidates = guestAddresses(config.subnet);
  let bridgeReady: Promise<void> | undefined;
  const ensureBridge = () =>
    (bridgeReady ??= helper
      .request('bridge.ensure', {})
      .then((r) => assertSameBridge(r, config.bridge, `${gateway}/${c.prefix}`))
      .catch((e) => {
        bridgeReady = undefined;
        throw e;
      }));
  return {
    ensureBridge,
    async acquire(ctx) {
      await ensureBridge();
      const { tap } = await pool.lease(ctx.id);
      const guestIp = store.leaseAddress(ctx.id, candidates);
      if (!guestIp) throw new BangerError('conflict', `no free address left in ${config.subnet}`, 'delete a VM, or set a larger "subnet" in config.json');
      // Isolation before the guest can send anything (see firewall-sync.ts).
      await helper.request('firewall.set', { ...firewallEntry(ctx.id, ctx.spec, tap, guestIp) });
      return { tap, guestIp, gateway, prefix: c.prefix, dns: config.nat ? hostNameservers() : [] };
    },
    async release(vmId) {
      const tap = pool.leases().find((l) => l.vmId === vmId)?.tap;
      await pool.release(vmId);
      if (tap) await helper.request('firewall.clear', { tap });
      store.releaseAddress(vmId);
    },
  };
}
