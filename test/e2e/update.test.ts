/**
 * Install, update and roll back a real release: tarballs made by `npm pack` of copies of this checkout (the
 * second with a bumped version; a third, "bad", one whose root helper cannot start, so the new daemon's doctor
 * FAILs its root-helper check), installed into a root-owned temp prefix, with ONE guest running throughout:
 * it must keep its VMM pid across every update, rollback and SIGKILLed updater. No systemd here: the daemon is
 * the one the CLI starts (as root, with its root helper as a child).
 */
import { execa, execaSync } from 'execa';
import { chmodSync, chownSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { Banger, describeE2E, pidAlive } from './harness.js';

const REPO = join(import.meta.dirname, '..', '..');
const VERSION: string = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')).version;
const bump = (v: string, by: number) => v.replace(/^(\d+)\.(\d+)\.(\d+).*$/, (_m, a, b, c) => `${a}.${b}.${Number(c) + by}`);
const V1 = VERSION;
const V2 = bump(VERSION, 1);
const BAD = bump(VERSION, 2);

/** npm pack of a copy of the checkout (so the checkout's own dist/ is never rebuilt under other users) at `version`. */
async function pack(work: string, version: string): Promise<string> {
  const copy = mkdtempSync(join(work, 'src-'));
  for (const f of ['bin', 'scripts', 'src', 'tsconfig.json', 'tsconfig.build.json', 'README.md']) cpSync(join(REPO, f), join(copy, f), { recursive: true });
  const pkg = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8'));
  writeFileSync(join(copy, 'package.json'), JSON.stringify({ ...pkg, version }, null, 2));
  symlinkSync(join(REPO, 'node_modules'), join(copy, 'node_modules'));
  const dest = mkdtempSync(join(work, 'tgz-'));
  await execa('npm', ['pack', '--pack-destination', dest], { cwd: copy, env: { BANGER_COMMIT: `e2e${version.replace(/\D/g, '')}` }, timeout: 300_000 });
  const tgz = readdirSync(dest).filter((f) => f.endsWith('.tgz'));
  expect(tgz).toEqual([`banger-${version}.tgz`]);
  return join(dest, tgz[0]);
}

/** The V2 tarball relabelled BAD and missing a module its root helper imports (a packaging bug doctor must catch). */
async function breakHelper(work: string, good: string): Promise<string> {
  const dir = mkdtempSync(join(work, 'bad-'));
  await execa('tar', ['-xzf', good, '-C', dir]);
  for (const f of ['package.json', 'dist/build-info.json']) {
    const p = join(dir, 'package', f);
    writeFileSync(p, JSON.stringify({ ...JSON.parse(readFileSync(p, 'utf8')), version: BAD }, null, 2));
  }
  rmSync(join(dir, 'package', 'dist', 'roothelper', 'server.js'));
  const out = join(dir, `banger-${BAD}.tgz`);
  await execa('tar', ['-czf', out, '-C', dir, 'package']);
  return out;
}

describeE2E('install, update and roll back a release', () => {
  let b: Banger;
  let work: string;
  let prefix: string;
  let tgz: { v1: string; v2: string; bad: string };
  let vmPid: number;
  const lib = () => join(prefix, 'lib', 'banger');
  const bin = () => join(prefix, 'bin', 'banger');
  const cli = async (args: string[], timeout = 600_000) => {
    const r = await execa(process.execPath, [bin(), ...args], { env: b.env, reject: false, timeout });
    return { exitCode: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr) };
  };
  const ok = async (args: string[]) => {
    const r = await cli(args);
    if (r.exitCode !== 0) throw new Error(`banger ${args.join(' ')} exited ${r.exitCode}\n${r.stdout}\n${r.stderr}`);
    return r;
  };
  const currentVersion = () => readlinkSync(join(lib(), 'current'));
  const daemonVersion = async () => JSON.parse((await ok(['--json', 'daemon', 'status'])).stdout).version as string;
  const theVm = async () => (JSON.parse((await ok(['--json', 'vm', 'list'])).stdout) as Array<{ name: string; state: string; pid: number | null }>).find((v) => v.name === 'kept');

  /** `current` names a whole release: its package, compiled entry points and native module, and it runs. */
  async function expectConsistent(): Promise<string> {
    const target = currentVersion();
    expect(target).toMatch(/^releases\/\d+\.\d+\.\d+$/);
    const dir = resolve(lib(), target);
    for (const f of ['package.json', 'bin/banger.js', 'dist/cli/main.js', 'dist/roothelper/main.js', 'dist/build-info.json', 'node_modules/better-sqlite3/build/Release/better_sqlite3.node']) expect(existsSync(join(dir, f)), `${target}/${f}`).toBe(true);
    const version = target.slice('releases/'.length);
    expect((await ok(['--version'])).stdout.trim()).toMatch(new RegExp(`^banger ${version.replace(/\./g, '\\.')} \\(e2e`));
    return version;
  }

  async function expectVmKept(): Promise<void> {
    const vm = await theVm();
    expect(vm?.state).toBe('running');
    expect(vm?.pid).toBe(vmPid);
    expect(pidAlive(vmPid)).toBe(true);
  }

  beforeAll(async () => {
    b = await Banger.create();
    delete b.env.BANGER_ROOT_HELPER; // a root daemon runs the release's own root helper as its child
    b.env.BANGER_BOOT_TIMEOUT_MS = '480000'; // one TCG guest on a loaded 2-core machine: still bounded
    work = mkdtempSync('/var/tmp/banger-update-e2e-'); // root-owned 0700 under a root-owned sticky /var/tmp
    prefix = join(work, 'prefix');
    const v1 = await pack(work, V1);
    const v2 = await pack(work, V2);
    tgz = { v1, v2, bad: await breakHelper(work, v2) };
  }, 900_000);

  afterAll(async () => {
    await b?.cleanup();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 300_000);

  it('refuses a prefix a non-root user can write to, naming the directory', async () => {
    const open = join(work, 'users-dir');
    mkdirSync(open);
    chownSync(open, 65534, 65534);
    const r = await b.run(['system', 'install', '--from', tgz.v1, '--prefix', join(open, 'p'), '--unit-dir', join(work, 'units')]);
    expect(r.exitCode).toBe(2);
    expect(r.stderr).toContain(`${open} is not safe for code that runs as root (it is owned by uid 65534, not root)`);
    chownSync(open, 0, 0);
    chmodSync(open, 0o777);
    const w = await b.run(['system', 'install', '--from', tgz.v1, '--prefix', join(open, 'p'), '--unit-dir', join(work, 'units')]);
    expect(w.exitCode).toBe(2);
    expect(w.stderr).toContain(`${open} is not safe for code that runs as root (it is writable by every user (mode 777))`);
    expect(existsSync(join(open, 'p'))).toBe(false);
  }, 120_000);

  it('installs a release from a tarball: releases/<version>, current, bin/banger, units that run from there', async () => {
    const r = await b.ok(['--json', 'system', 'install', '--from', tgz.v1, '--prefix', prefix, '--unit-dir', join(work, 'units'), '--user-unit-dir', join(work, 'user-units')], { timeoutMs: 900_000 });
    const res = JSON.parse(r.stdout);
    expect(res).toMatchObject({ version: V1, owner: 'root', group: 'root', systemd: false, enabled: false });
    expect(currentVersion()).toBe(`releases/${V1}`);
    expect(readlinkSync(bin())).toBe('../lib/banger/current/bin/banger.js');
    expect(await expectConsistent()).toBe(V1);
    const helperUnit = readFileSync(join(work, 'units', 'banger-roothelper.service'), 'utf8');
    expect(helperUnit).toContain(`ExecStart=${process.execPath} ${join(lib(), 'current', 'dist', 'roothelper', 'main.js')} --config ${join(lib(), 'roothelper.json')}`);
    expect(helperUnit).not.toContain('tsx');
    expect(readFileSync(join(work, 'user-units', 'banger.service'), 'utf8')).toContain(`${join(lib(), 'current', 'bin', 'banger.js')} daemon start --foreground`);
    expect(JSON.parse(readFileSync(join(lib(), 'roothelper.json'), 'utf8'))).toMatchObject({ bridge: 'banger0', owners: [{ name: 'root', uid: 0, gid: 0 }] });
    for (const f of [lib(), join(lib(), 'releases', V1), join(lib(), 'releases', V1, 'dist', 'cli', 'main.js')]) {
      expect(execaSync('stat', ['-c', '%u %A', f]).stdout).toMatch(/^0 .....-..-.$/); // root's, nobody else writes
    }
  }, 900_000);

  it('updates with a VM running: the version switches and the VM is adopted with its VMM pid', async () => {
    await ok(['vm', 'create', '--name', 'kept']);
    const vm = await theVm();
    expect(vm?.state).toBe('running');
    vmPid = vm!.pid!;
    expect(await daemonVersion()).toBe(V1);
    const r = await cli(['update', '--from', tgz.v2, '--yes']);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stderr).toContain('update: checking: doctor against');
    expect(currentVersion()).toBe(`releases/${V2}`);
    expect(readlinkSync(join(lib(), 'current.previous'))).toBe(`releases/${V1}`);
    expect(await daemonVersion()).toBe(V2);
    await expectVmKept();
  }, 900_000);

  it('a release whose new daemon fails doctor is rolled back: non-zero exit naming the check, the old version serves, the VM runs', async () => {
    const r = await cli(['update', '--from', tgz.bad, '--yes']);
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`banger ${BAD.replace(/\./g, '\\.')} failed doctor after the restart \\(root-helper: not reachable`));
    expect(r.stderr).toContain(`rolled back to ${V2}`);
    expect(currentVersion()).toBe(`releases/${V2}`);
    expect(await daemonVersion()).toBe(V2);
    expect(JSON.parse((await ok(['--json', 'doctor'])).stdout).checks.find((c: { name: string }) => c.name === 'root-helper').status).toBe('ok');
    await expectVmKept();
  }, 900_000);

  it('update --rollback goes back by hand; with nothing left to roll back to it says so', async () => {
    // the failed update's rollback consumed `current.previous`
    const none = await cli(['update', '--rollback', '--yes']);
    expect(none.exitCode).toBe(2);
    expect(none.stderr).toContain(`nothing to roll back to: ${join(lib(), 'current.previous')} does not exist`);
    expect(currentVersion()).toBe(`releases/${V2}`);
    const r = await ok(['--json', 'update', '--from', tgz.v1, '--yes']);
    expect(JSON.parse(r.stdout)).toMatchObject({ from: V2, to: V1 });
    const back = await ok(['--json', 'update', '--rollback', '--yes']);
    expect(JSON.parse(back.stdout)).toMatchObject({ from: V1, to: V2 });
    expect(currentVersion()).toBe(`releases/${V2}`);
    expect(await daemonVersion()).toBe(V2);
    await expectVmKept();
  }, 900_000);

  for (const step of ['staging', 'swapping', 'restarting', 'checking']) {
    it(`SIGKILL of the updater while ${step}: the next command finds current at a whole release, and the VM kept`, async () => {
      const from = currentVersion() === `releases/${V1}` ? tgz.v2 : tgz.v1;
      const child = execa(process.execPath, [bin(), 'update', '--from', from, '--yes'], { env: b.env, reject: false, timeout: 600_000 });
      let killed = false;
      child.stderr!.on('data', (d: Buffer) => {
        if (!killed && d.toString().includes(`update: ${step}:`)) {
          killed = true;
          child.kill('SIGKILL');
        }
      });
      const r = await child;
      expect(killed, `never saw the ${step} step: ${r.stderr}`).toBe(true);
      expect(r.signal).toBe('SIGKILL');
      await expectConsistent();
      await expectVmKept(); // the next command (it starts the daemon if the kill left none)
    }, 900_000);
  }

  it('after the kills an update still completes (leftover staging is cleared)', async () => {
    const from = currentVersion() === `releases/${V1}` ? tgz.v2 : tgz.v1;
    await ok(['update', '--from', from, '--yes']);
    expect(readdirSync(join(lib(), 'staging'))).toEqual([]);
    await expectConsistent();
    await expectVmKept();
  }, 900_000);
});
