/**
 * npm run bench [-- --only disk,tap,create,sizes,workspace,prepare,cache,local,vmm,fc,cli,snapshot,sessions] [--runs N]
 * Prints medians, ratios and durations; nothing here is asserted. Boots real guests (create, workspace): on TCG
 * each boot costs ~15 s or more. local, vmm and fc measure what the test suite no longer bounds (bench/timings.ts).
 */
import { execa } from 'execa';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync, readdirSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { createConnection } from 'node:net';
import { once } from 'node:events';
import { createWorkDisk } from '../src/host/disk/disks.js';
import { workDiskFromTemplate } from '../src/host/disk/work-disk-template.js';
import { generateHostKey } from '../src/host/guest/keys.js';
import { imageHome as testImageHome, TEST_IMAGE } from '../test/e2e/image-cache.js';
import { benchFirecrackerFake, benchLocalWorkspace, benchVmmTimings } from './timings.js';
import { benchCli } from './cli.js';
import { benchSnapshots } from './snapshots.js';
import { RpcClient } from '../src/rpc/client.js';
import { shellQuote } from '../src/host/exec/shell.js';

const BIN = join(import.meta.dirname, '..', 'bin', 'banger.js');
const args = process.argv.slice(2);
const only = (args[args.indexOf('--only') + 1] ?? '').split(',').filter(Boolean);
const runs = Number(args.includes('--runs') ? args[args.indexOf('--runs') + 1] : 3);
const want = (s: string) => !args.includes('--only') || only.includes(s);

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? (s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2) : NaN;
};
const ms = (n: number) => (n >= 1000 ? `${(n / 1000).toFixed(2)} s` : `${n.toFixed(1)} ms`);
const line = (k: string, v: string) => console.log(`  ${k.padEnd(48)} ${v}`);

/** The e2e tests' image cache ($BANGER_TEST_CACHE, else the checkout's .cache/e2e). */
const imageHome = testImageHome();

/** The home's config without its warm pool. */
function withoutWarmPool(h: string): void {
  const file = join(h, 'config.json');
  if (!existsSync(file)) return;
  const { warmPool: _, ...rest } = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
  writeFileSync(file, JSON.stringify(rest));
}

/** The home's VMs once none is in a state that takes neither stop nor delete (creating, a delete under way). */
async function settledVms(banger: (a: string[]) => Promise<{ exitCode?: number; stdout: string }>): Promise<Array<{ id: string; state: string }>> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const r = await banger(['--json', 'vm', 'list']);
    const vms = r.exitCode === 0 ? (JSON.parse(r.stdout || '[]') as Array<{ id: string; state: string }>) : [];
    const transient = vms.filter((v) => ['creating', 'applyingWorkSeed', 'deleting', 'stopping', 'snapshotting'].includes(v.state));
    if (!transient.length || Date.now() > deadline) return vms.filter((v) => v.state !== 'deleting' && v.state !== 'deleted');
    await new Promise((res) => setTimeout(res, 1000));
  }
}

async function home(extra: Record<string, string> = {}) {
  const h = mkdtempSync(join(tmpdir(), 'bgb-'));
  const run = mkdtempSync('/tmp/bgbr-');
  mkdirSync(join(h, 'images'), { recursive: true });
  // Under TCG on a loaded host a boot can take minutes: the bench measures, it does not judge boot time.
  writeFileSync(join(h, 'config.json'), JSON.stringify({ bootTimeoutMs: 900_000 }));
  const src = join(imageHome, 'images', 'debian-bookworm');
  if (existsSync(src)) await execa('cp', ['-al', src, join(h, 'images', 'debian-bookworm')]).catch(() => execa('cp', ['-a', src, join(h, 'images')]));
  const env = { ...process.env, BANGER_HOME: h, BANGER_RUNTIME_DIR: run, NO_COLOR: '1', BANGER_ROOT_HELPER: 'off', ...extra } as Record<string, string>;
  const cli = async (a: string[], wrap: string[] = []) => {
    const [file, ...pre] = wrap.length ? [...wrap, process.execPath] : [process.execPath];
    const r = await execa(file, [...pre, BIN, '--json', ...a], { env, reject: false, timeout: 900_000 });
    if (r.exitCode !== 0) throw new Error(`banger ${a.join(' ')}: ${r.stderr}`);
    return r.stdout ? JSON.parse(r.stdout) : null;
  };
  const cleanup = async () => {
    // VMs outlive their daemon by design: delete every one before the home goes, or their VMMs are orphaned.
    const banger = (a: string[], timeout = 60_000) => execa(process.execPath, [BIN, ...a], { env, reject: false, timeout });
    // A warm pool would make new VMs while these are deleted: the daemon restarts without it.
    await banger(['daemon', 'stop']);
    withoutWarmPool(h);
    const vms = await settledVms(banger);
    const booting = vms.filter((v) => v.state === 'booting' || v.state === 'restoring').map((v) => v.id);
    if (booting.length) await banger(['vm', 'stop', ...booting], 300_000);
    if (vms.length) await banger(['vm', 'delete', ...vms.map((v) => v.id)], 300_000);
    await banger(['daemon', 'stop']);
    rmSync(h, { recursive: true, force: true });
    rmSync(run, { recursive: true, force: true });
  };
  return { h, run, env, cli, cleanup };
}

