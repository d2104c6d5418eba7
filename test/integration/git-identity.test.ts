/**
 * The guest's git identity: the host's where it has one, else banger's default, said so in the guest's
 * .gitconfig. The lookup runs real git with HOME an empty directory (or one holding a .gitconfig) and no system
 * config, so the machine's own ~/.gitconfig and /etc/gitconfig never decide the outcome.
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultGitIdentity, gitIdentity } from '../../src/actors/vm-steps.js';
import { createWorkDisk, DEFAULT_IDENTITY_NOTE, readDiskFile } from '../../src/host/disk/disks.js';
import { run, type Runner } from '../../src/host/exec/runner.js';

let dir: string;
let seed: string;
let n = 0;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bgid-'));
  const tree = join(dir, 'seed-tree');
  await mkdir(join(tree, '.ssh'), { recursive: true });
  await writeFile(join(tree, '.gitconfig'), '[core]\n\teditor = vi\n'); // the image's own settings are kept
  seed = join(dir, 'work-seed.ext4');
  await run('mkfs.ext4', ['-F', '-q', '-E', 'root_owner=0:0', '-d', tree, seed, '16M']);
});

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** A HOME of its own (empty unless `gitconfig` is given) for every git the runner starts. */
async function hostWithHome(gitconfig?: string): Promise<Runner> {
  const home = join(dir, `home-${++n}`);
  await mkdir(home);
  if (gitconfig !== undefined) await writeFile(join(home, '.gitconfig'), gitconfig);
  const env = { HOME: home, XDG_CONFIG_HOME: join(home, '.config'), GIT_CONFIG_GLOBAL: join(home, '.gitconfig'), GIT_CONFIG_NOSYSTEM: '1' };
  return (file, args, opts = {}) => run(file, args, { ...opts, env: { ...opts.env, ...env } });
}

async function workDiskGitconfig(identity: Parameters<typeof createWorkDisk>[1]['gitIdentity']): Promise<string> {
  const disk = join(dir, `work-${++n}.ext4`);
  await createWorkDisk(disk, { sizeBytes: 64 * 2 ** 20, seedImage: seed, authorizedKeys: 'ssh-ed25519 AAAAk test', gitIdentity: identity });
  const text = await readDiskFile(disk, '/.gitconfig');
  if (text === undefined) throw new Error(`${disk} has no /.gitconfig`);
  return text;
}

describe('gitIdentity', () => {
  it('a host with no git identity (HOME empty): banger\'s default, named after the VM', async () => {
    expect(await gitIdentity(await hostWithHome(), 'dev-1')).toEqual({ name: 'banger guest', email: 'root@dev-1.banger.invalid', source: 'default' });
    expect(defaultGitIdentity('dev-1')).toEqual({ name: 'banger guest', email: 'root@dev-1.banger.invalid' });
  });

  it('a host with an identity: the host\'s, as git reads it', async () => {
    const runner = await hostWithHome('[user]\n\tname = "Ada Lovelace"\n\temail = ada@example.invalid\n');
    expect(await gitIdentity(runner, 'dev-1')).toEqual({ name: 'Ada Lovelace', email: 'ada@example.invalid', source: 'host' });
  });

  it('half an identity: the host\'s half, the default for the rest, and source default', async () => {
    const runner = await hostWithHome('[user]\n\tname = Ada\n');
    expect(await gitIdentity(runner, 'box')).toEqual({ name: 'Ada', email: 'root@box.banger.invalid', source: 'default' });
  });
});

describe('the guest\'s .gitconfig', () => {
  it('a default identity comes with a note saying banger set it because the host has none; git reads it', async () => {
    const text = await workDiskGitconfig({ ...defaultGitIdentity('dev-1'), source: 'default' });
    expect(text).toBe(`[core]\n\teditor = vi\n${DEFAULT_IDENTITY_NOTE}\n[user]\n\tname = banger guest\n\temail = root@dev-1.banger.invalid\n`);
    expect(DEFAULT_IDENTITY_NOTE).toMatch(/^# .*banger.*host has no git identity/);
    const file = join(dir, 'read-back.gitconfig');
    await writeFile(file, text);
    const email = await run('git', ['config', '--file', file, '--get', 'user.email'], { env: { GIT_CONFIG_NOSYSTEM: '1' } });
    expect(email.stdout.trim()).toBe('root@dev-1.banger.invalid');
  });

  it('the host\'s identity is written as it is, with no note', async () => {
    const text = await workDiskGitconfig({ name: 'Ada Lovelace', email: 'ada@example.invalid', source: 'host' });
    expect(text).toBe('[core]\n\teditor = vi\n[user]\n\tname = Ada Lovelace\n\temail = ada@example.invalid\n');
  });

  it('refuses an identity with a newline, naming it', async () => {
    await expect(workDiskGitconfig({ name: 'Ada\n[core]\n\tpager = evil', email: 'a@b', source: 'host' })).rejects.toThrow(/git identity .* contains a newline/);
  });
});
