import { createHash } from 'node:crypto';
import { BangerError } from '../../errors.js';
import { run as defaultRun, which, type Runner } from '../exec/runner.js';
import { kernelOwnerFor } from './tap-owner.js';

/**
 * Host network operations: the bridge, the TAP devices and egress NAT, all through real `ip` (and `nft` or
 * `iptables`) commands started by the runner. Every function is idempotent, because a restored actor re-runs
 * a step that was in flight. Every name that reaches a command is checked against banger's prefixes first,
 * even though the root helper has validated it already (defence in depth; lima pkg/networks/validate.go).
 *
 * `netns` runs the operation inside that network namespace (`ip -n NS …`, `ip netns exec NS …`): tests use
 * it to work on a namespace of their own and never touch the host's interfaces.
 */

/** TAP devices banger owns: `bgtap` + 1-10 of [0-9a-z] (15 chars at most, the kernel's IFNAMSIZ - 1). */
export const TAP_PREFIX = 'bgtap';
export const TAP_NAME_RE = /^bgtap[0-9a-z]{1,10}$/;
/** Bridges banger owns: `banger` + 0-9 of [0-9a-z]. */
export const BRIDGE_PREFIX = 'banger';
export const BRIDGE_NAME_RE = /^banger[0-9a-z]{0,9}$/;
export const DEFAULT_BRIDGE = 'banger0';
/** Network namespace names as `ip netns` takes them, kept to a plain identifier. */
export const NETNS_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** The kernel's IFNAMSIZ is 16 including the NUL: 15 usable characters. */
export const IFNAME_MAX = 15;

export interface NetOptions {
  runner?: Runner;
  signal?: AbortSignal;
  /** Run inside this network namespace (tests). */
  netns?: string;
}

export function assertTapName(name: string): string {
  if (typeof name !== 'string' || !TAP_NAME_RE.test(name)) {
    throw new BangerError(
      'invalid_params',
      `refused TAP name ${JSON.stringify(name)}: not a banger TAP device`,
      `a TAP name is "${TAP_PREFIX}" followed by 1-10 of [0-9a-z] (${IFNAME_MAX} characters at most)`,
    );
  }
  return name;
}

export function assertBridgeName(name: string): string {
  if (typeof name !== 'string' || !BRIDGE_NAME_RE.test(name)) {
    throw new BangerError(
      'invalid_params',
      `refused bridge name ${JSON.stringify(name)}: not a banger bridge`,
      `a bridge name is "${BRIDGE_PREFIX}" followed by 0-9 of [0-9a-z] (${IFNAME_MAX} characters at most)`,
    );
  }
  return name;
}

function assertNetns(netns: string | undefined): void {
  if (netns !== undefined && !NETNS_RE.test(netns)) {
    throw new BangerError('invalid_params', `refused network namespace name ${JSON.stringify(netns)}`);
  }
}

function assertId(what: string, n: number): number {
  if (!Number.isSafeInteger(n) || n < 0 || n >= 2 ** 31) {
    throw new BangerError('invalid_params', `refused ${what} ${JSON.stringify(n)}: not an integer in [0, 2^31)`);
  }
  return n;
}

// ---------------------------------------------------------------------------------------------------------
// Command plumbing

function ctx(opts: NetOptions) {
  assertNetns(opts.netns);
  const runner = opts.runner ?? defaultRun;
  const signal = opts.signal;
  const netns = opts.netns;
  return {
    runner,
    /** `ip [-n NS] ARGS`. */
    ip: (args: string[], reject = true) =>
      runner('ip', netns ? ['-n', netns, ...args] : args, { signal, reject }),
    /** Any other command, inside the namespace when one is set. */
    exec: (file: string, args: string[], extra: { input?: string; reject?: boolean } = {}) =>
      netns
        ? runner('ip', ['netns', 'exec', netns, file, ...args], { signal, ...extra })
        : runner(file, args, { signal, ...extra }),
  };
}

