import { describe, expect, it } from 'vitest';
import { firewallResync } from '../../src/actors/firewall-sync.js';
import type { RootHelper } from '../../src/actors/root-helper.js';
import type { FirewallVm } from '../../src/host/net/firewall-rules.js';

const vm = (n: number): FirewallVm => ({ tap: `bgtapab${n}`, ip: `172.30.0.${n + 1}`, mac: `02:00:00:00:00:0${n}`, egress: 'internet', allowPeers: false, allow: [] });

/** A helper whose verbs are recorded in order; each answers after a macrotask, so two syncs could interleave. */
function fakeHelper() {
  const calls: string[] = [];
  const helper = {
    request: async (verb: string, args: { tap: string }) => {
      calls.push(`${verb} ${args.tap} start`);
      await new Promise((r) => setTimeout(r, 5));
      calls.push(`${verb} ${args.tap} end`);
      return { installed: true, vms: [] };
    },
  } as unknown as RootHelper;
  return { helper, calls };
}

describe('firewallResync (the daemon sends its tap VMs to the helper again)', () => {
  it('registers the VMs that exist when the sync runs, not when the daemon started', async () => {
    const { helper, calls } = fakeHelper();
    const vms: FirewallVm[] = [];
    const resync = firewallResync(helper, () => vms, () => {});
    await resync(); // a daemon that started with no tap VM: nothing to send
    expect(calls).toEqual([]);
    vms.push(vm(1), vm(2)); // two VMs made since; then the helper is SIGKILLed and a new one connects
    await resync();
    expect(calls.filter((c) => c.endsWith('start'))).toEqual(['firewall.set bgtapab1 start', 'firewall.set bgtapab2 start']);
  });

  it('runs one sync at a time, stale TAPs cleared after the registrations', async () => {
    const { helper, calls } = fakeHelper();
    const resync = firewallResync(helper, () => [vm(1)], () => {});
    await Promise.all([resync(['bgtapab9']), resync()]);
    expect(calls).toEqual([
      'firewall.set bgtapab1 start',
      'firewall.set bgtapab1 end',
      'firewall.clear bgtapab9 start',
      'firewall.clear bgtapab9 end',
      'firewall.set bgtapab1 start',
      'firewall.set bgtapab1 end',
    ]);
  });

  it('a refused registration is logged and the next VM is still sent', async () => {
    const calls: string[] = [];
    const helper = {
      request: async (verb: string, args: { tap: string }) => {
        calls.push(args.tap);
        if (args.tap === 'bgtapab1') throw new Error('refused');
        return { installed: true, vms: [] };
      },
    } as unknown as RootHelper;
    const log: string[] = [];
    await firewallResync(helper, () => [vm(1), vm(2)], (l) => log.push(l))();
    expect(calls).toEqual(['bgtapab1', 'bgtapab2']);
    expect(log[0]).toContain('could not register bgtapab1 (172.30.0.2): refused');
  });
});
