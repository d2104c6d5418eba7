/**
 * `banger update --from TARBALL|DIR`: stage and verify a release, swap `current` to it atomically (keeping the
 * one before), restart the daemon (its root helper child too; a helper service is restarted by systemctl), run
 * doctor against the new daemon and roll back on any FAIL. `--rollback` goes back by hand. VMs keep running:
 * the daemon stops without stopping them and the restarted one adopts them.
 */
import { existsSync, readlinkSync } from 'node:fs';
import { resolve } from 'node:path';
import { createInterface } from 'node:readline/promises';
import type { Argv, CommandModule } from 'yargs';
import { BangerError } from '../../errors.js';
import { layout, readDaemonPid, type Layout } from '../../paths.js';
import { installLayout, readRelease, runningPrefix, type InstallLayout, type ReleaseInfo } from '../../host/install/layout.js';
import { tryConnect } from '../connect.js';
import { out, usage, type GlobalArgs } from '../context.js';

interface UpdateArgs extends GlobalArgs {
  from?: string;
  prefix?: string;
  yes: boolean;
  rollback?: boolean;
  checkRelease: boolean;
}

export const progress = (step: string, detail: string): void => void process.stderr.write(`update: ${step}: ${detail}\n`);

export function prefixLayout(prefix: string | undefined): InstallLayout {
  const p = prefix ?? runningPrefix();
  if (!p) usage('this banger does not run from an installed release, so it cannot tell which install to change', 'pass --prefix (the one given to banger system install), or run PREFIX/bin/banger');
  return installLayout(p);
}

/** The release `current` points at. */
export function currentRelease(L: InstallLayout): ReleaseInfo & { dir: string } {
  const dir = existsSync(L.current) ? resolve(L.lib, readlinkSync(L.current)) : undefined;
  const info = dir ? readRelease(dir) : undefined;
  if (!dir || !info) throw new BangerError('usage', `no installed release under ${L.prefix} (${L.current} is missing or not a release)`, `sudo banger system install --prefix ${L.prefix}`);
  return { ...info, dir };
}

function requireRoot(what: string): void {
  if (process.getuid?.() !== 0) throw new BangerError('usage', `${what} changes root-owned files and needs root`, `sudo banger ${what}`);
}

async function stopDaemon(l: Layout): Promise<void> {
  const client = await tryConnect(l);
  if (!client) return;
  const pid = readDaemonPid(l);
  await client.call('daemon.stop', {}).catch(() => undefined);
  client.close();
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const alive = pid !== undefined && (() => { try { process.kill(pid, 0); return true; } catch { return false; } })();
    if (!alive && !(await tryConnect(l).then((c) => (c?.close(), !!c)))) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new BangerError('timeout', `the daemon (pid ${pid}) did not stop within 30 s`, 'banger daemon stop, then run the command again');
}

/** Restart the daemon from whatever `current` names now; a helper installed as a service is restarted too. */
async function restart(L: InstallLayout): Promise<void> {
  const { run } = await import('../../host/exec/runner.js');
  const { DAEMON_UNIT, HELPER_UNIT } = await import('../../roothelper/units.js');
  const systemd = existsSync('/run/systemd/system');
  // A daemon run by its user unit is restarted by systemd: stopping it by hand would race the unit's restart.
  const asUnit = systemd && (await run('systemctl', ['--user', 'is-active', '--quiet', DAEMON_UNIT], { reject: false })).exitCode === 0;
  if (!asUnit) await stopDaemon(layout());
  if (systemd && existsSync(`/etc/systemd/system/${HELPER_UNIT}`)) {
    await run('systemctl', ['try-restart', HELPER_UNIT]);
  }
  if (asUnit) await run('systemctl', ['--user', 'restart', DAEMON_UNIT], { timeoutMs: 60_000 });
  await run(process.execPath, [L.bin, 'daemon', 'start'], { timeoutMs: 60_000 });
}

interface Check { name: string; status: string; detail: string; fix?: string }

