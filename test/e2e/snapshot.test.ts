/**
 * Snapshots and forks against a real guest: ONE source VM boots (with a workspace and a file in /dev/shm, which lives
 * in memory); it is forked twice while running. Both forks see the file and the repository; a write in one does not
 * appear in the other; each fork's SSH works with the snapshot's pinned host key; exports apply independently;
 * the snapshot cannot be deleted while the forks use it (the refusal names them); deleting the source VM leaves the
 * forks working.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { gitTestEnv } from '../support/git.js';
import { Banger, describeE2E } from './harness.js';

const git = async (cwd: string, ...args: string[]) => (await execa('git', args, { cwd, env: gitTestEnv({ GIT_CONFIG_GLOBAL: '/dev/null' }) })).stdout;
const LONG = { timeoutMs: 1_200_000 };

describeE2E('snapshots and forks against a real guest', () => {
  let b: Banger;
  let tmp: string;
  let repo: string;
  let head: string;
  let forks: Array<{ name: string; id: string }> = [];
  let snapshotName = '';

  beforeAll(async () => {
    b = await Banger.create();
    tmp = mkdtempSync('/tmp/bgsnap-e2e-');
    repo = join(tmp, 'app');
    mkdirSync(repo);
    await git(repo, 'init', '-q', '-b', 'main');
    writeFileSync(join(repo, 'README.md'), '# demo\n');
    await git(repo, 'add', '-A');
    await git(repo, 'commit', '-qm', 'one');
    head = await git(repo, 'rev-parse', 'HEAD');
    await b.ok(['vm', 'create', '--name', 'src', '--vcpus', '1', '--memory', '1024', '--disk', '2G'], LONG);
    await b.ok(['vm', 'workspace', 'prepare', 'src', '--source', repo]);
    await b.ok(['vm', 'ssh', 'src', '--', 'sh', '-c', 'echo from-memory > /dev/shm/mem.txt']);
    expect((await b.ok(['vm', 'ssh', 'src', '--', 'findmnt', '-no', 'FSTYPE', '/dev/shm'])).stdout.trim()).toBe('tmpfs');
  }, 1_500_000);

  afterAll(async () => {
    await b?.cleanup();
    rmSync(tmp, { recursive: true, force: true });
  });

  it('vm fork of a running VM: two running forks, the source still running', async () => {
    const r = await b.json(['vm', 'fork', 'src', '--count', '2', '--name-prefix', 'f'], LONG);
    forks = r.forks.map((v: { name: string; id: string }) => ({ name: v.name, id: v.id }));
    snapshotName = r.snapshot.name;
    expect(forks.map((f) => f.name)).toEqual(['f-1', 'f-2']);
    expect(r.forks.every((v: { state: string }) => v.state === 'running')).toBe(true);
    expect((await b.json(['vm', 'show', 'src'])).state).toBe('running');
    expect(r.snapshot.stateBytes).toBeGreaterThan(0);
    // a name that is neither a VM nor a snapshot: the error names both
    const none = await b.run(['vm', 'fork', 'nosuch']);
    expect(none.exitCode).toBe(1);
    expect(none.stderr).toMatch(/no VM and no snapshot named "nosuch"/);
  });

  it('both forks see the file in /dev/shm (memory) and the repository, and have their own hostnames', async () => {
    for (const f of forks) {
      expect((await b.ok(['vm', 'ssh', f.name, '--', 'cat', '/dev/shm/mem.txt'])).stdout).toBe('from-memory\n');
      expect((await b.ok(['vm', 'ssh', f.name, '--', 'git', '-C', '/root/repo', 'rev-parse', 'HEAD'])).stdout.trim()).toBe(head);
      expect((await b.ok(['vm', 'ssh', f.name, '--', 'hostname'])).stdout.trim()).toBe(f.name);
    }
  });

  it('a write in one fork does not appear in the other (memory or disk)', async () => {
    await b.ok(['vm', 'ssh', 'f-1', '--', 'sh', '-c', 'echo one > /dev/shm/only.txt && echo one > /root/repo/only.txt && sync']);
    expect((await b.run(['vm', 'ssh', 'f-2', '--', 'test', '-e', '/dev/shm/only.txt'])).exitCode).toBe(1);
    expect((await b.run(['vm', 'ssh', 'f-2', '--', 'test', '-e', '/root/repo/only.txt'])).exitCode).toBe(1);
    expect((await b.run(['vm', 'ssh', 'src', '--', 'test', '-e', '/root/repo/only.txt'])).exitCode).toBe(1);
  });

  it('each fork pins the snapshot\'s host key: the same key as the source, checked strictly by vm ssh', async () => {
    const pub = (id: string) => readFileSync(join(b.home, 'vms', id, 'ssh_host_ed25519_key.pub'), 'utf8');
    const src = (await b.json(['vm', 'show', 'src'])).id as string;
    for (const f of forks) expect(pub(f.id)).toBe(pub(src));
    // the guest serves that key (StrictHostKeyChecking=yes against the pinned file): a plain command works
    for (const f of forks) expect((await b.ok(['vm', 'ssh', f.name, '--', 'true'])).exitCode).toBe(0);
  });

  it('exports from each fork apply independently', async () => {
    await b.ok(['vm', 'ssh', 'f-1', '--', 'sh', '-c', 'cd /root/repo && echo from-f1 >> README.md']);
    await b.ok(['vm', 'ssh', 'f-2', '--', 'sh', '-c', 'cd /root/repo && echo from-f2 > f2.txt']);
    for (const [f, check] of [['f-1', (d: string) => expect(readFileSync(join(d, 'README.md'), 'utf8')).toBe('# demo\nfrom-f1\n')], ['f-2', (d: string) => expect(readFileSync(join(d, 'f2.txt'), 'utf8')).toBe('from-f2\n')]] as const) {
      const patch = join(tmp, `${f}.patch`);
      await b.ok(['vm', 'workspace', 'export', f, '--base-commit', head, '--output', patch]);
      const copy = join(tmp, `copy-${f}`);
      await git(tmp, 'clone', '-q', repo, copy);
      await git(copy, 'apply', '--binary', patch);
      check(copy);
    }
    expect(readFileSync(join(tmp, 'f-2.patch'), 'utf8')).not.toContain('from-f1');
  });

  it('a fork, restored with the bulk port its snapshot was saved with, takes a prepare\'s stream over that port', async () => {
    const prep = await b.json(['vm', 'workspace', 'prepare', 'f-2', '--source', repo, '--guest-path', '/root/again']);
    const logs = (await b.json(['vm', 'logs', 'f-2'])) as Array<{ stage: string; message?: string | null }>;
    expect(logs.filter((l) => l.stage === 'workspace.prepare' && l.message?.startsWith('cache ')).at(-1)?.message).toBe(`cache off, fresh, ${prep.bytesSent} bytes sent over virtio-serial`);
    expect((await b.ok(['vm', 'ssh', 'f-2', '--', 'git', '-C', '/root/again', 'rev-parse', 'HEAD'])).stdout.trim()).toBe(head);
  });

  it('the snapshot cannot be deleted while the forks use it; deleting the source VM leaves the forks working', async () => {
    const refused = await b.run(['snapshot', 'delete', snapshotName]);
    expect(refused.exitCode).not.toBe(0);
    expect(refused.stderr).toContain('f-1');
    expect(refused.stderr).toContain('f-2');
    const list = await b.json(['snapshot', 'list']);
    expect(list.find((s: { name: string }) => s.name === snapshotName).users.vms.sort()).toEqual(['f-1', 'f-2']);
    await b.ok(['vm', 'delete', 'src']);
    for (const f of forks) expect((await b.ok(['vm', 'ssh', f.name, '--', 'cat', '/dev/shm/mem.txt'])).stdout).toBe('from-memory\n');
    await b.ok(['vm', 'delete', 'f-1', 'f-2']);
    await b.ok(['snapshot', 'delete', snapshotName]);
    expect(await b.json(['snapshot', 'list'])).toEqual([]);
  });
});
