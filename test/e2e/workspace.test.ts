/**
 * Workspaces against a real guest: vm run --workspace, a round trip whose patch reproduces the guest tree
 * exactly in every mode, the non-mutating export, the workspace cache (a hit reproduces a fresh prepare), the FIFO
 * job queue, and STOP during a large prepare. Two VMs boot: a cache hit is a second VM made for a cached workspace.
 */
import { createHash } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync, lstatSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { RpcClient } from '../../src/rpc/client.js';
import type { MethodName, ParamsOf, ProgressParams } from '../../src/rpc/protocol.js';
import { gitTestEnv } from '../support/git.js';
import { Banger, describeE2E } from './harness.js';

/** The test's own git on the host: identity in its environment, no global or system config. */
const git = async (cwd: string, ...args: string[]) => (await execa('git', args, { cwd, env: gitTestEnv({ GIT_CONFIG_GLOBAL: '/dev/null' }) })).stdout;

async function makeRepo(root: string, name: string): Promise<string> {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  await git(dir, 'init', '-q', '-b', 'main');
  writeFileSync(join(dir, 'README.md'), '# demo\n');
  writeFileSync(join(dir, 'keep.txt'), 'keep\n');
  writeFileSync(join(dir, 'gone.txt'), 'to be deleted\n');
  writeFileSync(join(dir, '.gitignore'), 'secret.env\n');
  writeFileSync(join(dir, 'run.sh'), '#!/bin/sh\necho run\n');
  chmodSync(join(dir, 'run.sh'), 0o755);
  await git(dir, 'add', '-A');
  await git(dir, 'commit', '-qm', 'one');
  writeFileSync(join(dir, 'keep.txt'), 'keep\nsecond\n');
  await git(dir, 'commit', '-qam', 'two');
  // uncommitted state on top: a modified tracked file, a deleted file, an untracked file, an ignored file, a binary
  writeFileSync(join(dir, 'keep.txt'), 'keep\nsecond\nuncommitted\n');
  rmSync(join(dir, 'gone.txt'));
  writeFileSync(join(dir, 'new.txt'), 'untracked\n');
  writeFileSync(join(dir, 'secret.env'), 'TOKEN=never-leaves-the-host\n');
  writeFileSync(join(dir, 'blob.bin'), randomBytes(4096));
  return dir;
}

/** The message of ws's last prepare in its lifecycle log: `cache …, N bytes sent over <channel>`. */
async function lastPrepareLog(call: (m: 'vm.logs', p: { vm: string }) => Promise<unknown>): Promise<string | undefined> {
  const logs = (await call('vm.logs', { vm: 'ws' })) as Array<{ stage: string; message?: string | null }>;
  return logs.filter((l) => l.stage === 'workspace.prepare' && l.message?.startsWith('cache ')).at(-1)?.message ?? undefined;
}

/** path → "mode sha256" (or "link target") for every file outside .git. */
function hostTree(dir: string, rel = ''): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of readdirSync(join(dir, rel))) {
    if (!rel && e === '.git') continue;
    const p = rel ? `${rel}/${e}` : e;
    const st = lstatSync(join(dir, p));
    if (st.isDirectory()) Object.assign(out, hostTree(dir, p));
    else if (st.isSymbolicLink()) out[p] = `link ${readlinkSync(join(dir, p))}`;
    else out[p] = `${(st.mode & 0o777).toString(8)} ${createHash('sha256').update(readFileSync(join(dir, p))).digest('hex')}`;
  }
  return out;
}

async function guestTree(b: Banger, vm: string, path: string): Promise<Record<string, string>> {
  const script = `cd ${path} && find . -path ./.git -prune -o -type f -printf '%P %m ' -exec sha256sum {} \\; | awk '{print $1, $2, $3}'`;
  const r = await b.ok(['vm', 'ssh', vm, '--', 'sh', '-c', script]);
  const out: Record<string, string> = {};
  for (const line of r.stdout.trim().split('\n').filter(Boolean)) {
    const [p, mode, sha] = line.split(' ');
    out[p] = `${mode} ${sha}`;
  }
  return out;
}