/** One entry of `ip -j -d link show`, the fields banger reads. */
export interface IpLink {
  ifname: string;
  flags?: string[];
  operstate?: string;
  master?: string;
  address?: string;
  linkinfo?: { info_kind?: string; info_data?: { type?: string; user?: string | number; group?: string | number } };
}

export function parseIpLinks(stdout: string): IpLink[] {
  const text = stdout.trim();
  if (!text) return [];
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new BangerError('host', `could not parse the output of "ip -j link show": ${(e as Error).message}`);
  }
  if (!Array.isArray(data)) throw new BangerError('host', '"ip -j link show" did not print a JSON array');
  return data.filter((l): l is IpLink => typeof l === 'object' && l !== null && typeof (l as IpLink).ifname === 'string');
}

/** The link called `name`, or undefined when there is none. */
async function getLink(c: ReturnType<typeof ctx>, name: string): Promise<IpLink | undefined> {
  const r = await c.ip(['-j', '-d', 'link', 'show', 'dev', name], false);
  if (r.exitCode !== 0) {
    if (/does not exist|cannot find device/i.test(r.stderr)) return undefined;
    throw new BangerError('host', `ip link show dev ${name} failed (exit ${r.exitCode}): ${r.stderr.trim()}`);
  }
  return parseIpLinks(r.stdout).find((l) => l.ifname === name);
}

const isTap = (l: IpLink) => l.linkinfo?.info_kind === 'tun' && l.linkinfo?.info_data?.type === 'tap';
const kindOf = (l: IpLink) =>
  l.linkinfo?.info_kind ? `${l.linkinfo.info_kind}${l.linkinfo.info_data?.type ? `/${l.linkinfo.info_data.type}` : ''}` : 'device of unknown kind';

/** The owning uid of a TAP, from sysfs (`-1` when none, NaN when unreadable). `ip -d` prints a user name where it can, so use sysfs. */
async function tapOwner(c: ReturnType<typeof ctx>, name: string, file: 'owner' | 'group'): Promise<number> {
  const r = await c.exec('cat', [`/sys/class/net/${assertTapName(name)}/${file}`], { reject: false });
  // NaN when unreadable (the device went away): equal to no owner, so it never passes as anyone's.
  return r.exitCode === 0 ? Number.parseInt(r.stdout.trim(), 10) : Number.NaN;
}

// ---------------------------------------------------------------------------------------------------------
// TAP devices

export interface CreateTapOptions extends NetOptions {
  gid?: number;
  /** Attach the TAP to this bridge (which must exist). */
  bridge?: string;
}

export interface TapInfo {
  name: string;
  up: boolean;
  operstate?: string;
  master?: string;
  mac?: string;
}

/**
 * `ip tuntap add dev NAME mode tap user UID [group GID]`, attach to the bridge, bring it up.
 * An existing TAP with the same owner is fine (`created: false`); an existing device of another kind, or a TAP
 * owned by someone else, is a conflict that is left alone.
 */
