/**
 * The tap guests' firewall as nftables text: one pure function of the VMs the root helper knows and their
 * policies, so it can be tested without a kernel. The helper replaces both tables atomically (`nft -f -`,
 * the text on stdin, never a shell) whenever a VM is added or removed, and deletes them with the last VM.
 *
 * What a guest may reach (SPEC "Networking", README "Security model"):
 * - the internet through the bridge's NAT (egress `internet`, the default), or nothing (egress `none`);
 * - never the host itself (input from a banger bridge: replies only), so no service of the host's is
 *   reachable, whatever address it listens on;
 * - never private, loopback, link-local, CGNAT, multicast or reserved ranges (the LAN included, when it is in
 *   one of them), except the CIDRs given with `--allow` and the host's DNS servers on port 53 (egress internet);
 * - never another VM, unless both VMs were created with `--allow-peers` (bridge-level rules: frames between
 *   two TAPs are switched, not routed, so no IP hook sees them on a host without br_netfilter);
 * - no IPv6 at all, and only its own address (IPv4 and ARP): a guest cannot take another's address.
 * Guests are matched by their TAP at the bridge and by their (anti-spoofed) address at the IP layer; every
 * banger bridge (`banger*`) and TAP (`bgtap*`) is covered, so a TAP that no VM registered is cut off.
 */
import { BangerError } from '../../errors.js';
import { TAP_NAME_RE, UNICAST_MAC_RE, ipToInt, parseCidr } from './net.js';

/** The table name, in both the `inet` and the `bridge` family. */
export const FIREWALL_TABLE = 'banger';

export type Egress = 'internet' | 'none';

/** One VM's isolation policy, as chosen at create. */
export interface IsolationPolicy {
  egress: Egress;
  allowPeers: boolean;
  /** IPv4 CIDRs the guest may reach although they are private (`--allow`). */
  allow: string[];
}

export const DEFAULT_POLICY: IsolationPolicy = { egress: 'internet', allowPeers: false, allow: [] };

export interface FirewallVm extends IsolationPolicy {
  tap: string;
  ip: string;
  /** The guest NIC's MAC: frames from its TAP with another source MAC are dropped (no claiming a neighbour's). */
  mac: string;
}

export interface FirewallInput {
  vms: FirewallVm[];
  /** The host's DNS servers (IPv4): reachable on port 53 by guests with egress `internet`. */
  dns: string[];
}

/** Destinations no guest reaches unless `--allow` names them. */
export const BLOCKED_RANGES = [
  '0.0.0.0/8',
  '10.0.0.0/8',
  '100.64.0.0/10',
  '127.0.0.0/8',
  '169.254.0.0/16',
  '172.16.0.0/12',
  '192.168.0.0/16',
  '224.0.0.0/4',
  '240.0.0.0/4',
];

const BRIDGES = '"banger*"';
const TAPS = '"bgtap*"';

/** A CIDR normalised to its network (`10.1.2.3/8` → `10.0.0.0/8`); a bare address is a /32. Throws on anything else. */
export function normalizeAllowCidr(cidr: string): string {
  const text = /^[0-9.]+$/.test(cidr) ? `${cidr}/32` : cidr;
  let c;
  try {
    c = parseCidr(text);
  } catch {
    throw new BangerError('usage', `--allow ${JSON.stringify(cidr)} is not an IPv4 CIDR`, 'write it like 192.168.1.0/24 or 10.0.0.5');
  }
  return `${c.network}/${c.prefix}`;
}

function checkVm(vm: FirewallVm): void {
  if (!TAP_NAME_RE.test(vm.tap)) throw new BangerError('invalid_params', `firewall: ${JSON.stringify(vm.tap)} is not a banger TAP name`);
  ipToInt(vm.ip);
  if (!UNICAST_MAC_RE.test(vm.mac)) throw new BangerError('invalid_params', `firewall: ${JSON.stringify(vm.mac)} is not a unicast MAC`);
  for (const a of vm.allow) normalizeAllowCidr(a);
}

const set = (items: string[]) => `{ ${items.join(', ')} }`;

