import { fileURLToPath } from 'node:url';
import { resolve } from 'node:path';
import type { Argv } from 'yargs';
import { BangerError } from '../../errors.js';
import { layout } from '../../paths.js';
import { out, type GlobalArgs } from '../context.js';

const PROJECT = resolve(fileURLToPath(new URL('../../..', import.meta.url)));

interface InstallArgs extends GlobalArgs {
  dir: string;
  userDir?: string;
  group?: string;
  enable: boolean;
}

async function install(a: InstallArgs): Promise<void> {
  // Loaded only here: the host layer stays out of the CLI's ordinary path.
  const { run } = await import('../../host/exec/runner.js');
  const { DAEMON_UNIT, HELPER_UNIT, writeUnits } = await import('../../roothelper/units.js');
  const l = layout();
  const opts = { nodePath: process.execPath, projectDir: PROJECT, stateDir: l.home, group: a.group };
  const sys = await writeUnits(a.dir, opts);
  const userDir = a.userDir ?? resolve(process.env.HOME ?? '/root', '.config/systemd/user');
  const usr = await writeUnits(userDir, opts);
  if (a.enable) {
    const r = await run('systemctl', ['daemon-reload'], { reject: false }).catch((e) => ({ exitCode: 1, stderr: (e as Error).message }));
    if (r.exitCode !== 0) throw new BangerError('host', `systemctl daemon-reload failed: ${r.stderr}`, 'is systemd running here? the unit files are written; start the helper by hand');
    const e = await run('systemctl', ['enable', '--now', HELPER_UNIT], { reject: false }).catch((e) => ({ exitCode: 1, stderr: (e as Error).message }));
    if (e.exitCode !== 0) throw new BangerError('host', `systemctl enable --now ${HELPER_UNIT} failed: ${e.stderr}`);
  }
  out(a, { helperUnit: sys.helper, daemonUnit: usr.daemon, enabled: a.enable }, () =>
    [`wrote ${sys.helper}`, `wrote ${usr.daemon}`, a.enable ? `enabled and started ${HELPER_UNIT}` : `next: systemctl daemon-reload && systemctl enable --now ${HELPER_UNIT}; systemctl --user enable --now ${DAEMON_UNIT}`].join('\n'),
  );
}

export function systemCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y
    .command(
      'install',
      'write the systemd units of the root helper (system) and the owner daemon (user), and with --enable start the helper',
      (a) =>
        a
          .option('dir', { type: 'string', default: '/etc/systemd/system', describe: 'where the helper unit goes' })
          .option('user-dir', { type: 'string', describe: 'where the daemon\'s user unit goes (default ~/.config/systemd/user of the invoking user)' })
          .option('group', { type: 'string', describe: 'members of this group may use the helper (its socket\'s group)' })
          .option('enable', { type: 'boolean', default: false, describe: 'systemctl daemon-reload and enable --now the helper' }),
      (a) => install(a),
    )
    .demandCommand(1, 'name a system command: install');
}