export async function createTap(name: string, uid: number, opts: CreateTapOptions = {}): Promise<{ name: string; created: boolean }> {
  assertTapName(name);
  assertId('uid', uid);
  if (opts.gid !== undefined) assertId('gid', opts.gid);
  if (opts.bridge !== undefined) assertBridgeName(opts.bridge);
  const c = ctx(opts);

  if (opts.bridge !== undefined) {
    const br = await getLink(c, opts.bridge);
    if (br?.linkinfo?.info_kind !== 'bridge') {
      throw new BangerError(
        'not_found',
        br ? `${opts.bridge} is a ${kindOf(br)}, not a bridge, so TAP ${name} cannot join it` : `bridge ${opts.bridge} does not exist, so TAP ${name} cannot join it`,
        'ensure the bridge first (bridge.ensure)',
      );
    }
  }

  let created = false;
  const existing = await getLink(c, name);
  if (existing) {
    if (!isTap(existing)) {
      throw new BangerError('conflict', `${name} exists but is a ${kindOf(existing)}, not a TAP device`, `remove it: ip link del ${name}`);
    }
    const owner = await tapOwner(c, name, 'owner');
    if (owner !== kernelOwnerFor(uid)) {
      throw new BangerError(
        'conflict',
        `TAP ${name} exists but belongs to ${owner === -1 ? 'no user' : `uid ${owner}`}, not uid ${uid}`,
        `delete it (ip link del ${name}) or use another name`,
      );
    }
  } else {
    // For root: no user and no group (-1): only CAP_NET_ADMIN may attach, and no TAP is "owned by uid 0".
    const args = ['tuntap', 'add', 'dev', name, 'mode', 'tap'];
    if (uid !== 0) args.push('user', String(uid));
    if (uid !== 0 && opts.gid !== undefined) args.push('group', String(opts.gid));
    const r = await c.ip(args, false);
    if (r.exitCode !== 0) {
      // Lost a race with another creator: fine if what is there now is what we wanted.
      const now = await getLink(c, name);
      if (!now || !isTap(now)) throw new BangerError('host', `ip tuntap add dev ${name} failed: ${r.stderr.trim()}`);
    } else {
      created = true;
    }
  }

  if (opts.bridge !== undefined) {
    const link = await getLink(c, name);
    if (link?.master !== opts.bridge) await c.ip(['link', 'set', 'dev', name, 'master', opts.bridge]);
  }
  await c.ip(['link', 'set', 'dev', name, 'up']);
  return { name, created };
}

/** Delete a TAP. A missing one is fine (`deleted: false`); a device of another kind is refused. */
export async function deleteTap(name: string, opts: NetOptions = {}): Promise<{ name: string; deleted: boolean }> {
  assertTapName(name);
  const c = ctx(opts);
  const existing = await getLink(c, name);
  if (!existing) return { name, deleted: false };
  if (!isTap(existing)) {
    throw new BangerError('conflict', `refused to delete ${name}: it is a ${kindOf(existing)}, not a TAP device`);
  }
  const r = await c.ip(['link', 'del', 'dev', name], false);
  if (r.exitCode !== 0) {
    if (!(await getLink(c, name))) return { name, deleted: false };
    throw new BangerError('host', `ip link del dev ${name} failed: ${r.stderr.trim()}`);
  }
  return { name, deleted: true };
}

/**
 * The TAP devices whose names start with `prefix` (banger's by default). With `owner`, only those the kernel
 * records as that owner's (sysfs `owner`; -1 for none), read per device: `ip -d` prints a user name where it can.
 */
export async function listTaps(prefix: string = TAP_PREFIX, opts: NetOptions & { owner?: number } = {}): Promise<TapInfo[]> {
  const c = ctx(opts);
  const r = await c.ip(['-j', '-d', 'link', 'show']);
  const taps = parseIpLinks(r.stdout)
    .filter((l) => l.ifname.startsWith(prefix) && isTap(l))
    .map((l) => ({
      name: l.ifname,
      up: (l.flags ?? []).includes('UP'),
      operstate: l.operstate,
      master: l.master,
      mac: l.address,
    }))
    .sort((a, b) => a.name.localeCompare(b.name));
  if (opts.owner === undefined) return taps;
  const owned: TapInfo[] = [];
  for (const t of taps) if ((await tapOwner(c, t.name, 'owner')) === opts.owner) owned.push(t);
  return owned;
}

/** What the kernel says about device `name`: missing, not a TAP, or a TAP with its owner uid (-1 for none). */
export async function tapOwnership(name: string, opts: NetOptions = {}): Promise<{ kind: 'missing' } | { kind: 'other'; what: string } | { kind: 'tap'; owner: number }> {
  assertTapName(name);
  const c = ctx(opts);
  const link = await getLink(c, name);
  if (!link) return { kind: 'missing' };
  if (!isTap(link)) return { kind: 'other', what: kindOf(link) };
  return { kind: 'tap', owner: await tapOwner(c, name, 'owner') };
}

