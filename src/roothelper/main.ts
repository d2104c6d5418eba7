/**
 * The root helper's entry point, either from its config file (what `banger system install` sets up):
 *   node dist/roothelper/main.js --config /usr/local/lib/banger/roothelper.json
 * or for one owner on the command line (a root daemon's own child helper):
 *   node --import tsx src/roothelper/main.ts --socket PATH --state-dir DIR --owner-uid N --owner-gid N
 *        [--bridge banger0] [--cidr 172.30.0.1/24] [--nat] [--jailer-bin PATH] [--chroot-base DIR]
 * Serves one socket per owner (see config.ts) until SIGTERM/SIGINT, then removes its sockets.
 */
import { parseArgs } from 'node:util';
import { BangerError, errorMessage } from '../errors.js';
import { Firewall } from '../host/net/firewall.js';
import { loadHelperConfig, networkOf, parseHelperConfig, type HelperConfig } from './config.js';
import { startRootHelper, type RootHelperServer } from './server.js';

const usage = [
  'usage: roothelper --config FILE',
  '       roothelper --socket PATH --state-dir DIR --owner-uid N --owner-gid N [--bridge NAME] [--cidr CIDR] [--nat] [--jailer-bin PATH] [--chroot-base DIR]',
].join('\n');

type Flags = Record<string, string | boolean | undefined>;

function configFromFlags(v: Flags): HelperConfig {
  if (!v.socket || !v['state-dir'] || v['owner-uid'] === undefined || v['owner-gid'] === undefined) {
    throw new BangerError('usage', 'give --config FILE, or --socket, --state-dir, --owner-uid and --owner-gid');
  }
  const num = (flag: string) => (/^\d+$/.test(String(v[flag])) ? Number(v[flag]) : Number.NaN);
  return parseHelperConfig(
    {
      ...(v.bridge !== undefined ? { bridge: v.bridge } : {}),
      ...(v.cidr !== undefined ? { cidr: v.cidr } : {}),
      nat: v.nat === true,
      ...(v['jailer-bin'] !== undefined ? { jailerBin: v['jailer-bin'] } : {}),
      ...(v['chroot-base'] !== undefined ? { chrootBase: v['chroot-base'] } : {}),
      owners: [{ uid: num('owner-uid'), gid: num('owner-gid'), stateDir: v['state-dir'], socket: v.socket }],
    },
    'the command line',
  );
}

async function main(): Promise<void> {
  let values: Flags;
  try {
    ({ values } = parseArgs({
      options: {
        config: { type: 'string' },
        socket: { type: 'string' },
        'state-dir': { type: 'string' },
        'owner-uid': { type: 'string' },
        'owner-gid': { type: 'string' },
        bridge: { type: 'string' },
        cidr: { type: 'string' },
        nat: { type: 'boolean' },
        'jailer-bin': { type: 'string' },
        'chroot-base': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    process.stderr.write(`roothelper: ${errorMessage(e)}\n${usage}\n`);
    process.exit(2);
  }
  if (values.help) {
    process.stdout.write(`${usage}\n`);
    return;
  }
  if (process.getuid?.() !== 0) {
    process.stderr.write('roothelper: warning: not running as root; TAP, bridge, NAT and jailer requests will fail\n');
  }
  // Before serving: firewall tables a crashed run left with no banger TAP behind them go (see host/net/firewall.ts).
  const firewall = new Firewall();
  if (process.getuid?.() === 0) {
    const fw = await firewall.reconcileAtStart().catch((e) => `not checked (${errorMessage(e)})`);
    process.stderr.write(`roothelper: firewall tables at start: ${fw}\n`);
  }
  const config = typeof values.config === 'string' ? await loadHelperConfig(values.config) : configFromFlags(values);
  const servers: RootHelperServer[] = [];
  for (const o of config.owners) {
    servers.push(
      await startRootHelper({
        socketPath: o.socket,
        stateDir: o.stateDir,
        owner: { uid: o.uid, gid: o.gid },
        network: networkOf(config),
        jailer: { jailerBin: config.jailerBin, chrootBase: config.chrootBase },
        firewall,
      }),
    );
  }
  let stopping = false;
  const stop = (sig: string) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`roothelper: ${sig}, shutting down\n`);
    Promise.all(servers.map((s) => s.close())).then(
      () => process.exit(0),
      (e) => {
        process.stderr.write(`roothelper: ${errorMessage(e)}\n`);
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main().catch((e) => {
  const hint = e instanceof BangerError && e.hint ? `\nhint: ${e.hint}` : '';
  process.stderr.write(`roothelper: ${errorMessage(e)}${hint}\n`);
  process.exit(e instanceof BangerError && e.kind === 'usage' ? 2 : 1);
});
