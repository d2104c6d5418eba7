import type { Argv } from 'yargs';
import { layout, readDaemonPid } from '../../paths.js';
import { spawnDaemon, tryConnect } from '../connect.js';
import { call, out, usage, type GlobalArgs } from '../context.js';
import { c } from '../output.js';
import { buildInfo } from '../../version.js';
import { versionCheck } from '../../version-skew.js';

interface StartArgs extends GlobalArgs {
  foreground: boolean;
  inspect?: number;
}

/** `--inspect` alone means the inspector's usual port; `--inspect 0` picks a free one. */
export const DEFAULT_INSPECT_PORT = 8080;

function inspectPort(raw: unknown): number | undefined {
  if (raw === undefined) return undefined;
  const port = raw === '' || raw === true ? DEFAULT_INSPECT_PORT : Number(raw);
  if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`--inspect takes a TCP port (0-65535), not ${JSON.stringify(raw)}`, 'banger daemon start --inspect 8080');
  return port;
}

async function start(a: StartArgs): Promise<void> {
  const l = layout();
  if (a.foreground) {
    // Loaded only here: every other command talks to the daemon and never loads SQLite or XState.
    const { startDaemon } = await import('../../daemon/daemon.js');
    const h = await startDaemon(process.env, { inspectPort: a.inspect });
    process.stderr.write(`banger daemon ${process.pid} listening on ${l.socket}${h.inspector ? `; inspector on ws://127.0.0.1:${h.inspector.port}` : ''}\n`);
    const shutdown = () => void h.stop().then(() => process.exit(0));
    process.on('SIGTERM', shutdown);
    process.on('SIGINT', shutdown);
    await new Promise(() => {});
    return;
  }
  const existing = await tryConnect(l);
  if (existing) {
    existing.close();
    if (a.inspect !== undefined) usage('a daemon is already running without the inspector', 'stop it first (banger daemon stop), then banger daemon start --inspect');
    out(a, { started: false, pid: readDaemonPid(l), socket: l.socket }, () => `daemon already running (pid ${readDaemonPid(l)}) on ${l.socket}`);
    return;
  }
  await spawnDaemon(l, { inspectPort: a.inspect });
  out(a, { started: true, pid: readDaemonPid(l), socket: l.socket }, () => `daemon started (pid ${readDaemonPid(l)}) on ${l.socket}`);
}

async function stop(a: GlobalArgs): Promise<void> {
  const l = layout();
  const client = await tryConnect(l);
  if (!client) {
    out(a, { stopped: false, reason: 'not running' }, () => 'daemon is not running');
    return;
  }
  const pid = readDaemonPid(l);
  await client.call('daemon.stop', {}).catch(() => undefined);
  client.close();
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    if (!(await tryConnect(l).then((cl) => (cl?.close(), !!cl)))) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  out(a, { stopped: true, pid }, () => `daemon ${pid ?? ''} stopped`);
}

export function daemonCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y
    .command(
      'start',
      'start the owner daemon',
      (a) => a.option('foreground', { type: 'boolean', default: false, describe: 'run in this process' }).option('inspect', { describe: `serve every actor's transitions to Stately's inspector over WebSocket on 127.0.0.1:PORT (default ${DEFAULT_INSPECT_PORT})`, coerce: inspectPort }),
      (a) => start(a),
    )
    .command('stop', 'stop the owner daemon (VMs keep running)', (a) => a, (a) => stop(a))
    .command('status', 'show the daemon status', (a) => a, async (a) => {
      const s = await call('daemon.status', {});
      const skew = versionCheck({ cli: buildInfo(), daemon: s });
      const pool = (s.warmPool ?? []).map((p) => `
  warm pool ${p.image} ${p.vcpus} vCPU ${p.memoryMiB} MiB: ${p.ready} ready, ${p.starting} starting (size ${p.size})`).join('');
      const warn = skew.status === 'ok' ? '' : `
${c.yellow('warn')} ${skew.detail}
     fix: ${skew.fix}`;
      out(a, s, () => `${c.green('running')} pid ${s.pid}, version ${s.version} (${s.commit}), up ${s.uptimeSeconds}s, ${s.vms} vm(s), socket ${s.socket}${s.inspector ? `, inspector ${s.inspector}` : ''}${pool}${warn}`);
    })
    .demandCommand(1, 'name a daemon command: start, stop or status');
}