/** doctor against the new daemon, plus whether CLI and daemon run the release `current` names. */
async function newDaemonChecks(L: InstallLayout, want: ReleaseInfo): Promise<Check[]> {
  const { run } = await import('../../host/exec/runner.js');
  const doc = await run(process.execPath, [L.bin, '--json', 'doctor'], { reject: false, timeoutMs: 120_000 });
  let checks: Check[];
  try {
    checks = (JSON.parse(doc.stdout) as { checks: Check[] }).checks;
  } catch {
    return [{ name: 'doctor', status: 'fail', detail: `doctor did not answer: ${(doc.stdout + doc.stderr).trim().slice(0, 300)}` }];
  }
  const cli = (await run(process.execPath, [L.bin, '--version'], { reject: false })).stdout.trim();
  const st = await run(process.execPath, [L.bin, '--json', 'daemon', 'status'], { reject: false });
  const daemon = st.exitCode === 0 ? (JSON.parse(st.stdout) as { version: string; commit: string }) : undefined;
  const wantLine = `banger ${want.version} (${want.commit})`;
  const same = cli === wantLine && daemon?.version === want.version && daemon?.commit === want.commit;
  checks.push(same
    ? { name: 'version', status: 'ok', detail: `CLI and daemon run ${want.version} (${want.commit})` }
    : { name: 'version', status: 'fail', detail: `expected ${wantLine}; the CLI is ${cli || '?'}, the daemon ${daemon ? `${daemon.version} (${daemon.commit})` : 'not answering'}`, fix: 'banger daemon stop; banger daemon start (an old daemon keeps its version until restarted)' });
  return checks.filter((c) => c.status === 'fail');
}

/** Stop the daemon, put `previous` back as `current`, restore the store if the newer release migrated it, start. */
async function rollBack(L: InstallLayout): Promise<{ from?: string; to: ReleaseInfo; store: string }> {
  const { rollback } = await import('../../host/install/atomic.js');
  const { PREVIOUS_SUFFIX } = await import('../../host/install/layout.js');
  const { restoreStoreFor } = await import('../../host/install/store.js');
  await stopDaemon(layout());
  const r = await rollback(L.current, PREVIOUS_SUFFIX);
  if (!r.restored) throw new BangerError('usage', `nothing to roll back to: ${L.previous} does not exist (current is ${r.target ?? 'missing'})`, 'an update keeps the release before it; install one with banger update --from');
  const to = currentRelease(L);
  const s = await restoreStoreFor(layout().db, to.schemaVersion);
  await restart(L);
  return { from: r.from, to, store: s.restored ? `restored ${s.from}` : `kept (${s.why})` };
}

async function confirm(a: UpdateArgs, question: string): Promise<void> {
  if (a.yes) return;
  if (!process.stdin.isTTY) usage(`${question}: not confirmed (no terminal to ask on)`, 'pass --yes');
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  const answer = await rl.question(`${question} [y/N] `);
  rl.close();
  if (!/^y(es)?$/i.test(answer.trim())) throw new BangerError('usage', 'update cancelled', 'pass --yes to skip the question');
}

async function updateFrom(a: UpdateArgs, from: string): Promise<void> {
  const L = prefixLayout(a.prefix);
  requireRoot('update');
  const { assertRootOwnedPath } = await import('../../host/install/ownership.js');
  const { stageRelease } = await import('../../host/install/release.js');
  const { atomicReplace } = await import('../../host/install/atomic.js');
  const { PREVIOUS_SUFFIX } = await import('../../host/install/layout.js');
  await assertRootOwnedPath(L.lib);
  const before = currentRelease(L);
  await confirm(a, `update banger ${before.version} under ${L.prefix} from ${from}?`);
  progress('staging', `${from} under ${L.staging}`);
  const staged = await stageRelease(from, L, { seed: before.dir, env: process.env, log: (l) => progress('staging', l) });
  progress('swapping', `current -> releases/${staged.version}, previous -> releases/${before.version}`);
  await atomicReplace(L.current, `releases/${staged.version}`, PREVIOUS_SUFFIX);
  progress('restarting', 'the daemon (VMs keep running and are adopted)');
  await restart(L);
  progress('checking', `doctor against the ${staged.version} daemon`);
  const failed = await newDaemonChecks(L, staged);
  if (failed.length) {
    const names = failed.map((f) => `${f.name}: ${f.detail}`).join('; ');
    progress('rolling back', `FAIL ${names}`);
    const r = await rollBack(L);
    throw new BangerError('host', `banger ${staged.version} failed doctor after the restart (${names}); rolled back to ${r.to.version}, store ${r.store}`, `fix the release and update again; ${staged.dir} is kept for inspection`);
  }
  out(a, { from: before.version, to: staged.version, commit: staged.commit, release: staged.dir }, () => `updated banger ${before.version} -> ${staged.version} (${staged.commit}); ${before.version} kept for banger update --rollback`);
}

