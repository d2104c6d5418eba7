import { describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { BLOCKED_RANGES, normalizeAllowCidr, removalScript, renderFirewall, type FirewallVm } from '../../src/host/net/firewall-rules.js';
import { parseArgs } from '../../src/roothelper/protocol.js';

const vm = (n: number, extra: Partial<FirewallVm> = {}): FirewallVm => ({
  tap: `bgtapab${n}`,
  ip: `172.30.0.${n + 1}`,
  mac: `02:00:00:00:00:0${n}`,
  egress: 'internet',
  allowPeers: false,
  allow: [],
  ...extra,
});

/** The body of chain `name` in the rendered text (in the bridge table when `bridge`). */
function chain(text: string, name: string, bridge = false): string[] {
  const lines = text.split('\n');
  const from = bridge ? lines.indexOf('table bridge banger {') : 0;
  const start = lines.findIndex((l, i) => i > from && l.trim() === `chain ${name} {`);
  expect(start, `chain ${name}`).toBeGreaterThanOrEqual(0);
  const end = lines.findIndex((l, i) => i > start && l.trim() === '}');
  return lines.slice(start + 1, end).map((l) => l.trim()).filter((l) => !l.startsWith('#'));
}

describe('renderFirewall', () => {
  it('with no VM it only removes both tables (and removing absent tables is valid: add before delete)', () => {
    expect(renderFirewall({ vms: [], dns: ['10.0.0.53'] })).toBe(removalScript());
    expect(removalScript().split('\n').filter(Boolean)).toEqual(['add table inet banger', 'delete table inet banger', 'add table bridge banger', 'delete table bridge banger']);
  });

  it('replaces the tables in the same transaction as it writes them', () => {
    const text = renderFirewall({ vms: [vm(1)], dns: [] });
    expect(text.startsWith(removalScript())).toBe(true);
    expect(text).toContain('table inet banger {');
    expect(text).toContain('table bridge banger {');
  });

  it('egress internet: private and special ranges dropped after what is allowed, then accept', () => {
    const text = renderFirewall({ vms: [vm(1, { allow: ['192.168.77.9/24'] })], dns: ['10.0.0.53'] });
    expect(chain(text, 'vm0')).toEqual([
      'ip daddr { 192.168.77.0/24 } accept',
      'meta l4proto { tcp, udp } th dport 53 ip daddr { 10.0.0.53 } accept',
      `ip daddr { ${BLOCKED_RANGES.join(', ')} } drop`,
      'accept',
    ]);
    for (const r of ['10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', '169.254.0.0/16', '127.0.0.0/8']) expect(BLOCKED_RANGES).toContain(r);
  });

  it('egress none: only --allow, no DNS, then drop', () => {
    const text = renderFirewall({ vms: [vm(1, { egress: 'none', allow: ['10.1.0.0/16'] })], dns: ['10.0.0.53'] });
    expect(chain(text, 'vm0')).toEqual(['ip daddr { 10.1.0.0/16 } accept', 'drop']);
    expect(chain(text, 'vm0-host')).toEqual(['ip daddr { 10.1.0.0/16 } accept', 'drop']);
  });

  it('the host: replies only, from any banger bridge, except DNS and --allow per VM', () => {
    const text = renderFirewall({ vms: [vm(1), vm(2, { egress: 'none' })], dns: ['10.0.0.53'] });
    expect(chain(text, 'input')).toEqual([
      'type filter hook input priority filter; policy accept;',
      'iifname != "banger*" accept',
      'ct state established,related accept',
      'ip saddr 172.30.0.2 jump vm0-host',
      'ip saddr 172.30.0.3 jump vm1-host',
      'drop',
    ]);
    expect(chain(text, 'vm0-host')).toEqual(['meta l4proto { tcp, udp } th dport 53 ip daddr { 10.0.0.53 } accept', 'drop']);
    expect(chain(text, 'vm1-host')).toEqual(['drop']);
  });

  it('forwarding: each VM by its address, anything else from a bridge dropped', () => {
    const text = renderFirewall({ vms: [vm(2), vm(1)], dns: [] });
    expect(chain(text, 'forward').filter((l) => !l.startsWith('type'))).toContain('drop');
    const fwd = chain(text, 'forward');
    // sorted by TAP: the rendering does not depend on the order VMs were registered in
    expect(fwd.slice(3)).toEqual(['iifname "banger*" ip saddr 172.30.0.2 jump vm0', 'iifname "banger*" ip saddr 172.30.0.3 jump vm1', 'drop']);
    expect(renderFirewall({ vms: [vm(1), vm(2)], dns: [] })).toBe(text);
  });

  it('anti-spoofing: a TAP sends only its own MAC, IPv4 and ARP; unregistered TAPs and IPv6 are cut off', () => {
    expect(() => renderFirewall({ vms: [vm(1, { mac: '02:00:00:00:00:01 accept' })], dns: [] })).toThrow(/is not a unicast MAC/);
    const pre = chain(renderFirewall({ vms: [vm(1)], dns: [] }), 'prerouting', true);
    expect(pre.slice(1)).toEqual([
      'iifname "bgtapab1" ether saddr != 02:00:00:00:00:01 drop',
      'iifname "bgtapab1" ether type ip ip saddr != 172.30.0.2 drop',
      'iifname "bgtapab1" ether type arp arp saddr ip != 172.30.0.2 drop',
      'iifname "bgtapab1" ether type arp arp saddr ether != 02:00:00:00:00:01 drop',
      'iifname "bgtapab1" ether type { ip, arp } accept',
      'iifname "bgtap*" drop',
    ]);
  });

  it('peers: frames between TAPs pass only when both VMs allow peers; routed peer traffic likewise', () => {
    const text = renderFirewall({ vms: [vm(1, { allowPeers: true }), vm(2), vm(3, { allowPeers: true })], dns: [] });
    expect(text).toMatch(/set peers \{\n\s+type ifname;\n\s+elements = \{ "bgtapab1", "bgtapab3" \}/);
    expect(chain(text, 'forward', true).filter((l) => l.includes('@peers') || l.includes('bgtap*'))).toEqual(['iifname @peers oifname @peers accept', 'iifname "bgtap*" drop', 'oifname "bgtap*" drop']);
    expect(chain(text, 'vm0')).toContain('ip daddr { 172.30.0.4 } accept');
    expect(chain(text, 'vm2')).toContain('ip daddr { 172.30.0.2 } accept');
    expect(chain(text, 'vm1').some((l) => l.includes('172.30.0.2') || l.includes('172.30.0.4'))).toBe(false);
    // nobody allows peers: no set, and every TAP-to-TAP frame is dropped
    const none = renderFirewall({ vms: [vm(1), vm(2)], dns: [] });
    expect(none).not.toContain('@peers');
    expect(none).toContain('iifname "bgtap*" drop');
  });

  it('refuses what is not a TAP name, an address or a CIDR (nothing unchecked reaches nft)', () => {
    expect(() => renderFirewall({ vms: [vm(1, { tap: 'eth0"; flush ruleset' })], dns: [] })).toThrow(BangerError);
    expect(() => renderFirewall({ vms: [vm(1, { ip: '172.30.0.2; drop' })], dns: [] })).toThrow(BangerError);
    expect(() => renderFirewall({ vms: [vm(1, { allow: ['10.0.0.0/8 } accept'] })], dns: [] })).toThrow(BangerError);
    expect(() => renderFirewall({ vms: [vm(1)], dns: ['8.8.8.8 }'] })).toThrow(BangerError);
  });
});

describe('normalizeAllowCidr', () => {
  it('gives the network of a CIDR, /32 for an address, and a usage error naming the flag otherwise', () => {
    expect(normalizeAllowCidr('192.168.1.77/24')).toBe('192.168.1.0/24');
    expect(normalizeAllowCidr('10.0.0.5')).toBe('10.0.0.5/32');
    expect(() => normalizeAllowCidr('fd00::/8')).toThrow(/--allow "fd00::\/8" is not an IPv4 CIDR/);
    expect(() => normalizeAllowCidr('10.0.0.0/33')).toThrow(BangerError);
  });
});

describe('root helper firewall verbs', () => {
  it('take a TAP, an address and a policy, nothing else', () => {
    const ok = { tap: 'bgtapab1', ip: '172.30.0.2', mac: '02:1a:2b:3c:4d:5e', egress: 'internet', allowPeers: false, allow: ['10.0.0.0/8'] };
    expect(parseArgs('firewall.set', ok)).toEqual(ok);
    expect(() => parseArgs('firewall.set', { ...ok, uid: 0 })).toThrow(/unknown field "uid"/);
    expect(() => parseArgs('firewall.set', { ...ok, bridge: 'banger0' })).toThrow(/unknown field "bridge"/);
    expect(() => parseArgs('firewall.set', { ...ok, tap: 'eth0' })).toThrow(/tap "eth0" is not a banger TAP name/);
    expect(() => parseArgs('firewall.set', { ...ok, ip: '172.30.0.256' })).toThrow(/ip the string "172.30.0.256" is not an IPv4 address/);
    expect(() => parseArgs('firewall.set', { ...ok, egress: 'all' })).toThrow(/egress must be "internet" or "none"/);
    expect(() => parseArgs('firewall.set', { ...ok, mac: '03:1a:2b:3c:4d:5e' })).toThrow(/mac the string "03:1a:2b:3c:4d:5e" is not a unicast MAC/);
    expect(() => parseArgs('firewall.set', { ...ok, mac: '02:1a:2b:3c:4d:5e drop' })).toThrow(/is not a unicast MAC/);
    expect(() => parseArgs('firewall.set', { ...ok, mac: undefined })).toThrow(/mac/);
    expect(() => parseArgs('firewall.set', { ...ok, allow: ['10.0.0.0/8 } accept'] })).toThrow(/is not an IPv4 CIDR/);
    expect(() => parseArgs('firewall.set', { ...ok, allow: Array(65).fill('10.0.0.0/8') })).toThrow(/more than 64/);
    expect(parseArgs('firewall.clear', { tap: 'bgtapab1' })).toEqual({ tap: 'bgtapab1' });
    expect(() => parseArgs('firewall.status', { all: true })).toThrow(/unknown field/);
  });
});