// ---------------------------------------------------------------------------------------------------------
// Bridge and NAT

/** Create the bridge if missing, give it the address (`cidr`, e.g. `172.30.0.1/24`) if missing, bring it up. */
export async function ensureBridge(name: string, cidr: string, opts: NetOptions = {}): Promise<{ name: string; created: boolean; addressAdded: boolean }> {
  assertBridgeName(name);
  const net = parseCidr(cidr);
  const c = ctx(opts);
  let created = false;
  const existing = await getLink(c, name);
  if (existing) {
    if (existing.linkinfo?.info_kind !== 'bridge') {
      throw new BangerError('conflict', `${name} exists but is a ${kindOf(existing)}, not a bridge`, `remove it: ip link del ${name}`);
    }
  } else {
    const r = await c.ip(['link', 'add', 'name', name, 'type', 'bridge'], false);
    if (r.exitCode !== 0) {
      const now = await getLink(c, name);
      if (now?.linkinfo?.info_kind !== 'bridge') throw new BangerError('host', `ip link add ${name} type bridge failed: ${r.stderr.trim()}`);
    } else {
      created = true;
    }
  }
  const addrs = await c.ip(['-j', 'addr', 'show', 'dev', name]);
  const want = `${net.address}/${net.prefix}`;
  const have = bridgeAddresses(addrs.stdout);
  let addressAdded = false;
  if (!have.includes(want)) {
    const r = await c.ip(['addr', 'add', want, 'dev', name], false);
    if (r.exitCode !== 0 && !/exists/i.test(r.stderr)) {
      throw new BangerError('host', `ip addr add ${want} dev ${name} failed: ${r.stderr.trim()}`);
    }
    addressAdded = r.exitCode === 0;
  }
  await c.ip(['link', 'set', 'dev', name, 'up']);
  return { name, created, addressAdded };
}

function bridgeAddresses(stdout: string): string[] {
  const text = stdout.trim();
  if (!text) return [];
  const data = JSON.parse(text) as Array<{ addr_info?: Array<{ family?: string; local?: string; prefixlen?: number }> }>;
  return data.flatMap((l) => (l.addr_info ?? []).filter((a) => a.family === 'inet').map((a) => `${a.local}/${a.prefixlen}`));
}

export type NatBackend = 'nft' | 'iptables';

export interface NatOptions extends NetOptions {
  /** Force a backend; by default nft when it is installed, else iptables. */
  backend?: NatBackend;
  /** Find a command on PATH (tests hand in their own). */
  whichFn?: (cmd: string) => Promise<string | undefined>;
}

/** nft table banger owns for one bridge. It is replaced as a whole, so the rules can never pile up. */
export const natTableName = (bridge: string) => `banger_${assertBridgeName(bridge)}`;

/**
 * Egress NAT for the bridge's subnet, idempotent:
 * - turns on IPv4 forwarding (`net.ipv4.ip_forward=1`, a per-namespace setting of the host);
 * - nft (preferred): one table `ip banger_<bridge>` replaced atomically in a single `nft -f` transaction:
 *   masquerade what leaves the subnet through any other interface, and accept forwarding from the bridge and
 *   replies to it. Accepting in our own table cannot override a drop in another table (Docker's FORWARD
 *   policy, for instance): such hosts need their own rule.
 * - iptables (fallback): the same three rules, each added only when `iptables -C` does not find it.
 */