async function benchDisk() {
  console.log('work disk creation (truncate + lazy mkfs.ext4 + debugfs seed), 1 GiB vs 64 GiB');
  const dir = mkdtempSync(join(tmpdir(), 'bgb-disk-'));
  const seed = join(dir, 'seed.ext4');
  const tree = join(dir, 'tree');
  mkdirSync(join(tree, '.ssh'), { recursive: true });
  writeFileSync(join(tree, '.bashrc'), '# bashrc\n');
  writeFileSync(join(tree, '.profile'), '# profile\n');
  await execa('mkfs.ext4', ['-F', '-q', '-d', tree, seed, '16M']);
  const t: Record<string, number[]> = { '1G': [], '64G': [] };
  for (let i = 0; i < Math.max(5, runs); i++) {
    for (const [k, size] of [['1G', 2 ** 30], ['64G', 64 * 2 ** 30]] as const) {
      const p = join(dir, `w-${k}-${i}.ext4`);
      const t0 = performance.now();
      await createWorkDisk(p, { sizeBytes: size, seedImage: seed, authorizedKeys: 'ssh-ed25519 AAAA bench\n' });
      t[k].push(performance.now() - t0);
      rmSync(p, { force: true });
    }
  }
  line('1 GiB (median)', ms(median(t['1G'])));
  line('64 GiB (median)', ms(median(t['64G'])));
  line('ratio 64 GiB / 1 GiB (should be near 1)', (median(t['64G']) / median(t['1G'])).toFixed(2));
  await benchWorkDiskTemplate(dir, seed);
  rmSync(dir, { recursive: true, force: true });
}