/** The per-VM chain of the inet table: what a guest's new connections (routed or to the host) may reach. */
function vmChain(vm: FirewallVm, i: number, dns: string[], peerIps: string[]): string[] {
  const lines = [`  chain vm${i} {`, `    # ${vm.tap} ${vm.ip} egress ${vm.egress}${vm.allowPeers ? ' allow-peers' : ''}`];
  const allow = [...new Set(vm.allow.map(normalizeAllowCidr))];
  if (allow.length) lines.push(`    ip daddr ${set(allow)} accept`);
  if (vm.allowPeers && peerIps.length) lines.push(`    ip daddr ${set(peerIps)} accept`);
  if (vm.egress === 'internet' && dns.length) lines.push(`    meta l4proto { tcp, udp } th dport 53 ip daddr ${set(dns)} accept`);
  if (vm.egress === 'internet') lines.push(`    ip daddr ${set(BLOCKED_RANGES)} drop`, '    accept');
  else lines.push('    drop');
  lines.push('  }');
  return lines;
}

/**
 * The whole ruleset, replacing whatever a previous run left (each table is created, deleted and written in one
 * transaction, so a failure leaves the old rules in force). An empty VM list gives the removal script.
 */
export function renderFirewall(input: FirewallInput): string {
  if (input.vms.length === 0) return removalScript();
  const vms = [...input.vms].sort((a, b) => a.tap.localeCompare(b.tap));
  vms.forEach(checkVm);
  const dns = [...new Set(input.dns)].filter((d) => {
    ipToInt(d);
    return true;
  });
  const peers = vms.filter((v) => v.allowPeers);
  const out = [...removalScript().trimEnd().split('\n'), `table inet ${FIREWALL_TABLE} {`];
  vms.forEach((vm, i) => out.push(...vmChain(vm, i, dns, peers.filter((p) => p !== vm).map((p) => p.ip))));
  out.push(
    '  chain input {',
    '    type filter hook input priority filter; policy accept;',
    `    iifname != ${BRIDGES} accept`,
    '    ct state established,related accept',
    // A guest's packets to the host: only to a DNS server that is the host itself, and to --allow'ed host addresses.
    ...vms.map((vm, i) => `    ip saddr ${vm.ip} jump vm${i}-host`),
    '    drop',
    '  }',
    ...vms.flatMap((vm, i) => hostChain(vm, i, dns)),
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    `    iifname != ${BRIDGES} accept`,
    '    ct state established,related accept',
    ...vms.map((vm, i) => `    iifname ${BRIDGES} ip saddr ${vm.ip} jump vm${i}`),
    '    drop',
    '  }',
    '}',
    `table bridge ${FIREWALL_TABLE} {`,
    ...(peers.length ? [`  set peers {`, '    type ifname;', `    elements = ${set(peers.map((p) => `"${p.tap}"`))}`, '  }'] : []),
    '  chain prerouting {',
    '    type filter hook prerouting priority filter; policy accept;',
    ...vms.flatMap((vm) => [
      `    iifname "${vm.tap}" ether saddr != ${vm.mac} drop`,
      `    iifname "${vm.tap}" ether type ip ip saddr != ${vm.ip} drop`,
      `    iifname "${vm.tap}" ether type arp arp saddr ip != ${vm.ip} drop`,
      `    iifname "${vm.tap}" ether type arp arp saddr ether != ${vm.mac} drop`,
      `    iifname "${vm.tap}" ether type { ip, arp } accept`,
    ]),
    `    iifname ${TAPS} drop`,
    '  }',
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    ...(peers.length ? ['    iifname @peers oifname @peers accept'] : []),
    `    iifname ${TAPS} drop`,
    `    oifname ${TAPS} drop`,
    '  }',
    '}',
    '',
  );
  return out.join('\n');
}

/** What a guest may open toward the host's own addresses: the DNS server when the host is one, and --allow. */
function hostChain(vm: FirewallVm, i: number, dns: string[]): string[] {
  const lines = [`  chain vm${i}-host {`];
  const allow = [...new Set(vm.allow.map(normalizeAllowCidr))];
  if (allow.length) lines.push(`    ip daddr ${set(allow)} accept`);
  if (vm.egress === 'internet' && dns.length) lines.push(`    meta l4proto { tcp, udp } th dport 53 ip daddr ${set(dns)} accept`);
  lines.push('    drop', '  }');
  return lines;
}

/** Delete both tables; a table that is not there is fine (`add` first makes the `delete` always valid). */
export function removalScript(): string {
  return [
    `add table inet ${FIREWALL_TABLE}`,
    `delete table inet ${FIREWALL_TABLE}`,
    `add table bridge ${FIREWALL_TABLE}`,
    `delete table bridge ${FIREWALL_TABLE}`,
    '',
  ].join('\n');
}
