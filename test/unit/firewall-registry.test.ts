import { describe, expect, it } from 'vitest';
import type { Runner } from '../../src/host/exec/runner.js';
import { Firewall } from '../../src/host/net/firewall.js';
import { removalScript, type FirewallVm } from '../../src/host/net/firewall-rules.js';

/** A host with these TAP devices: `ip link` lists them, every `nft -f -` script is kept. */
function fakeHost(taps: string[]) {
  const scripts: string[] = [];
  let tables = false;
  const runner: Runner = async (file, args, opts) => {
    if (file === 'ip') {
      const links = taps.map((t) => ({ ifname: t, flags: ['UP'], linkinfo: { info_kind: 'tun', info_data: { type: 'tap' } } }));
      return { exitCode: 0, stdout: JSON.stringify(links), stderr: '' };
    }
    if (file === 'nft' && args[0] === '-f') {
      const text = String(opts?.input);
      scripts.push(text);
      tables = text.includes('table inet banger {');
      return { exitCode: 0, stdout: '', stderr: '' };
    }
    if (file === 'nft' && args[0] === 'list') return { exitCode: 0, stdout: tables ? 'table inet banger\ntable bridge banger\n' : '', stderr: '' };
    throw new Error(`unexpected command ${file} ${args.join(' ')}`);
  };
  return { runner, scripts, taps };
}

const vm = (n: number): FirewallVm => ({ tap: `bgtapab${n}`, ip: `172.30.0.${n + 1}`, mac: `02:00:00:00:00:0${n}`, egress: 'internet', allowPeers: false, allow: [] });

describe('Firewall (the helper registry)', () => {
  it('installs with the first VM, rewrites on each change, removes with the last', async () => {
    const host = fakeHost(['bgtapab1', 'bgtapab2']);
    const fw = new Firewall({ runner: host.runner, dns: async () => [] });
    expect((await fw.set(vm(1))).vms.map((v) => v.tap)).toEqual(['bgtapab1']);
    await fw.set(vm(2));
    expect(host.scripts[1]).toContain('ip saddr 172.30.0.2 jump vm0');
    expect(host.scripts[1]).toContain('ip saddr 172.30.0.3 jump vm1');
    expect((await fw.clear('bgtapab1')).installed).toBe(true);
    expect(host.scripts[2]).not.toContain('172.30.0.2');
    const last = await fw.clear('bgtapab2');
    expect(last).toEqual({ installed: false, vms: [] });
    expect(host.scripts.at(-1)).toBe(removalScript());
    expect((await fw.status()).installed).toBe(false);
  });

  it('drops entries whose TAP is gone (a VM deleted while its daemon was dead)', async () => {
    const host = fakeHost(['bgtapab1', 'bgtapab2']);
    const fw = new Firewall({ runner: host.runner, dns: async () => [] });
    await fw.set(vm(1));
    host.taps.splice(0, 1);
    const st = await fw.set(vm(2));
    expect(st.vms.map((v) => v.tap)).toEqual(['bgtapab2']);
    expect(host.scripts.at(-1)).not.toContain('bgtapab1');
  });

  it('refuses one address for two TAPs', async () => {
    const host = fakeHost(['bgtapab1', 'bgtapab2']);
    const fw = new Firewall({ runner: host.runner, dns: async () => [] });
    await fw.set(vm(1));
    await expect(fw.set({ ...vm(2), ip: '172.30.0.2' })).rejects.toThrow(/172.30.0.2 is registered for bgtapab1 already/);
  });

  it('at start: tables of a crashed run are kept while banger TAPs exist, removed when none does', async () => {
    const host = fakeHost(['bgtapab1']);
    const fw = new Firewall({ runner: host.runner, dns: async () => [] });
    expect(await fw.reconcileAtStart()).toBe('none');
    await fw.set(vm(1));
    expect(await new Firewall({ runner: host.runner }).reconcileAtStart()).toBe('kept');
    host.taps.splice(0);
    expect(await new Firewall({ runner: host.runner }).reconcileAtStart()).toBe('removed');
    expect(host.scripts.at(-1)).toBe(removalScript());
  });
});