describeE2E('workspaces against a real guest', () => {
  let b: Banger;
  let tmp: string;
  let client: RpcClient;
  const call = <M extends MethodName>(method: M, params: ParamsOf<M>, onProgress?: (p: ProgressParams) => void) => client.call(method, params, { onProgress });

  beforeAll(async () => {
    b = await Banger.create();
    // two cores shared by many guests under TCG: give a boot more than the default 3 minutes
    writeFileSync(join(b.home, 'config.json'), JSON.stringify({ bootTimeoutMs: 540_000 }));
    tmp = mkdtempSync('/tmp/bgws-');
  });
  afterAll(async () => {
    client?.close();
    await b?.cleanup();
    rmSync(tmp, { recursive: true, force: true });
  });

  it('vm run --workspace . -- CMD: the guest commits (as banger\'s default identity: the host has none), export + git apply brings the change home', async () => {
    const repo = await makeRepo(tmp, 'app');
    const head = await git(repo, 'rev-parse', 'HEAD');
    const r = await b.run(['vm', 'run', '--name', 'ws', '--workspace', '.', '--', 'sh', '-c', 'echo hi >> README.md && git -C /root/repo commit -qam hi && git -C /root/repo log --format=%s/%an/%ae -1'], { cwd: repo, timeoutMs: 590_000 });
    expect(r.stderr).toContain('workspace app');
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe('hi/banger guest/root@ws.banger.invalid');
    // the identity, where it came from, and the note in the guest's .gitconfig saying so
    const shown = await b.json(['vm', 'show', 'ws']);
    expect(shown.gitIdentity).toEqual({ name: 'banger guest', email: 'root@ws.banger.invalid', source: 'default' });
    expect((await b.ok(['vm', 'ssh', 'ws', '--', 'cat', '/root/.gitconfig'])).stdout).toMatch(/^# Set by banger because the host has no git identity.*\n\[user\]\n\tname = banger guest\n\temail = root@ws\.banger\.invalid\n/m);
    client = await RpcClient.connect(join(b.runDir, 'daemon.sock'));

    const patchFile = join(tmp, 'hi.patch');
    const ex = await b.run(['vm', 'workspace', 'export', 'ws', '--base-commit', head, '--output', patchFile]);
    expect(ex.exitCode, ex.stderr).toBe(0);
    // the user's repository: apply the patch on HEAD (after setting the uncommitted work aside) and see the change
    const copy = join(tmp, 'app-copy');
    await git(tmp, 'clone', '-q', repo, copy);
    await git(copy, 'apply', '--binary', patchFile);
    expect(readFileSync(join(copy, 'README.md'), 'utf8')).toBe('# demo\nhi\n');
    // the host's uncommitted changes travelled with the workspace, so they are in the patch too
    expect(readFileSync(join(copy, 'keep.txt'), 'utf8')).toBe('keep\nsecond\nuncommitted\n');
    // stdout carries the patch and nothing else
    const toStdout = await b.ok(['vm', 'workspace', 'export', 'ws', '--base-commit', head]);
    expect(toStdout.stdout).toBe(readFileSync(patchFile, 'utf8'));
  });

  it('a VM created for a workspace already cached (vm create --workspace) starts from the cached work disk (a qcow2 overlay on a hard link of it): the tree equals a fresh prepare\'s, file by file with modes, and only the host\'s delta crossed', async () => {
    const repo = join(tmp, 'app'); // the first test's VM stored its freshly prepared work disk
    const listed = await b.json(['cache', 'list']);
    expect(listed.entries.map((e: { sourcePath: string }) => e.sourcePath)).toContain(repo);
    // new uncommitted work on the host since: the key is the same (HEAD, refs), the delta differs. The hit turns
    // the cached delta into this one: a file changed again, one new, one no longer there, a deleted file back
    // (checked out of HEAD again), a mode change, a file become a directory
    writeFileSync(join(repo, 'keep.txt'), 'keep\nsecond\nnewer uncommitted\n');
    writeFileSync(join(repo, 'later.txt'), 'untracked later\n');
    rmSync(join(repo, 'new.txt'));
    await git(repo, 'checkout', '--', 'gone.txt');
    chmodSync(join(repo, 'run.sh'), 0o644);
    rmSync(join(repo, 'README.md'));
    mkdirSync(join(repo, 'README.md'));
    writeFileSync(join(repo, 'README.md', 'inner.txt'), 'a file where a file was\n');
    const created = await b.json(['vm', 'create', '--name', 'hit', '--workspace', repo], { timeoutMs: 590_000 });
    expect(created.workspace).toMatchObject({ cache: 'hit', incremental: true, guestPath: '/root/repo', headCommit: await git(repo, 'rev-parse', 'HEAD') });
    const fresh = await call('vm.workspace.prepare', { vm: 'ws', source: repo, guestPath: '/root/fresh' });
    expect(fresh).toMatchObject({ cache: 'off', incremental: false });
    expect(created.workspace.bytesSent).toBeLessThan(fresh.bytesSent);
    // one guest command from the entry's resume point, not a re-prepare: the VM's lifecycle log says which
    const logs = (await b.json(['vm', 'logs', 'hit'])) as Array<{ stage: string; message?: string | null }>;
    expect(logs.filter((l) => l.stage === 'workspace.prepare' && l.message?.startsWith('cache ')).map((l) => l.message)).toEqual([`cache hit, resumed from the cached workspace, ${created.workspace.bytesSent} bytes sent over virtio-serial`]);
    const hitTree = await guestTree(b, 'hit', '/root/repo');
    expect(hitTree).toEqual(await guestTree(b, 'ws', '/root/fresh'));
    expect(hitTree['later.txt']).toBeDefined();
    expect(hitTree['new.txt']).toBeUndefined();
    expect(hitTree['gone.txt']).toBeDefined();
    expect(hitTree['README.md/inner.txt']).toBeDefined();
    expect(hitTree['run.sh']).toMatch(/^644 /);
    const status = (vm: string, path: string) => b.ok(['vm', 'ssh', vm, '--', 'git', '-C', path, 'status', '--porcelain']).then((r) => r.stdout);
    expect(await status('hit', '/root/repo')).toBe(await status('ws', '/root/fresh'));
    // the clone is this VM's, not the cached one's: its hostname and git identity
    expect((await b.ok(['vm', 'ssh', 'hit', '--', 'hostname'])).stdout.trim()).toBe('hit');
    expect((await b.ok(['vm', 'ssh', 'hit', '--', 'git', 'config', '--global', 'user.email'])).stdout.trim()).toBe('root@hit.banger.invalid');
    // another mode is another key: a miss
    const other = await b.json(['vm', 'workspace', 'prepare', 'hit', '--source', repo, '--guest-path', '/root/hist', '--mode', 'full_history']);
    expect(other.cache).toBe('off'); // a running VM's later prepares do not use the cache
    // its work disk is a qcow2 overlay on a hard link of the cached disk: nothing was copied, so nothing to warn of
    const disk = logs.find((l) => l.stage === 'workDisk.fromCache' && l.message?.startsWith('strategy='));
    expect(disk?.message).toBe('strategy=qcow2-overlay');
    expect(created.workspace.warnings ?? []).toEqual([]);
    // a snapshot takes that link along: with the cache emptied and the VM gone, its fork still has the workspace
    const forked = await b.json(['vm', 'fork', 'hit', '--name-prefix', 'hitfork'], { timeoutMs: 590_000 });
    await b.ok(['cache', 'prune']);
    await b.ok(['vm', 'delete', 'hit']);
    expect(await guestTree(b, 'hitfork-1', '/root/repo')).toEqual(hitTree);
    await b.ok(['vm', 'delete', 'hitfork-1']);
    await b.ok(['snapshot', 'delete', forked.snapshot.name]);
  });

  it.each(['shallow', 'full_history', 'full_copy'] as const)('round trip (%s): the patch from headCommit applied on a copy of the host repo gives exactly the guest tree; export mutates nothing', async (mode) => {
    const repo = await makeRepo(tmp, `rich-${mode}`);
    const dest = `/root/rich-${mode}`;
    const prep = await call('vm.workspace.prepare', { vm: 'ws', source: repo, guestPath: dest, mode });
    expect(await lastPrepareLog(call)).toBe(`cache off, fresh, ${prep.bytesSent} bytes sent over virtio-serial`);
    expect(Object.keys(prep).sort()).toEqual(
      expect.arrayContaining(['vmId', 'sourcePath', 'repoRoot', 'repoName', 'guestPath', 'mode', 'readOnly', 'headCommit', 'currentBranch', 'branchName', 'baseCommit', 'preparedAt', 'bytesSent', 'cache']),
    );
    expect(prep).toMatchObject({ repoName: `rich-${mode}`, guestPath: dest, mode, readOnly: false, currentBranch: 'main', headCommit: await git(repo, 'rev-parse', 'HEAD'), cache: 'off' });
    // the ignored file stayed on the host (full_copy copies the directory as it is)
    expect((await b.run(['vm', 'ssh', 'ws', '--', 'test', '-e', `${dest}/secret.env`])).exitCode).toBe(mode === 'full_copy' ? 0 : 1);
    // in the guest: edit, delete, add a binary, commit once
    await b.ok([
      'vm', 'ssh', 'ws', '--', 'sh', '-c',
      `cd ${dest} && echo edited >> README.md && git rm -qf keep.txt && head -c 3000 /dev/urandom > new.bin && chmod 755 new.bin && git add -A && git -c user.name=g -c user.email=g@x commit -qm guest`,
    ]);
    const indexBefore = (await b.ok(['vm', 'ssh', 'ws', '--', 'sha256sum', `${dest}/.git/index`])).stdout;
    const ex = await call('vm.workspace.export', { vm: 'ws', guestPath: dest, baseCommit: prep.headCommit });
    const indexAfter = (await b.ok(['vm', 'ssh', 'ws', '--', 'sha256sum', `${dest}/.git/index`])).stdout;
    expect(indexAfter).toBe(indexBefore);
    expect(ex.hasChanges).toBe(true);
    expect(ex.baseCommit).toBe(prep.headCommit);
    expect(ex.changedFiles).toEqual(expect.arrayContaining(['README.md', 'keep.txt', 'new.bin', 'gone.txt', 'new.txt', 'blob.bin']));
    expect(ex.changedFiles).not.toContain('secret.env');

    const copy = join(tmp, `rich-${mode}-copy`);
    await git(tmp, 'clone', '-q', repo, copy);
    await git(copy, 'checkout', '-q', prep.headCommit);
    const patchFile = join(tmp, `rich-${mode}.patch`);
    writeFileSync(patchFile, Buffer.from(ex.patch, ex.patchEncoding === 'base64' ? 'base64' : 'utf8'));
    await git(copy, 'apply', '--binary', patchFile);
    const guest = await guestTree(b, 'ws', dest);
    if (mode === 'full_copy') delete guest['secret.env']; // ignored: in the guest, never in a patch
    expect(hostTree(copy)).toEqual(guest);
  });

  it('the stream goes over the bulk port; while a guest process holds the port, the same prepare goes over SSH and gives the same tree', async () => {
    const repo = await makeRepo(tmp, 'channels');
    const viaPort = await call('vm.workspace.prepare', { vm: 'ws', source: repo, guestPath: '/root/via-port' });
    expect(await lastPrepareLog(call)).toBe(`cache off, fresh, ${viaPort.bytesSent} bytes sent over virtio-serial`);
    // the port opens once at a time: a guest process holding it leaves the prologue nothing, and the host falls back
    await b.ok(['vm', 'ssh', 'ws', '--', 'sh', '-c', 'exec 3< /dev/virtio-ports/org.banger.bulk; setsid sleep 600 <&3 > /dev/null 2>&1 3<&- &']);
    try {
      const viaSsh = await call('vm.workspace.prepare', { vm: 'ws', source: repo, guestPath: '/root/via-ssh' });
      expect(await lastPrepareLog(call)).toBe(`cache off, fresh, ${viaSsh.bytesSent} bytes sent over ssh`);
    } finally {
      await b.ok(['vm', 'ssh', 'ws', '--', 'pkill', '-x', 'sleep']);
    }
    expect(await guestTree(b, 'ws', '/root/via-ssh')).toEqual(await guestTree(b, 'ws', '/root/via-port'));
    const again = await call('vm.workspace.prepare', { vm: 'ws', source: repo, guestPath: '/root/via-port-again' });
    expect(await lastPrepareLog(call)).toBe(`cache off, fresh, ${again.bytesSent} bytes sent over virtio-serial`);
  });

  it('three prepares sent at once run one after another, and an export queued behind a prepare sees the finished import', async () => {
    const repo = await makeRepo(tmp, 'queued');
    writeFileSync(join(repo, 'big.bin'), randomBytes(4 * 2 ** 20));
    await git(repo, 'add', 'big.bin');
    await git(repo, 'commit', '-qm', 'big');
    const seqBefore = Math.max(0, ...((await call('vm.logs', { vm: 'ws' })) as Array<{ seq: number }>).map((r) => r.seq));
    const jobs = [1, 2, 3].map((i) => call('vm.workspace.prepare', { vm: 'ws', source: repo, guestPath: `/root/q${i}` }));
    const exp = call('vm.workspace.export', { vm: 'ws', guestPath: '/root/q3' });
    const results = await Promise.all(jobs);
    expect(results.map((r: any) => r.guestPath)).toEqual(['/root/q1', '/root/q2', '/root/q3']);
    const ex = await exp;
    // it ran after q3's import had finished (else: "not a repository"); q3 carries the host's uncommitted edits
    expect(ex.changedFiles).toEqual(expect.arrayContaining(['keep.txt', 'gone.txt']));
    const rows = ((await call('vm.logs', { vm: 'ws', afterSeq: seqBefore })) as Array<{ stage: string; status: string; time: string }>).filter((r) => r.stage.startsWith('workspace.'));
    // start/done strictly alternate: never two jobs at once, in the order they were sent
    const seq = rows.filter((r) => r.status === 'start' || r.status === 'done').map((r) => `${r.stage}:${r.status}`);
    expect(seq).toEqual([
      'workspace.prepare:start', 'workspace.prepare:done',
      'workspace.prepare:start', 'workspace.prepare:done',
      'workspace.prepare:start', 'workspace.prepare:done',
      'workspace.export:start', 'workspace.export:done',
    ]);
  });

  it('bad input gets an error that names the problem and changes nothing', async () => {
    const repo = join(tmp, 'app');
    const cases: Array<[string[], RegExp]> = [
      [['--guest-path', '/etc/x'], /under \/root/],
      [['--guest-path', '/root/../etc'], /\.\./],
      [['--source', tmp], /not a git repository/],
      [['--branch', 'a;b'], /branch/],
      [['--from', 'no-such-ref'], /no-such-ref/],
      [['--guest-path', '/root/rich-shallow'], /already|exists|holds/], // holds the round trip's repository
    ];
    for (const [args, re] of cases) {
      const r = await b.run(['vm', 'workspace', 'prepare', 'ws', ...(args[0] === '--source' ? [] : ['--source', repo]), ...args]);
      expect(r.exitCode, args.join(' ')).not.toBe(0);
      expect(r.stderr, args.join(' ')).toMatch(re);
    }
    const bad = await b.run(['vm', 'workspace', 'export', 'ws', '--guest-path', '/root/rich-shallow', '--base-commit', 'deadbeef']);
    expect(bad.exitCode).not.toBe(0);
    expect(bad.stderr).toMatch(/deadbeef/);
    expect(bad.stdout).toBe('');
  });

  it('STOP during a large prepare returns without waiting for it; the job fails with "vm stopped"', async () => {
    const repo = join(tmp, 'large');
    mkdirSync(repo);
    await git(repo, 'init', '-q', '-b', 'main');
    for (let i = 0; i < 4; i++) writeFileSync(join(repo, `blob${i}.bin`), randomBytes(24 * 2 ** 20));
    await git(repo, 'add', '-A');
    await git(repo, 'commit', '-qm', 'large');
    let streamed = 0;
    let resolveStreaming!: () => void;
    const streaming = new Promise<void>((r) => (resolveStreaming = r));
    const prep = call('vm.workspace.prepare', { vm: 'ws', source: repo, guestPath: '/root/large' }, (p) => {
      if (p.bytes) {
        streamed = p.bytes;
        resolveStreaming();
      }
    }).then(
      () => 'completed',
      (e: Error) => e.message,
    );
    await streaming;
    const stop = await b.json(['vm', 'stop', 'ws'], { timeoutMs: 120_000 });
    expect(stop.state).toBe('stopped');
    const outcome = await prep;
    expect(outcome).toMatch(/vm stopped|stopped/);
    expect(streamed).toBeGreaterThan(0);
    // a VM that is not running refuses workspace jobs clearly
    const r = await b.run(['vm', 'workspace', 'export', 'ws']);
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toMatch(/stopped: workspace jobs need a running VM/);
    void statSync;
  });
});