export async function ensureNat(bridge: string, cidr: string, opts: NatOptions = {}): Promise<{ backend: NatBackend }> {
  assertBridgeName(bridge);
  const net = parseCidr(cidr);
  const subnet = `${net.network}/${net.prefix}`;
  const c = ctx(opts);
  const find = opts.whichFn ?? ((cmd: string) => which(cmd));
  let backend = opts.backend;
  if (!backend) {
    if (await find('nft')) backend = 'nft';
    else if (await find('iptables')) backend = 'iptables';
    else {
      throw new BangerError('unsupported', 'cannot set up NAT: neither nft nor iptables is installed', 'install nftables (apt-get install nftables) or iptables');
    }
  }

  await c.exec('sysctl', ['-q', '-w', 'net.ipv4.ip_forward=1']);

  if (backend === 'nft') {
    const table = natTableName(bridge);
    const script = [
      `add table ip ${table}`,
      `delete table ip ${table}`,
      `table ip ${table} {`,
      `  chain postrouting {`,
      `    type nat hook postrouting priority srcnat; policy accept;`,
      `    ip saddr ${subnet} oifname != "${bridge}" masquerade`,
      `  }`,
      `  chain forward {`,
      `    type filter hook forward priority filter; policy accept;`,
      `    iifname "${bridge}" accept`,
      `    oifname "${bridge}" ct state established,related accept`,
      `  }`,
      `}`,
      '',
    ].join('\n');
    await c.exec('nft', ['-f', '-'], { input: script });
    return { backend };
  }

  const rules: string[][] = [
    ['-t', 'nat', '%', 'POSTROUTING', '-s', subnet, '!', '-o', bridge, '-j', 'MASQUERADE'],
    ['-t', 'filter', '%', 'FORWARD', '-i', bridge, '-j', 'ACCEPT'],
    ['-t', 'filter', '%', 'FORWARD', '-o', bridge, '-m', 'conntrack', '--ctstate', 'RELATED,ESTABLISHED', '-j', 'ACCEPT'],
  ];
  for (const rule of rules) {
    const check = await c.exec('iptables', rule.map((a) => (a === '%' ? '-C' : a)), { reject: false });
    if (check.exitCode === 0) continue;
    if (check.exitCode !== 1) throw new BangerError('host', `iptables -C failed (exit ${check.exitCode}): ${check.stderr.trim()}`);
    await c.exec('iptables', rule.map((a) => (a === '%' ? '-A' : a)));
  }
  return { backend };
}

/** Remove the NAT table of a bridge (nft only; iptables rules are left for the administrator). */
export async function removeNat(bridge: string, opts: NetOptions = {}): Promise<void> {
  const c = ctx(opts);
  const table = natTableName(bridge);
  await c.exec('nft', ['-f', '-'], { input: `add table ip ${table}\ndelete table ip ${table}\n` });
}

// ---------------------------------------------------------------------------------------------------------
// Pure helpers: MACs and addresses

/** A MAC as banger writes them: six lowercase hex pairs, unicast (the low bit of the first byte clear). */
export const UNICAST_MAC_RE = /^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$/;

/** A deterministic, locally administered, unicast MAC for a VM: `02:` and five bytes of sha256(id). */
export function macForVm(id: string): string {
  const h = createHash('sha256').update(`banger-mac:${id}`).digest();
  const bytes = [0x02, h[0], h[1], h[2], h[3], h[4]];
  return bytes.map((b) => b.toString(16).padStart(2, '0')).join(':');
}

export function ipToInt(ip: string): number {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(ip);
  if (!m) throw new BangerError('invalid_params', `${JSON.stringify(ip)} is not an IPv4 address`);
  const parts = m.slice(1).map((p) => {
    if (p.length > 1 && p.startsWith('0')) throw new BangerError('invalid_params', `${JSON.stringify(ip)} is not an IPv4 address (leading zero)`);
    return Number(p);
  });
  if (parts.some((p) => p > 255)) throw new BangerError('invalid_params', `${JSON.stringify(ip)} is not an IPv4 address`);
  return ((parts[0] << 24) | (parts[1] << 16) | (parts[2] << 8) | parts[3]) >>> 0;
}

