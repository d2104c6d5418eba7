/**
 * Network namespaces for the tap e2e tests (root only): "the host" where a daemon runs with its root helper
 * child (bridge, TAPs, NAT, firewall), and optionally "outside", a second namespace joined to the host by a veth
 * pair. The host's uplink has 198.51.100.1/24 (a public-looking range) and 192.168.77.1/24 (a stand-in for the
 * LAN); outside answers on 198.51.100.2 and 192.168.77.2, and the host routes to it by default. Outside has no
 * route to the bridge's subnet, so a guest's packet that comes back to it only does so through the bridge's NAT.
 */
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';

export const UPLINK = '198.51.100.1';
export const OUTSIDE = '198.51.100.2';
export const LAN_HOST = '192.168.77.1';
export const LAN = '192.168.77.2';

export interface TestNetns {
  /** The host namespace's name. */
  ns: string;
  /** The outside namespace's name, when it was made. */
  out?: string;
  /** Prefix for Banger.wrap: run a command inside the host namespace. */
  wrap: string[];
  /** Stop every process left in the namespaces (the detached root helper, servers), then delete them. */
  destroy(): Promise<void>;
}

async function addNetns(name: string): Promise<void> {
  await execa('ip', ['netns', 'add', name]);
  await execa('ip', ['-n', name, 'link', 'set', 'lo', 'up']);
}

async function destroyNetns(name: string): Promise<void> {
  const pids = await execa('ip', ['netns', 'pids', name], { reject: false });
  for (const p of String(pids.stdout).split('\n').filter(Boolean)) {
    try {
      process.kill(Number(p), 'SIGKILL');
    } catch {
      /* gone */
    }
  }
  await execa('ip', ['netns', 'del', name], { reject: false });
}

/** The veth pair host:uplink ⇄ out:world, their addresses, and the host's default route through outside. */
async function joinOutside(ns: string, out: string): Promise<void> {
  await execa('ip', ['-n', ns, 'link', 'add', 'uplink', 'type', 'veth', 'peer', 'name', 'world', 'netns', out]);
  const ends = [
    [ns, 'uplink', [`${UPLINK}/24`, `${LAN_HOST}/24`]],
    [out, 'world', [`${OUTSIDE}/24`, `${LAN}/24`]],
  ] as const;
  for (const [where, dev, addrs] of ends) {
    for (const addr of addrs) await execa('ip', ['-n', where, 'addr', 'add', addr, 'dev', dev]);
    await execa('ip', ['-n', where, 'link', 'set', dev, 'up']);
  }
  await execa('ip', ['-n', ns, 'route', 'add', 'default', 'via', OUTSIDE]);
}

/**
 * A fresh host namespace named `<prefix><6 hex>` (prefix: 3 letters, so that the name stays short), with an
 * outside namespace `<prefix>o<6 hex>` when `outside` is set. Throws unless the test runs as root.
 */
export async function makeTestNetns(prefix: string, opts: { outside?: boolean } = {}): Promise<TestNetns> {
  if (process.getuid?.() !== 0) throw new Error('tap e2e tests need root (ip netns, TAP devices, nftables)');
  const tag = randomBytes(3).toString('hex');
  const ns = `${prefix}${tag}`;
  const out = opts.outside ? `${prefix}o${tag}` : undefined;
  const made: string[] = [];
  const destroy = async () => {
    for (const n of made) await destroyNetns(n);
  };
  try {
    for (const n of [ns, out]) {
      if (!n) continue;
      await addNetns(n);
      made.push(n);
    }
    if (out) await joinOutside(ns, out);
  } catch (e) {
    await destroy();
    throw e;
  }
  return { ns, out, wrap: ['ip', 'netns', 'exec', ns], destroy };
}
