/**
 * The root helper's entry point:
 *   node --import tsx src/roothelper/main.ts --socket PATH --state-dir DIR [--group G] [--bridge banger0]
 *        [--jailer-bin PATH] [--chroot-base DIR]
 * Runs until SIGTERM/SIGINT, then removes its socket. Installed as a systemd unit by `banger system install`
 * (see units.ts).
 */
import { parseArgs } from 'node:util';
import { BangerError, errorMessage } from '../errors.js';
import { BRIDGE_NAME_RE } from '../host/net/net.js';
import { Firewall } from '../host/net/firewall.js';
import { startRootHelper } from './server.js';

const usage =
  'usage: node --import tsx src/roothelper/main.ts --socket PATH --state-dir DIR [--group G] [--bridge NAME] [--jailer-bin PATH] [--chroot-base DIR]';

async function main(): Promise<void> {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        socket: { type: 'string' },
        'state-dir': { type: 'string' },
        group: { type: 'string' },
        bridge: { type: 'string' },
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
  if (!values.socket || !values['state-dir']) {
    process.stderr.write(`roothelper: --socket and --state-dir are required\n${usage}\n`);
    process.exit(2);
  }
  if (values.bridge !== undefined && !BRIDGE_NAME_RE.test(values.bridge)) {
    process.stderr.write(`roothelper: --bridge ${JSON.stringify(values.bridge)} is not a banger bridge name\n`);
    process.exit(2);
  }
  if (process.getuid?.() !== 0) {
    process.stderr.write('roothelper: warning: not running as root; TAP, bridge, NAT and jailer requests will fail\n');
  }
  // Before serving: firewall tables a crashed run left with no banger TAP behind them go (see host/net/firewall.ts).
  if (process.getuid?.() === 0) {
    const fw = await new Firewall().reconcileAtStart().catch((e) => `not checked (${errorMessage(e)})`);
    process.stderr.write(`roothelper: firewall tables at start: ${fw}\n`);
  }
  const server = await startRootHelper({
    socketPath: values.socket,
    stateDir: values['state-dir'],
    group: values.group,
    bridge: values.bridge,
    jailer: { jailerBin: values['jailer-bin'], chrootBase: values['chroot-base'] },
  });
  let stopping = false;
  const stop = (sig: string) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`roothelper: ${sig}, shutting down\n`);
    server.close().then(
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
  process.exit(1);
});