export function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

export interface Cidr {
  /** The address as written (the bridge's own address for a bridge CIDR). */
  address: string;
  prefix: number;
  network: string;
  broadcast: string;
  netmask: string;
}

export function parseCidr(cidr: string): Cidr {
  const m = typeof cidr === 'string' ? /^([0-9.]+)\/(\d{1,2})$/.exec(cidr) : null;
  if (!m) throw new BangerError('invalid_params', `${JSON.stringify(cidr)} is not an IPv4 CIDR (like 172.30.0.1/24)`);
  const prefix = Number(m[2]);
  if (prefix > 32) throw new BangerError('invalid_params', `${JSON.stringify(cidr)}: prefix length ${prefix} is over 32`);
  const addr = ipToInt(m[1]);
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  const network = (addr & mask) >>> 0;
  const broadcast = (network | (~mask >>> 0)) >>> 0;
  return { address: intToIp(addr), prefix, network: intToIp(network), broadcast: intToIp(broadcast), netmask: intToIp(mask) };
}

const PRIVATE_RANGES: Array<[string, number]> = [
  ['10.0.0.0', 8],
  ['172.16.0.0', 12],
  ['192.168.0.0', 16],
];

/** Why a CIDR is not acceptable for a banger bridge, or undefined when it is: private IPv4, /16 to /30, a host address. */
export function bridgeCidrProblem(cidr: string): string | undefined {
  let c: Cidr;
  try {
    c = parseCidr(cidr);
  } catch (e) {
    return (e as Error).message;
  }
  if (c.prefix < 16 || c.prefix > 30) return `prefix /${c.prefix} is outside /16../30`;
  const a = ipToInt(c.address);
  const inPrivate = PRIVATE_RANGES.some(([base, p]) => {
    const mask = (0xffffffff << (32 - p)) >>> 0;
    return ((a & mask) >>> 0) === ipToInt(base);
  });
  if (!inPrivate) return `${c.address} is not in a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)`;
  if (c.address === c.network) return `${c.address} is the network address of ${c.network}/${c.prefix}, not a host address`;
  if (c.address === c.broadcast) return `${c.address} is the broadcast address of ${c.network}/${c.prefix}`;
  return undefined;
}

/** The gateway (the bridge's address) of a subnet: network + 1. */
export function gatewayAddress(cidr: string): string {
  const c = parseCidr(cidr);
  return intToIp(ipToInt(c.network) + 1);
}

/** Guest addresses of a subnet, in order: network + 2 up to broadcast - 1. */
export function hostAddresses(cidr: string): { first: string; last: string; count: number } {
  const c = parseCidr(cidr);
  const first = ipToInt(c.network) + 2;
  const last = ipToInt(c.broadcast) - 1;
  return { first: intToIp(first), last: intToIp(last), count: Math.max(0, last - first + 1) };
}

/** The first guest address (from .2) that is not in `used` and is not the gateway. Throws `conflict` when full. */
export function allocateAddress(cidr: string, used: Iterable<string>): string {
  const c = parseCidr(cidr);
  const taken = new Set<number>();
  for (const u of used) taken.add(ipToInt(u));
  taken.add(ipToInt(c.address));
  const first = ipToInt(c.network) + 2;
  const last = ipToInt(c.broadcast) - 1;
  for (let n = first; n <= last; n++) if (!taken.has(n)) return intToIp(n);
  throw new BangerError('conflict', `no free address left in ${c.network}/${c.prefix}`, 'delete a VM or configure a larger subnet');
}

/** Is `ip` inside the subnet of `cidr`? */
export function inSubnet(cidr: string, ip: string): boolean {
  const c = parseCidr(cidr);
  const mask = ipToInt(c.netmask);
  return ((ipToInt(ip) & mask) >>> 0) === ipToInt(c.network);
}