async function manualRollback(a: UpdateArgs): Promise<void> {
  const L = prefixLayout(a.prefix);
  requireRoot('update --rollback');
  const before = currentRelease(L);
  await confirm(a, `roll banger ${before.version} under ${L.prefix} back to the release before it?`);
  const r = await rollBack(L);
  out(a, { from: before.version, to: r.to.version, commit: r.to.commit, store: r.store }, () => `rolled back banger ${before.version} -> ${r.to.version} (${r.to.commit}); store ${r.store}`);
}

/** `banger update` alone: what is installed, and whether the CLI and the daemon run the same release. */
async function status(a: UpdateArgs): Promise<void> {
  const { buildInfo } = await import('../../version.js');
  const cli = buildInfo();
  const L = prefixLayout(a.prefix);
  const current = currentRelease(L);
  const previous = existsSync(L.previous) ? readRelease(resolve(L.lib, readlinkSync(L.previous))) : undefined;
  const client = await tryConnect(layout());
  const daemon = client ? await client.call('daemon.status', {}).finally(() => client.close()) : undefined;
  const mismatch = [
    cli.version !== current.version || cli.commit !== current.commit ? `this CLI is ${cli.version} (${cli.commit}) but current is ${current.version} (${current.commit}): run ${L.bin}` : undefined,
    daemon && (daemon.version !== current.version || daemon.commit !== current.commit) ? `the daemon runs ${daemon.version} (${daemon.commit}) but current is ${current.version} (${current.commit}): restart it (banger daemon stop; banger daemon start; VMs keep running)` : undefined,
  ].filter((m): m is string => !!m);
  const r = { prefix: L.prefix, current: `${current.version} (${current.commit})`, previous: previous ? `${previous.version} (${previous.commit})` : null, cli: `${cli.version} (${cli.commit})`, daemon: daemon ? `${daemon.version} (${daemon.commit})` : null, mismatch };
  out(a, r, () => [`installed ${r.current} under ${L.prefix}; previous ${r.previous ?? 'none'}`, `cli ${r.cli}; daemon ${r.daemon ?? 'not running'}`, ...mismatch.map((m) => `mismatch: ${m}`)].join('\n'));
  if (mismatch.length) process.exitCode = 1;
}

/** Run by a staged release on itself: the offline checks (no daemon, no network). */
async function checkRelease(a: UpdateArgs): Promise<void> {
  const { offlineChecks } = await import('../../host/install/selfcheck.js');
  const checks = offlineChecks(layout().db);
  const ok = checks.every((c) => c.status !== 'fail');
  out(a, { ok, checks }, () => checks.map((c) => `${c.status.padEnd(4)} ${c.name.padEnd(8)} ${c.detail}${c.fix ? ` (fix: ${c.fix})` : ''}`).join('\n'));
  if (!ok) process.exitCode = 1;
}

const describe = 'install a newer release (from a tarball made by npm pack, or a built directory) over the installed one, checked by doctor and rolled back on failure';

function builder(c: Argv<GlobalArgs>): Argv<UpdateArgs> {
  return c
    .option('from', { type: 'string', describe: 'the release: a tarball from npm pack, or a directory with a built dist/' })
    .option('prefix', { type: 'string', describe: 'the install prefix (default: the one this banger runs from)' })
    .option('yes', { type: 'boolean', default: false, describe: 'do not ask for confirmation' })
    .option('rollback', { type: 'boolean', describe: 'go back to the release before the current one' })
    .option('check-release', { type: 'boolean', default: false, hidden: true, describe: "run this release's offline checks (used on a staged release)" })
    .conflicts('rollback', 'from') as unknown as Argv<UpdateArgs>;
}

function handler(c: UpdateArgs): Promise<void> {
  if (c.checkRelease) return checkRelease(c);
  if (c.rollback) return manualRollback(c);
  if (!c.from) return status(c);
  return updateFrom(c, c.from);
}

export const updateCommand: CommandModule<GlobalArgs, UpdateArgs> = { command: 'update', describe, builder, handler };