/** A VM's work disk fresh (mkfs + seed) against a clone of the image's template, interleaved; host keys likewise. */
async function benchWorkDiskTemplate(dir: string, seed: string) {
  console.log('work disk of a create: fresh vs template clone (1 GiB); host key: ssh-keygen vs in-process');
  const t: Record<string, number[]> = { fresh: [], clone: [], keygen: [], inproc: [] };
  const common = { sizeBytes: 2 ** 30, seedImage: seed, authorizedKeys: 'ssh-ed25519 AAAA bench\n', gitIdentity: { name: 'b', email: 'b@x.invalid' } };
  await workDiskFromTemplate(join(dir, 'warm.ext4'), { ...common, templateDir: join(dir, 'tpl') }); // the first one makes the template
  for (let i = 0; i < Math.max(5, runs); i++) {
    const timed = async (k: string, fn: () => Promise<unknown>) => {
      const t0 = performance.now();
      await fn();
      t[k].push(performance.now() - t0);
    };
    await timed('fresh', () => createWorkDisk(join(dir, `f${i}.ext4`), common));
    await timed('clone', () => workDiskFromTemplate(join(dir, `c${i}.ext4`), { ...common, templateDir: join(dir, 'tpl') }));
    await timed('keygen', () => execa('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, `k${i}`)]));
    await timed('inproc', async () => generateHostKey({ comment: 'bench' }));
    for (const f of [`f${i}.ext4`, `c${i}.ext4`, `c${i}.ext4.cow`, `k${i}`, `k${i}.pub`]) rmSync(join(dir, f), { force: true });
  }
  line('work disk fresh (median)', ms(median(t.fresh)));
  line('work disk template clone (median)', ms(median(t.clone)));
  line('ratio fresh / clone', (median(t.fresh) / median(t.clone)).toFixed(1));
  line('host key ssh-keygen | in-process (median)', `${ms(median(t.keygen))} | ${ms(median(t.inproc))}`);
}

async function benchTap() {
  console.log('TAP lease: warm (from the pool) vs cold (created through the root helper), in a test namespace');
  if (process.getuid?.() !== 0) return line('skipped', 'needs root');
  const ns = `bgb${randomBytes(3).toString('hex')}`;
  await execa('ip', ['netns', 'add', ns]);
  const b = await home({ BANGER_ROOT_HELPER: '' });
  try {
    const wrap = ['ip', 'netns', 'exec', ns];
    await b.cli(['daemon', 'status'], wrap);
    // Drive the pool and the helper directly through a scratch daemon module (same code as the daemon).
    const { RootHelper } = await import('../src/actors/root-helper.js');
    const { TapPool } = await import('../src/actors/tap-pool.js');
    const { openDb } = await import('../src/store/db.js');
    void RootHelper;
    void TapPool;
    void openDb;
    const socket = join(b.run, 'roothelper.sock');
    const { RootHelperClient } = await import('../src/roothelper/client.js');
    const deadline = Date.now() + 20_000;
    while (!existsSync(socket) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    const client = await RootHelperClient.connect(socket);
    await client.request('bridge.ensure', {});
    const { tag } = (await client.request('ping', {})).owner; // the helper takes only TAP names with its owner's tag
    const cold: number[] = [];
    for (let i = 0; i < Math.max(10, runs); i++) {
      const name = `bgtap${tag}${i.toString(36)}${randomBytes(2).toString('hex')}`.slice(0, 15);
      const t0 = performance.now();
      await client.request('tap.create', { name });
      cold.push(performance.now() - t0);
      await client.request('tap.delete', { name });
    }
    // warm: the pool hands out an existing idle device (one SQLite update + a refill in the background)
    const db = openDb(join(b.h, 'bench-pool.db'));
    const helper = { request: (v: string, a: Record<string, unknown>) => client.request(v as never, a as never) } as never;
    const pool = new TapPool(db, helper, { size: 12, log: () => {} });
    await pool.refill();
    const warm: number[] = [];
    for (let i = 0; i < 10; i++) {
      const t0 = performance.now();
      const l = await pool.lease(`vm${i}`);
      warm.push(performance.now() - t0);
      if (!l.warm) throw new Error('expected a warm lease');
    }
    pool.stop();
    for (const l of pool.leases()) await client.request('tap.delete', { name: l.tap });
    client.close();
    line('cold tap.create through the helper (median)', ms(median(cold)));
    line('warm lease from the pool (median)', ms(median(warm)));
    line('ratio cold / warm', (median(cold) / median(warm)).toFixed(1));
  } finally {
    await b.cleanup();
    await execa('sh', ['-c', `ip netns pids ${ns} | xargs -r kill -9`], { reject: false });
    await execa('ip', ['netns', 'del', ns], { reject: false });
  }
}

async function benchCreate() {
  console.log(`create → SSH answering, by stage, ${runs} run(s) (QEMU, user networking)`);
  const b = await home();
  try {
    const per: Record<string, number[]> = {};
    const total: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      const vm = await b.cli(['vm', 'create', '--name', `b${i}`]);
      total.push(performance.now() - t0);
      const logs = (await b.cli(['vm', 'logs', vm.id])) as Array<{ stage: string; status: string; durationMs: number | null }>;
      for (const r of logs) if (r.status === 'done' && r.durationMs !== null) (per[r.stage] ??= []).push(r.durationMs);
      await b.cli(['vm', 'delete', vm.id]);
    }
    for (const [k, v] of Object.entries(per)) line(`${k} (median)`, ms(median(v)));
    line('create → running, CLI wall clock (median)', ms(median(total)));
  } finally {
    await b.cleanup();
  }
}

/** A copy of the test image whose rootfs is grown to `bytes` (sparse, resize2fs): same contents, bigger disk. */
async function grownImage(h: string, name: string, bytes: number) {
  const src = join(h, 'images', 'debian-bookworm');
  const dst = join(h, 'images', name);
  await execa('cp', ['-al', src, dst]);
  const rootfs = join(dst, 'rootfs.ext4');
  await execa('cp', ['--sparse=always', join(src, 'rootfs.ext4'), `${rootfs}.new`]);
  await execa('mv', [`${rootfs}.new`, rootfs]);
  await execa('truncate', ['-s', String(bytes), rootfs]);
  await execa('e2fsck', ['-fp', rootfs], { reject: false });
  await execa('resize2fs', [rootfs]);
  const manifestPath = join(dst, 'manifest.json');
  const m = JSON.parse(readFileSync(manifestPath, 'utf8'));
  rmSync(manifestPath);
  writeFileSync(manifestPath, JSON.stringify({ ...m, name, files: { ...m.files, 'rootfs.ext4': bytes } }, null, 2));
}

/** The host's stages of a create (vm create --no-start: no boot), 1 GiB vs 8 GiB image, from the lifecycle log. */
async function benchCreateSizes() {
  console.log(`the host's stages of a create (--no-start), image rootfs 1 GiB vs 8 GiB, ${runs} run(s) each`);
  const b = await home();
  try {
    await grownImage(b.h, 'bookworm-8g', 8 * 2 ** 30);
    const sums: Record<string, number[]> = {};
    const walls: Record<string, number[]> = {};
    const per: Record<string, Record<string, number[]>> = {};
    for (const [label, image] of [['1 GiB', 'debian-bookworm'], ['8 GiB', 'bookworm-8g']] as const) {
      for (let i = 0; i < runs + 1; i++) {
        const vm = await b.cli(['vm', 'create', '--no-start', '--image', image, '--name', `s${i}`]);
        const logs = (await b.cli(['vm', 'logs', vm.id])) as Array<{ time: string; stage: string; status: string; durationMs: number | null }>;
        await b.cli(['vm', 'delete', vm.id]);
        if (i === 0) continue; // the first create of an image also makes its root overlay and work disk templates
        const done = logs.filter((r) => r.status === 'done' && r.durationMs !== null);
        for (const r of done) ((per[label] ??= {})[r.stage] ??= []).push(r.durationMs!);
        (sums[label] ??= []).push(done.reduce((a, r) => a + r.durationMs!, 0));
        // Wall clock from the first stage's start to the work disk's end: the stages plus what lies between them
        // (state persisted, steps started). Everything a create does before the VMM would be launched.
        const first = logs.find((r) => r.status === 'start');
        const last = [...logs].reverse().find((r) => r.stage === 'workDisk' && r.status === 'done');
        if (first && last) (walls[label] ??= []).push(Date.parse(last.time) - Date.parse(first.time));
      }
    }
    for (const stageName of Object.keys(per['1 GiB'] ?? {})) {
      line(`${stageName} (median) 1 GiB | 8 GiB`, `${ms(median(per['1 GiB'][stageName]))} | ${ms(median(per['8 GiB']?.[stageName] ?? []))}`);
    }
    line('sum of the host stages (median) 1 GiB | 8 GiB', `${ms(median(sums['1 GiB']))} | ${ms(median(sums['8 GiB']))}`);
    line('wall, first stage → work disk done (median) 1 | 8 GiB', `${ms(median(walls['1 GiB'] ?? []))} | ${ms(median(walls['8 GiB'] ?? []))}`);
    line('ratio 8 GiB / 1 GiB, sum (goal: about 1)', (median(sums['8 GiB']) / median(sums['1 GiB'])).toFixed(2));
    line('ratio 8 GiB / 1 GiB, wall', (median(walls['8 GiB'] ?? []) / median(walls['1 GiB'] ?? [])).toFixed(2));
    console.log('  (vmm.launch, the next stage, is in --only create: it needs a boot)');
  } finally {
    await b.cleanup();
  }
}

async function benchWorkspace() {
  console.log('workspace: prepare vs git archive | ssh tar -x; export of 10,000 files with 100 changed; STOP latency');
  const b = await home();
  const tmp = mkdtempSync(join(tmpdir(), 'bgb-ws-'));
  const git = (cwd: string, ...a: string[]) => execa('git', a, { cwd, env: { ...process.env, GIT_AUTHOR_NAME: 'b', GIT_AUTHOR_EMAIL: 'b@x', GIT_COMMITTER_NAME: 'b', GIT_COMMITTER_EMAIL: 'b@x' } });
  try {
    const repo = join(tmp, 'repo');
    mkdirSync(repo);
    await git(repo, 'init', '-q', '-b', 'main');
    for (let d = 0; d < 100; d++) {
      mkdirSync(join(repo, `d${d}`));
      for (let f = 0; f < 100; f++) writeFileSync(join(repo, `d${d}`, `f${f}.txt`), `file ${d}/${f}\n${randomBytes(200).toString('hex')}\n`);
    }
    writeFileSync(join(repo, 'big.bin'), randomBytes(32 * 2 ** 20));
    await git(repo, 'add', '-A');
    await git(repo, 'commit', '-qm', 'init');
    const vm = await b.cli(['vm', 'create', '--name', 'ws']);
    const client = await RpcClient.connect(join(b.run, 'daemon.sock'));
    const t0 = performance.now();
    const prep = await client.call('vm.workspace.prepare', { vm: vm.id, source: repo, guestPath: '/root/repo' });
    const tPrep = performance.now() - t0;
    const info = await client.call('vm.ssh', { vm: vm.id });
    const ssh = ['ssh', '-i', info.identityFile, '-p', String(info.port), '-o', `UserKnownHostsFile=${info.knownHostsFile}`, '-o', `HostKeyAlias=${info.hostKeyAlias}`, '-o', 'StrictHostKeyChecking=yes', '-o', 'LogLevel=ERROR', `root@${info.host}`];
    const t1 = performance.now();
    await execa('sh', ['-c', `git -C ${shellQuote([repo])} archive HEAD | ${shellQuote([...ssh, 'mkdir -p /root/plain && tar -x -C /root/plain'])}`]);
    const tPlain = performance.now() - t1;
    line('prepare 10,000 files + 32 MiB (banger)', ms(tPrep));
    line('git archive | ssh tar -x (same repo, same guest)', ms(tPlain));
    line('ratio banger / plain (near 1 is the goal)', (tPrep / tPlain).toFixed(2));
    await execa(ssh[0], [...ssh.slice(1), 'cd /root/repo && for d in $(seq 0 99); do echo changed >> d$d/f0.txt; done']);
    const t2 = performance.now();
    const ex = await client.call('vm.workspace.export', { vm: vm.id, guestPath: '/root/repo', baseCommit: prep.headCommit });
    line(`export, 10,000 files with ${ex.changedFiles.length} changed`, ms(performance.now() - t2));
    // STOP latency: idle, then during a large prepare
    const s0 = performance.now();
    await client.call('vm.stop', { vm: vm.id });
    const stopIdle = performance.now() - s0;
    await client.call('vm.start', { vm: vm.id });
    let started!: () => void;
    const streaming = new Promise<void>((r) => (started = r));
    const p = client.call('vm.workspace.prepare', { vm: vm.id, source: repo, guestPath: '/root/again' }, { onProgress: (pr) => pr.bytes && started() }).catch(() => 'aborted');
    await streaming;
    const s1 = performance.now();
    await client.call('vm.stop', { vm: vm.id });
    const stopBusy = performance.now() - s1;
    await p;
    line('STOP latency, idle VM', ms(stopIdle));
    line('STOP latency, during a large prepare', ms(stopBusy));
    line('ratio busy / idle (near 1: STOP does not wait for the job)', (stopBusy / stopIdle).toFixed(2));
    client.close();
  } finally {
    await b.cleanup();
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** A generated repository: 100 directories of 100 small files, plus 32 MiB of random bytes, one commit. */
async function generatedRepo(dir: string, git: (cwd: string, ...a: string[]) => Promise<unknown>) {
  mkdirSync(dir);
  await git(dir, 'init', '-q', '-b', 'main');
  for (let d = 0; d < 100; d++) {
    mkdirSync(join(dir, `d${d}`));
    for (let f = 0; f < 100; f++) writeFileSync(join(dir, `d${d}`, `f${f}.txt`), `file ${d}/${f}\n${randomBytes(200).toString('hex')}\n`);
  }
  writeFileSync(join(dir, 'big.bin'), randomBytes(32 * 2 ** 20));
  await git(dir, 'add', '-A');
  await git(dir, 'commit', '-qm', 'init');
}

/**
 * Prepare throughput against the raw pipes into the same guest, side by side in one run (medians of --runs):
 * shallow and full_history against `git archive HEAD | ssh tar -x`, full_copy against `tar c . | ssh tar x`.
 * On the generated 10,000-file repository and on this project's own repository cloned locally.
 */
async function benchPrepareRates() {
  console.log('prepare vs raw pipes (same guest, one run; ratio = banger throughput / raw throughput, goal >= 0.9)');
  const b = await home();
  const tmp = mkdtempSync(join(tmpdir(), 'bgb-rate-'));
  const git = (cwd: string, ...a: string[]) => execa('git', a, { cwd, env: { ...process.env, GIT_AUTHOR_NAME: 'b', GIT_AUTHOR_EMAIL: 'b@x', GIT_COMMITTER_NAME: 'b', GIT_COMMITTER_EMAIL: 'b@x' } });
  try {
    const generated = join(tmp, 'generated');
    await generatedRepo(generated, git);
    const project = join(tmp, 'project');
    await git(tmp, 'clone', '-q', '--no-local', join(import.meta.dirname, '..'), project);
    const vm = await b.cli(['vm', 'create', '--name', 'rate']);
    const client = await RpcClient.connect(join(b.run, 'daemon.sock'));
    const info = await client.call('vm.ssh', { vm: vm.id });
    const ssh = ['ssh', '-i', info.identityFile, '-p', String(info.port), '-o', `UserKnownHostsFile=${info.knownHostsFile}`, '-o', `HostKeyAlias=${info.hostKeyAlias}`, '-o', 'StrictHostKeyChecking=yes', '-o', 'LogLevel=ERROR', `root@${info.host}`];
    const guest = (cmd: string) => execa(ssh[0], [...ssh.slice(1), cmd]);
    let n = 0;
    let current = '';
    const timed = async (f: () => Promise<unknown>, what = '') => {
      // The guest's writeback of the step before is not this step's time (full_history ran after the raw archive).
      await guest('sync');
      const t0 = performance.now();
      await f();
      const t = performance.now() - t0;
      if (what) line(`(as measured) ${current} ${what}`, `${ms(t)} (host load ${readFileSync('/proc/loadavg', 'utf8').split(' ')[0]})`);
      return t;
    };
    for (const [label, repo] of [['generated 10,000 files + 32 MiB', generated], ['this project, cloned', project]] as const) {
      const t: Record<string, number[]> = { archive: [], tar: [], shallow: [], full_history: [], full_copy: [] };
      const sent: Record<string, number> = {};
      const dest = () => `/root/r${++n}`;
      current = label.split(' ')[0];
      // Untimed, once: the guest's first git and tar load their binaries from disk, which would count against
      // whichever way ran first.
      await client.call('vm.workspace.prepare', { vm: vm.id, source: repo, guestPath: dest(), mode: 'shallow' });
      await execa('sh', ['-c', `git -C ${shellQuote([repo])} archive HEAD | ${shellQuote([...ssh, `mkdir -p /root/warm && tar -x -C /root/warm`])}`]);
      await guest('rm -rf /root/r* /root/warm && sync');
      for (let i = 0; i < runs; i++) {
        for (const mode of ['shallow', 'full_history', 'full_copy'] as const) {
          const d = dest();
          t[mode].push(await timed(async () => {
            const r = await client.call('vm.workspace.prepare', { vm: vm.id, source: repo, guestPath: d, mode });
            sent[mode] = r.bytesSent;
          }, `${mode} prepare`));
          if (mode === 'shallow') {
            const a = dest();
            t.archive.push(await timed(() => execa('sh', ['-c', `git -C ${shellQuote([repo])} archive HEAD | ${shellQuote([...ssh, `mkdir -p ${a} && tar -x -C ${a}`])}`]), 'git archive | ssh tar -x'));
          }
          if (mode === 'full_copy') {
            const c = dest();
            t.tar.push(await timed(() => execa('sh', ['-c', `tar -c -f - -C ${shellQuote([repo])} --owner=0 --group=0 --numeric-owner . | ${shellQuote([...ssh, `mkdir -p ${c} && tar -x -f - --no-same-owner -C ${c}`])}`]), 'tar c | ssh tar x'));
          }
        }
        await guest('rm -rf /root/r* && sync');
      }
      const comp = await compressionRates(repo, ssh, guest, dest, timed);
      const overPort = await portRates(repo, join(b.run, `${vm.id}.bulk`), ssh, dest, timed);
      const re = await rePrepareAfterTenChanges(client, vm.id, repo, dest(), git, timed);
      console.log(`  ${label}`);
      line('git archive HEAD | ssh tar -x (median)', ms(median(t.archive)));
      for (const [name, v] of Object.entries(comp)) {
        line(`git archive | ${name} | ssh ${name} -d | tar -x`, `${ms(v)} (archive raw / this: ${(median(t.archive) / v).toFixed(2)})`);
      }
      for (const [name, v] of Object.entries(overPort)) {
        const via = name === 'none' ? 'bulk port' : `${name} | bulk port | ${name} -d`;
        line(`git archive | ${via} | tar -x`, `${ms(v)} (archive raw / this: ${(median(t.archive) / v).toFixed(2)})`);
      }
      line('re-prepare after 10 changed files (bytesSent)', `${ms(re.time)} (${re.bytes} bytes)`);
      line('re-prepare after a new commit of them (bytesSent)', `${ms(re.commitTime)} (${re.commitBytes} bytes)`);
      line('ratio full shallow prepare / re-prepare', (median(t.shallow) / re.time).toFixed(1));
      line('tar c . | ssh tar x (median)', ms(median(t.tar)));
      for (const mode of ['shallow', 'full_history', 'full_copy'] as const) {
        const raw = mode === 'full_copy' ? t.tar : t.archive;
        line(`${mode} prepare (median; bytesSent ${sent[mode]})`, ms(median(t[mode])));
        line(`${mode} ratio raw time / banger time (goal >= 0.9)`, (median(raw) / median(t[mode])).toFixed(2));
      }
    }
    client.close();
  } finally {
    await b.cleanup();
    rmSync(tmp, { recursive: true, force: true });
  }
}

/**
 * Compression on the link, end to end: `git archive HEAD | C | ssh 'C -d | tar -x'` for zstd -1, zstd -3, lz4 and gzip -1.
 * The image has only gzip; the host's zstd and lz4 binaries (same Debian release) are copied into the guest's /tmp
 * for the measurement.
 */
async function compressionRates(
  repo: string,
  ssh: string[],
  guest: (cmd: string) => Promise<unknown>,
  dest: () => string,
  timed: (f: () => Promise<unknown>, what?: string) => Promise<number>,
): Promise<Record<string, number>> {
  for (const tool of ['zstd', 'lz4']) {
    await execa('sh', ['-c', `${shellQuote(['cat', `/usr/bin/${tool}`])} | ${shellQuote([...ssh, `cat > /tmp/${tool} && chmod +x /tmp/${tool}`])}`]);
  }
  await guest('/tmp/zstd --version && /tmp/lz4 --version');
  const out: Record<string, number> = {};
  const variants: Array<[string, string, string]> = [
    ['zstd -1', 'zstd -1 -q -c', '/tmp/zstd -d -q -c'],
    ['zstd -3', 'zstd -3 -q -c', '/tmp/zstd -d -q -c'],
    ['lz4', 'lz4 -1 -q -c', '/tmp/lz4 -d -q -c'],
    ['gzip -1', 'gzip -1 -c', 'gzip -d -c'],
  ];
  for (const [name, c, d] of variants) {
    const to = dest();
    out[name] = await timed(() => execa('sh', ['-c', `git -C ${shellQuote([repo])} archive HEAD | ${c} | ${shellQuote([...ssh, `mkdir -p ${to} && ${d} | tar -x -C ${to}`])}`]), `archive | ${name}`);
  }
  return out;
}

/**
 * The same archive over the VM's bulk port instead of SSH (as banger streams a large input), with no compression,
 * zstd -1 and lz4: which, if any, pays once the guest decrypts nothing. Uses compressionRates' binaries in /tmp.
 */
async function portRates(
  repo: string,
  bulkSocket: string,
  ssh: string[],
  dest: () => string,
  timed: (f: () => Promise<unknown>, what?: string) => Promise<number>,
): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  const port = '/dev/virtio-ports/org.banger.bulk';
  const variants: Array<[string, string, string]> = [
    ['none', 'cat', `tar -x -C "$to" < ${port}`],
    ['zstd -1', 'zstd -1 -q -c', `/tmp/zstd -d -q -c < ${port} | tar -x -C "$to"`],
    ['lz4', 'lz4 -1 -q -c', `/tmp/lz4 -d -q -c < ${port} | tar -x -C "$to"`],
  ];
  for (const [name, c, receive] of variants) {
    const to = dest();
    out[name] = await timed(async () => {
      // connected first: a guest that opens the port with no host side reads EOF at once
      const sock = createConnection(bulkSocket);
      await once(sock, 'connect');
      const received = execa(ssh[0], [...ssh.slice(1), `to=${to}; mkdir -p "$to" && ${receive}`]);
      const sent = execa('sh', ['-c', `git -C ${shellQuote([repo])} archive HEAD | ${c}`], { buffer: false });
      sent.stdout!.pipe(sock);
      try {
        await Promise.all([sent, received]);
      } finally {
        sock.destroy();
      }
    }, `archive | ${name} over the port`);
  }
  return out;
}

/** Prepare, change 10 tracked files, prepare again into the same path (incremental); then commit them and again. */
async function rePrepareAfterTenChanges(
  client: RpcClient,
  vm: string,
  repo: string,
  to: string,
  git: (cwd: string, ...a: string[]) => Promise<unknown>,
  timed: (f: () => Promise<unknown>, what?: string) => Promise<number>,
) {
  await client.call('vm.workspace.prepare', { vm, source: repo, guestPath: to });
  const files = (await execa('git', ['-C', repo, 'ls-files'])).stdout.split('\n').filter((f) => f.endsWith('.txt') || f.endsWith('.ts')).slice(0, 10);
  for (const f of files) writeFileSync(join(repo, f), readFileSync(join(repo, f), 'utf8') + '// changed\n');
  let bytes = 0;
  const time = await timed(async () => (bytes = (await client.call('vm.workspace.prepare', { vm, source: repo, guestPath: to })).bytesSent), 're-prepare, 10 files changed');
  await git(repo, 'commit', '-qam', 'ten changed files');
  let commitBytes = 0;
  const commitTime = await timed(async () => (commitBytes = (await client.call('vm.workspace.prepare', { vm, source: repo, guestPath: to })).bytesSent), 're-prepare, a new commit of them');
  await git(repo, 'reset', '-q', '--hard', 'HEAD~1');
  return { time, bytes, commitTime, commitBytes };
}

/**
 * The workspace cache: `vm create --workspace` of a 10,000-file repository twice, a miss (streams everything, then
 * stores the work disk) and a hit (clones the cached disk, streams the delta). The workspace's part of each (the
 * work disk stage plus the prepare) side by side, and the whole create + prepare wall clock, boot included.
 */
async function benchWorkspaceCache() {
  console.log('workspace cache: vm create --workspace, miss then hit (generated 10,000 files + 32 MiB, 10 uncommitted files)');
  const b = await home();
  const tmp = mkdtempSync(join(tmpdir(), 'bgb-cache-'));
  const git = (cwd: string, ...a: string[]) => execa('git', a, { cwd, env: { ...process.env, GIT_AUTHOR_NAME: 'b', GIT_AUTHOR_EMAIL: 'b@x', GIT_COMMITTER_NAME: 'b', GIT_COMMITTER_EMAIL: 'b@x' } });
  try {
    const repo = join(tmp, 'generated');
    await generatedRepo(repo, git);
    for (let i = 0; i < 10; i++) writeFileSync(join(repo, `d${i}`, 'f0.txt'), `uncommitted ${i}\n`);
    await b.cli(['daemon', 'start']);
    const client = await RpcClient.connect(join(b.run, 'daemon.sock'));
    const one = async (name: string) => {
      const t0 = performance.now();
      const vm = await client.call('vm.create', { name, workspace: { source: repo } });
      const t1 = performance.now();
      const prep = await client.call('vm.workspace.prepare', { vm: vm.id, source: repo });
      const t2 = performance.now();
      const logs = (await b.cli(['vm', 'logs', vm.id])) as Array<{ stage: string; status: string; durationMs: number | null }>;
      const disk = logs.filter((r) => r.status === 'done' && (r.stage === 'workDisk' || r.stage === 'workDisk.fromCache')).reduce((n, r) => n + (r.durationMs ?? 0), 0);
      return { create: t1 - t0, prepare: t2 - t1, disk, workspace: disk + (t2 - t1), total: t2 - t0, cache: prep.cache, bytes: prep.bytesSent, warnings: prep.warnings ?? [] };
    };
    const miss = await one('miss');
    line('(as measured) miss: create | prepare | bytesSent', `${ms(miss.create)} | ${ms(miss.prepare)} | ${miss.bytes}`);
    const hit = await one('hit');
    line('cache (miss run | hit run)', `${miss.cache} | ${hit.cache}`);
    line('bytesSent', `${miss.bytes} | ${hit.bytes}`);
    line('work disk stage', `${ms(miss.disk)} | ${ms(hit.disk)}`);
    line('prepare (miss: includes storing the disk)', `${ms(miss.prepare)} | ${ms(hit.prepare)}`);
    line('workspace part (work disk + prepare)', `${ms(miss.workspace)} | ${ms(hit.workspace)}`);
    line('ratio miss / hit, workspace part (goal >= 10)', (miss.workspace / hit.workspace).toFixed(1));
    line('create + prepare wall clock, boot included', `${ms(miss.total)} | ${ms(hit.total)} (ratio ${(miss.total / hit.total).toFixed(2)})`);
    for (const w of hit.warnings) line('warning on the hit', w);
    client.close();
  } finally {
    await b.cleanup();
    rmSync(tmp, { recursive: true, force: true });
  }
}

if (!existsSync(join(imageHome, 'images', 'debian-bookworm', 'manifest.json')) && (want('create') || want('workspace') || want('prepare') || want('cache'))) {
  console.log(`no cached test image in ${imageHome}: run the e2e tests once (npm test) or skip with --only disk,tap`);
  process.exit(1);
}
void readdirSync;
if (want('disk')) await benchDisk();
if (want('tap')) await benchTap();
if (want('create')) await benchCreate();
if (want('sizes')) await benchCreateSizes();
if (want('workspace')) await benchWorkspace();
if (want('cache')) await benchWorkspaceCache();
if (want('prepare')) await benchPrepareRates();
if (want('local')) await benchLocalWorkspace(line);
if (want('vmm')) await benchVmmTimings(line, join(imageHome, 'images', TEST_IMAGE));
if (want('fc')) await benchFirecrackerFake(line);
if (want('cli')) await benchCli(line, BIN);
if (want('snapshot')) await benchSnapshots(line, home, BIN);
// Its own process: it points BANGER_HOME at a home of its own for everything it loads.
if (want('sessions')) await execa(process.execPath, ['--import', 'tsx', join(import.meta.dirname, 'sessions.ts'), '--runs', String(runs)], { stdio: 'inherit' });
