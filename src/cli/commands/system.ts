import { chown, mkdir, writeFile } from 'node:fs/promises';
import { existsSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { userInfo } from 'node:os';
import type { Argv } from 'yargs';
import { BangerError } from '../../errors.js';
import { DEFAULT_PREFIX, installLayout, runningRoot, type InstallLayout } from '../../host/install/layout.js';
import { out, type GlobalArgs } from '../context.js';

interface InstallArgs extends GlobalArgs {
  from?: string;
  prefix: string;
  owner?: string;
  enable: boolean;
  unitDir: string;
  userUnitDir?: string;
}

interface Owner {
  name: string;
  uid: number;
  gid: number;
  group: string;
  home: string;
}

/** The owner's passwd entry: --owner, else the user sudo ran for (SUDO_USER), else whoever runs this. */
async function resolveOwner(name: string): Promise<Owner> {
  const { run } = await import('../../host/exec/runner.js');
  const pw = await run('getent', ['passwd', name], { reject: false });
  const f = pw.stdout.trim().split(':');
  if (pw.exitCode !== 0 || f.length < 7) throw new BangerError('usage', `no user named ${JSON.stringify(name)} on this host`, 'pass --owner with an existing user');
  const gid = Number(f[3]);
  const gr = await run('getent', ['group', String(gid)], { reject: false });
  return { name: f[0], uid: Number(f[2]), gid, group: gr.exitCode === 0 ? gr.stdout.split(':')[0] : String(gid), home: f[5] };
}

/** Release into PREFIX (or keep the one there at the same version), `current`, and PREFIX/bin/banger. */
async function installRelease(a: InstallArgs, L: InstallLayout): Promise<{ version: string; commit: string; dir: string }> {
  const { stageRelease } = await import('../../host/install/release.js');
  const { atomicReplace, renameLinkInto } = await import('../../host/install/atomic.js');
  const { PREVIOUS_SUFFIX, readRelease } = await import('../../host/install/layout.js');
  const { progress } = await import('./update.js');
  const from = a.from ?? runningRoot();
  const seed = existsSync(L.current) ? L.current : runningRoot();
  const staged = await stageRelease(from, L, { seed, env: process.env, log: (l) => progress('staging', l), keepCurrent: true });
  const target = `releases/${staged.version}`;
  if (!existsSync(L.current) || readlinkSync(L.current) !== target) await atomicReplace(L.current, target, PREVIOUS_SUFFIX);
  await mkdir(join(L.prefix, 'bin'), { recursive: true, mode: 0o755 });
  await renameLinkInto(L.bin, '../lib/banger/current/bin/banger.js');
  const info = readRelease(staged.dir) ?? staged;
  return { version: info.version, commit: info.commit, dir: staged.dir };
}

async function writeUnit(dir: string, name: string, text: string, owner?: Owner): Promise<string> {
  await mkdir(dir, { recursive: true });
  const path = join(dir, name);
  await writeFile(path, text, { mode: 0o644 });
  if (owner) await chown(path, owner.uid, owner.gid);
  return path;
}

async function install(a: InstallArgs): Promise<void> {
  if (process.getuid?.() !== 0) throw new BangerError('usage', 'system install writes root-owned files and units and needs root', 'sudo banger system install');
  const { assertRootOwnedPath } = await import('../../host/install/ownership.js');
  const { DAEMON_UNIT, HELPER_UNIT, DEFAULT_HELPER_SOCKET, daemonUnit, helperUnit } = await import('../../roothelper/units.js');
  const owner = await resolveOwner(a.owner ?? process.env.SUDO_USER ?? userInfo().username);
  const L = installLayout(a.prefix);
  await assertRootOwnedPath(L.lib);
  const systemd = existsSync('/run/systemd/system');
  if (a.enable && !systemd) throw new BangerError('usage', '--enable needs systemd, and it is not running here', 'leave out --enable: the units are written and the command prints how to start them');
  const rel = await installRelease(a, L);
  const stateDir = process.env.SUDO_USER ? join(owner.home, '.local', 'share', 'banger') : (process.env.BANGER_HOME ?? join(owner.home, '.local', 'share', 'banger'));
  // What the helper trusts: whom its socket serves (the socket is made theirs, mode 0600) and its bridge.
  const { helperConfigFor } = await import('../../roothelper/config.js');
  const helperConfig = helperConfigFor({ name: owner.name, uid: owner.uid, gid: owner.gid, stateDir, socket: DEFAULT_HELPER_SOCKET }, join(stateDir, 'config.json'));
  await writeFile(L.helperConfig, JSON.stringify(helperConfig, null, 2) + '\n', { mode: 0o644 });
  const opts = { nodePath: process.execPath, projectDir: L.current, stateDir, helperConfig: L.helperConfig };
  const helper = await writeUnit(a.unitDir, HELPER_UNIT, helperUnit(opts));
  const daemon = await writeUnit(a.userUnitDir ?? join(owner.home, '.config', 'systemd', 'user'), DAEMON_UNIT, daemonUnit(opts), owner);
  if (a.enable) {
    const { run } = await import('../../host/exec/runner.js');
    await run('systemctl', ['daemon-reload']);
    await run('systemctl', ['enable', '--now', HELPER_UNIT]);
  }
  const next = a.enable
    ? `enabled and started ${HELPER_UNIT}; as ${owner.name}: systemctl --user enable --now ${DAEMON_UNIT}`
    : systemd
      ? `next: systemctl daemon-reload && systemctl enable --now ${HELPER_UNIT}; as ${owner.name}: systemctl --user enable --now ${DAEMON_UNIT}`
      : `systemd is not running here: start the helper with ${helperUnit(opts).split('\n').find((l) => l.startsWith('ExecStart='))?.slice('ExecStart='.length)}, and the daemon as ${owner.name} with ${L.bin} daemon start`;
  out(a, { version: rel.version, commit: rel.commit, release: rel.dir, bin: L.bin, owner: owner.name, group: owner.group, stateDir, helperUnit: helper, daemonUnit: daemon, helperConfig: L.helperConfig, enabled: a.enable, systemd }, () =>
    [`installed banger ${rel.version} (${rel.commit}) in ${rel.dir}; ${L.bin}`, `owner ${owner.name} (only this user may use the helper's socket ${DEFAULT_HELPER_SOCKET}), state in ${stateDir}`, `wrote ${helper}`, `wrote ${daemon}`, next].join('\n'),
  );
}

export function systemCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y
    .command(
      'install',
      'install a root-owned release under PREFIX/lib/banger (current link, PREFIX/bin/banger) and the systemd units that run only from there',
      (a) =>
        a
          .option('from', { type: 'string', describe: 'a tarball from npm pack or a built directory (default: the running release)' })
          .option('prefix', { type: 'string', default: DEFAULT_PREFIX, describe: 'every directory on the path must be root-owned and not writable by others' })
          .option('owner', { type: 'string', describe: 'the user whose daemon uses the helper (default: SUDO_USER, else you)' })
          .option('enable', { type: 'boolean', default: false, describe: 'systemctl daemon-reload and enable --now the helper (needs systemd)' })
          .option('unit-dir', { type: 'string', default: '/etc/systemd/system', describe: 'where the helper unit goes' })
          .option('user-unit-dir', { type: 'string', describe: "where the daemon's user unit goes (default the owner's ~/.config/systemd/user)" }),
      (a) => install(a),
    )
    .demandCommand(1, 'name a system command: install');
}
