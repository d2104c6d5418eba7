/**
 * kill -9 anywhere loses nothing. The daemon (and, in tap mode, the root helper it runs as its child) is
 * SIGKILLed in every lifecycle state — creating, applyingWorkSeed, booting (before and after the VMM is
 * launched), running, stopping, reconfiguring, deleting — and in the middle of a workspace prepare and an
 * export. After each restart every VM settles in a state that says what happened, and nothing is orphaned:
 * no VMM process without a VM, no TAP or lease without a VM, no files of a deleted VM, no `.partial`,
 * `.bootstrap-*` or `.tmp-*` leftovers, the exact TAP count; deleting every VM leaves BANGER_HOME as it was.
 *
 * States that last milliseconds are held open with the daemon's test hook BANGER_TEST_STAGE_DELAY
 * (src/actors/fault-injection.ts). One user-mode VM is carried through all the kill points, one tap-mode VM
 * (in a network namespace this test makes) through the helper kills and the TAP accounting: three boots.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { execa } from 'execa';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { identifyProcess } from '../../src/host/exec/proc.js';
import { RpcClient } from '../../src/rpc/client.js';
import { Banger, describeE2E, pidAlive, vmmPidsFor, type CliResult } from './harness.js';
import { makeTestNetns, type TestNetns } from '../support/netns.js';

const DELAY_MS = 4000;
const STAGE_DELAYS = ['creating', 'applyingWorkSeed', 'booting', 'stopping', 'reconfiguring', 'deleting', 'prepare', 'export'].map((s) => `${s}:${DELAY_MS}`).join(',');
const POOL_SIZE = 2;
const SETTLED = ['running', 'stopped', 'failed'];
const killed: string[] = [];
const leaks: string[] = [];
let net: TestNetns | undefined;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Poll fn until it returns something other than undefined; fails naming `what` after timeoutMs. */
async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs: number, stepMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (e) {
      last = e;
    }
    await sleep(stepMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ''}`);
}

/** One RPC call on a fresh connection (fast enough to catch a state that lasts a few seconds). */
async function rpc(b: Banger, method: string, params: Record<string, unknown> = {}): Promise<any> {
  const c = await RpcClient.connect(join(b.runDir, 'daemon.sock'), 2000);
  try {
    return await c.call(method as never, params as never);
  } finally {
    c.close();
  }
}

const show = (b: Banger, vm: string) => rpc(b, 'vm.show', { vm });

/** SIGKILL a process and wait until it is gone: reaped, or a zombie whose threads have all exited. */
async function kill9(pid: number, what: string): Promise<void> {
  process.kill(pid, 'SIGKILL');
  await until(`${what} (pid ${pid}) to die`, async () => ((await identifyProcess(pid, () => true)).id === 'gone' ? true : undefined), 10_000, 50);
}

/**
 * Wait for `cond` (polled over RPC), then SIGKILL the daemon; the label is counted as a state killed.
 * `cmd`: the command that should bring the state about; if it ends first, the wait fails with its output.
 */
async function killDaemonWhen(b: Banger, label: string, cond: () => Promise<boolean>, cmd?: Promise<CliResult>, timeoutMs = 120_000): Promise<void> {
  let ended: CliResult | undefined;
  void cmd?.then((r) => (ended = r));
  try {
    await until(label, async () => {
      if (await cond()) return true;
      if (ended) throw new Error(`the command ended (exit ${ended.exitCode}) before ${label}: ${ended.stderr.trim()}`);
      return undefined;
    }, timeoutMs);
  } catch (e) {
    // what the daemon was doing instead: every VM's state and error, and its log
    const vms = await rpc(b, 'vm.list').then((l: any[]) => JSON.stringify(l.map((v) => [v.name, v.state, v.error])), (x: Error) => `vm.list failed: ${x.message}`);
    throw new Error(`${(e as Error).message}\nVMs: ${vms}\n--- daemon.log ---\n${logTail(b)}`);
  }
  await kill9(b.daemonPid()!, 'the daemon');
  killed.push(`daemon: ${label}`);
}

const inState = (b: Banger, vm: string, state: string) => async () => (await show(b, vm)).state === state;

/** The next command starts the daemon again; then wait until every VM has settled. */
async function restartAndSettle(b: Banger, timeoutMs = 300_000): Promise<any[]> {
  const r = await b.run(['vm', 'list'], { timeoutMs: 60_000 });
  if (r.exitCode !== 0) throw new Error(`the daemon did not start again: ${r.stderr.trim()}\n--- daemon.log ---\n${logTail(b)}`);
  return until('every VM to settle', async () => {
    const vms = await rpc(b, 'vm.list');
    return vms.every((v: any) => SETTLED.includes(v.state)) ? vms : undefined;
  }, timeoutMs, 250);
}

function logTail(b: Banger): string {
  try {
    return readFileSync(join(b.home, 'daemon.log'), 'utf8').split('\n').slice(-25).join('\n');
  } catch {
    return '(no daemon.log)';
  }
}

/** Files under BANGER_HOME, relative, without what a daemon churns or makes on first use. */
function homeListing(home: string, rel = ''): string[] {
  const out: string[] = [];
  for (const e of readdirSync(join(home, rel), { withFileTypes: true })) {
    const p = rel ? `${rel}/${e.name}` : e.name;
    if (!rel && (/^banger\.db/.test(e.name) || e.name === 'daemon.log' || e.name === 'keys')) continue;
    out.push(p);
    if (e.isDirectory() && p !== 'images/debian-bookworm') out.push(...homeListing(home, p));
  }
  return out.sort();
}

/** The runtime directory without the daemon's own files (sockets of VMs must not outlive them). */
const runListing = (b: Banger) => readdirSync(b.runDir).filter((f) => !/^daemon\./.test(f) && f !== 'roothelper.sock').sort();

function leftovers(home: string, rel = ''): string[] {
  const out: string[] = [];
  for (const e of readdirSync(join(home, rel), { withFileTypes: true })) {
    const p = rel ? `${rel}/${e.name}` : e.name;
    if (/\.partial$|\.bootstrap-|\.tmp-/.test(e.name)) out.push(p);
    else if (e.isDirectory()) out.push(...leftovers(home, p));
  }
  return out;
}

function dbLeases(home: string): { ip: string[]; tap: Array<{ tap: string; vmId: string | null }> } {
  const db = new Database(join(home, 'banger.db'), { readonly: true, fileMustExist: true });
  try {
    const ip = (db.prepare('SELECT vm_id FROM ip_leases').all() as Array<{ vm_id: string }>).map((r) => r.vm_id);
    const tap = (db.prepare('SELECT tap, vm_id FROM tap_leases').all() as Array<{ tap: string; vm_id: string | null }>).map((r) => ({ tap: r.tap, vmId: r.vm_id }));
    return { ip, tap };
  } finally {
    db.close();
  }
}

async function nsTaps(): Promise<string[]> {
  const r = await execa('ip', ['-n', net!.ns, '-j', 'link', 'show'], { reject: false });
  if (r.exitCode !== 0) return [];
  return (JSON.parse(r.stdout) as Array<{ ifname: string }>).map((l) => l.ifname).filter((n) => n.startsWith('bgtap')).sort();
}

/**
 * Everything that could be orphaned, after a restart: each finding is recorded as a leak (and fails the test
 * at the end). `everIds`: every VM id this test made, so that a VMM of a deleted VM is found too.
 */
async function audit(b: Banger, label: string, everIds: Set<string>, tap = false): Promise<void> {
  const found: string[] = [];
  const vms = (await rpc(b, 'vm.list')) as any[];
  const ids = new Set(vms.map((v) => v.id));
  const runningPids = new Set(vms.filter((v) => v.state === 'running').map((v) => v.pid));
  for (const pid of vmmPidsFor([...everIds])) if (!runningPids.has(pid)) found.push(`VMM pid ${pid} belongs to no running VM`);
  for (const v of vms) if (v.state === 'running' && !pidAlive(v.pid)) found.push(`${v.name} is running but its VMM pid ${v.pid} is gone`);
  for (const d of readdirSync(join(b.home, 'vms'))) if (!ids.has(d)) found.push(`vms/${d} belongs to no VM`);
  for (const f of leftovers(b.home)) found.push(`leftover ${f}`);
  const leases = dbLeases(b.home);
  for (const id of leases.ip) if (!ids.has(id)) found.push(`address lease of ${id}, which is not a VM`);
  for (const l of leases.tap) if (l.vmId && !ids.has(l.vmId)) found.push(`TAP ${l.tap} leased to ${l.vmId}, which is not a VM`);
  if (tap) found.push(...(await auditTaps(b, vms)));
  for (const f of found) leaks.push(`${label}: ${f}`);
  console.log(`crash: after ${label}: ${vms.map((v) => `${v.name}=${v.state}${v.pid ? `(pid ${v.pid})` : ''}`).join(' ') || 'no VMs'}; ${found.length} leak(s)`);
}

/** The TAP count is exact: one per tap VM plus the warm pool, and every device has its lease and vice versa. */
async function auditTaps(b: Banger, vms: any[]): Promise<string[]> {
  const tapVms = vms.filter((v) => v.net === 'tap').length;
  const want = tapVms + POOL_SIZE;
  await until('the root helper to be connected', async () => ((await rpc(b, 'daemon.status')).rootHelper?.state === 'connected' ? true : undefined), 30_000, 250);
  let devices: string[] = [];
  try {
    devices = await until(`${want} TAP devices`, async () => {
      const t = await nsTaps();
      return t.length === want ? t : undefined;
    }, 20_000, 250);
  } catch {
    devices = await nsTaps();
  }
  const out: string[] = [];
  if (devices.length !== want) out.push(`${devices.length} TAP devices where ${want} were expected (${devices.join(' ')})`);
  const leased = dbLeases(b.home).tap.map((l) => l.tap).sort();
  if (leased.join(' ') !== devices.join(' ')) out.push(`TAP devices [${devices.join(' ')}] differ from the leases [${leased.join(' ')}]`);
  return out;
}

function helperPid(b: Banger): number | undefined {
  const sock = join(b.runDir, 'roothelper.sock');
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const argv = readFileArgv(Number(p));
      if (argv.some((a) => /roothelper\/main\.[jt]s$/.test(a)) && argv.includes(sock) && pidAlive(Number(p))) return Number(p);
    } catch {
      /* raced */
    }
  }
  return undefined;
}

const readFileArgv = (pid: number) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');

async function killHelper(b: Banger, label: string): Promise<number> {
  const pid = await until('the root helper process', async () => helperPid(b), 30_000);
  await kill9(pid, 'the root helper');
  killed.push(`root helper: ${label}`);
  return pid;
}

const gitEnv = { ...process.env, GIT_AUTHOR_NAME: 'T', GIT_AUTHOR_EMAIL: 't@example.invalid', GIT_COMMITTER_NAME: 'T', GIT_COMMITTER_EMAIL: 't@example.invalid', GIT_CONFIG_GLOBAL: '/dev/null', GIT_CONFIG_NOSYSTEM: '1' };

async function makeRepo(root: string): Promise<string> {
  const dir = join(root, 'repo');
  mkdirSync(dir);
  const git = (...args: string[]) => execa('git', args, { cwd: dir, env: gitEnv });
  await git('init', '-q', '-b', 'main');
  writeFileSync(join(dir, 'README.md'), '# crash\n');
  for (let i = 0; i < 4; i++) writeFileSync(join(dir, `blob${i}.bin`), randomBytes(16 * 2 ** 20));
  await git('add', '-A');
  await git('commit', '-qm', 'one');
  return dir;
}

describeE2E('kill -9 anywhere loses nothing', () => {
  const t0 = Date.now();
  let tmp: string;
  const homes: Banger[] = [];
  beforeAll(() => {
    tmp = mkdtempSync('/tmp/bgcrash-');
  });
  afterAll(async () => {
    for (const b of homes) await b.cleanup();
    await net?.destroy();
    rmSync(tmp, { recursive: true, force: true });
    console.log(`crash: states killed (${killed.length}): ${killed.join('; ')}`);
    console.log(`crash: leaks found (${leaks.length})${leaks.length ? `: ${leaks.join('; ')}` : ''}`);
    console.log(`crash: wall time ${Math.round((Date.now() - t0) / 1000)} s`);
  });

  it('one user-mode VM through every state, the daemon SIGKILLed in each', async () => {
    const b = await Banger.create({ BANGER_TEST_STAGE_DELAY: STAGE_DELAYS });
    homes.push(b);
    await b.ok(['vm', 'list']);
    const before = homeListing(b.home);
    const runBefore = runListing(b);
    const repo = await makeRepo(tmp);
    const ever = new Set<string>();
    const settle = async (label: string) => {
      const vms = await restartAndSettle(b);
      await audit(b, label, ever);
      return vms;
    };
    const k = () => show(b, 'k');

    // creating → applyingWorkSeed → booting (before the VMM is launched): each kill, the next state follows
    const create = b.run(['vm', 'create', '--name', 'k'], { timeoutMs: 600_000 });
    await killDaemonWhen(b, 'creating', async () => {
      const v = await k();
      ever.add(v.id);
      return v.state === 'creating';
    }, create);
    await create;
    await b.ok(['vm', 'list']);
    await killDaemonWhen(b, 'applyingWorkSeed', inState(b, 'k', 'applyingWorkSeed'));
    await b.ok(['vm', 'list']);
    await killDaemonWhen(b, 'booting (VMM not launched yet)', inState(b, 'k', 'booting'));
    let vms = await settle('booting (VMM not launched yet)');
    expect(vms.map((v) => [v.name, v.state])).toEqual([['k', 'running']]);
    const pid = vms[0].pid as number;

    // running: adopted with the same VMM pid
    await killDaemonWhen(b, 'running', inState(b, 'k', 'running'));
    expect(pidAlive(pid)).toBe(true);
    vms = await settle('running');
    expect(vms.map((v) => [v.name, v.state, v.pid])).toEqual([['k', 'running', pid]]);

    // in the middle of a workspace prepare, then of an export: the VM stays adopted, the job fails clearly
    for (const [kind, args] of [
      ['prepare', ['vm', 'workspace', 'prepare', 'k', '--source', repo, '--guest-path', '/root/crash']],
      ['export', ['vm', 'workspace', 'export', 'k', '--guest-path', '/root/crash', '--output', join(tmp, 'out.patch')]],
    ] as const) {
      const job = b.run([...args], { timeoutMs: 120_000 });
      // prepare: past the hook's delay, while the repository streams into the guest; export: while the job runs
      const label = kind === 'prepare' ? 'running, mid prepare (streaming)' : 'running, export job in flight';
      await until(`a ${kind} job`, async () => ((await k()).workspace?.running === kind ? true : undefined), 60_000);
      if (kind === 'prepare') await sleep(DELAY_MS + 1500);
      await killDaemonWhen(b, label, async () => (await k()).workspace?.running === kind, job);
      const r = await job;
      expect(r.exitCode, `${kind} after the daemon died`).not.toBe(0);
      vms = await settle(`mid ${kind}`);
      expect(vms.map((v) => [v.name, v.state, v.pid])).toEqual([['k', 'running', pid]]);
      const logs = (await rpc(b, 'vm.logs', { vm: 'k' })) as Array<{ stage: string; status: string; message?: string }>;
      expect(logs.some((l) => l.stage === `workspace.${kind}` && l.status === 'error' && /daemon restarted/.test(l.message ?? ''))).toBe(true);
    }
    expect(existsSync(join(tmp, 'out.patch'))).toBe(false);
    expect(readdirSync(tmp).filter((f) => f !== 'repo')).toEqual([]);

    // stopping: the stop completes
    const stop = b.run(['vm', 'stop', 'k'], { timeoutMs: 120_000 });
    await killDaemonWhen(b, 'stopping', inState(b, 'k', 'stopping'), stop);
    await stop;
    vms = await settle('stopping');
    expect(vms.map((v) => [v.name, v.state])).toEqual([['k', 'stopped']]);
    expect(pidAlive(pid)).toBe(false);

    // reconfiguring (vm set --disk): the resize is applied
    const grown = vms[0].diskBytes + 2 ** 30;
    const set = b.run(['vm', 'set', 'k', '--disk', String(grown)], { timeoutMs: 120_000 });
    await killDaemonWhen(b, 'reconfiguring', inState(b, 'k', 'reconfiguring'), set);
    await set;
    vms = await settle('reconfiguring');
    expect(vms.map((v) => [v.name, v.state, v.diskBytes, v.error])).toEqual([['k', 'stopped', grown, null]]);

    // booting after the VMM has been launched: the boot completes with one VMM
    const start = b.run(['vm', 'start', 'k'], { timeoutMs: 600_000 });
    await killDaemonWhen(b, 'booting (VMM launched)', async () => (await k()).state === 'booting' && vmmPidsFor([...ever]).length > 0, start, 180_000);
    await start;
    vms = await settle('booting (VMM launched)');
    expect(vms.map((v) => [v.name, v.state])).toEqual([['k', 'running']]);
    expect(vmmPidsFor([...ever])).toEqual([vms[0].pid]);

    // deleting: the delete completes
    const del = b.run(['vm', 'delete', 'k'], { timeoutMs: 120_000 });
    await killDaemonWhen(b, 'deleting', inState(b, 'k', 'deleting'), del);
    await del;
    vms = await settle('deleting');
    expect(vms).toEqual([]);
    expect(homeListing(b.home)).toEqual(before);
    expect(runListing(b)).toEqual(runBefore);
    expect(leaks).toEqual([]);
  });

  it.skipIf(process.getuid?.() !== 0)('one tap-mode VM: the root helper and the daemon SIGKILLed; TAPs and leases stay exact', async () => {
    net = await makeTestNetns('bgc');
    const b = await Banger.create({ BANGER_ROOT_HELPER: '', BANGER_TEST_STAGE_DELAY: `creating:${DELAY_MS},deleting:${DELAY_MS}` });
    homes.push(b);
    b.wrap = net.wrap;
    await b.ok(['vm', 'list']);
    const before = homeListing(b.home);
    const runBefore = runListing(b);
    const ever = new Set<string>();
    const t = () => show(b, 't');
    const leaseOf = async (id: string) => ((await rpc(b, 'daemon.status')).tapPool ?? []).some((l: any) => l.vmId === id);

    // creating: the helper dies before the TAP lease (the lease waits for a new helper), then the daemon
    // dies once the lease is made but before the VM has recorded its TAP
    const create = b.run(['vm', 'create', '--net', 'tap', '--name', 't'], { timeoutMs: 600_000 });
    await until('vm t to be creating', async () => ((await t()).state === 'creating' ? true : undefined), 60_000);
    const id = (await t()).id as string;
    ever.add(id);
    await killHelper(b, 'creating, before the TAP lease');
    await killDaemonWhen(b, 'creating, TAP leased', async () => (await leaseOf(id)) && (await t()).state === 'creating', create, 60_000);
    await create;
    let vms = await restartAndSettle(b);
    await audit(b, 'tap VM: creating, TAP leased', ever, true);
    expect(vms.map((v) => [v.name, v.state])).toEqual([['t', 'running']]);
    const pid = vms[0].pid as number;
    expect((await b.run(['vm', 'ssh', 't', '--', 'true'])).exitCode).toBe(0);

    // running: the helper alone dies (a new one is started), then the daemon and the helper together
    const old = await killHelper(b, 'running');
    await until('a new root helper', async () => {
      await rpc(b, 'daemon.status');
      const p = helperPid(b);
      return p && p !== old ? p : undefined;
    }, 60_000, 500);
    await audit(b, 'tap VM: helper killed while running', ever, true);
    await killHelper(b, 'running, with the daemon');
    await kill9(b.daemonPid()!, 'the daemon');
    killed.push('daemon: running (tap), with the helper');
    vms = await restartAndSettle(b);
    await audit(b, 'tap VM: daemon and helper killed while running', ever, true);
    expect(vms.map((v) => [v.name, v.state, v.pid])).toEqual([['t', 'running', pid]]);
    expect((await b.run(['vm', 'ssh', 't', '--', 'true'])).exitCode).toBe(0);

    // deleting: the helper dies before the TAP is released, then the daemon; the delete completes
    const del = b.run(['vm', 'delete', 't'], { timeoutMs: 120_000 });
    await until('vm t to be deleting', async () => ((await t()).state === 'deleting' ? true : undefined), 60_000);
    await killHelper(b, 'deleting');
    await killDaemonWhen(b, 'deleting (tap)', inState(b, 't', 'deleting'), del);
    await del;
    vms = await restartAndSettle(b);
    await audit(b, 'tap VM: deleting', ever, true);
    expect(vms).toEqual([]);
    expect(homeListing(b.home)).toEqual(before);
    expect(runListing(b)).toEqual(runBefore);
    expect(leaks).toEqual([]);
  });
});
