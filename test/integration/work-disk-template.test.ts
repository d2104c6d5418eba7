/**
 * The host's stages of a create without process spawns where they are not needed (issue 12): host keys made
 * in-process, and work disks cloned from a per-image template with the VM's own files written in.
 * Real tools (mkfs.ext4, debugfs, cp, ssh-keygen, e2fsck) in a temp dir.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run, type Runner } from '../../src/host/exec/runner.js';
import { readDiskFile } from '../../src/host/disk/disks.js';
import { ensureUserKey, generateHostKey } from '../../src/host/guest/keys.js';
import { workDiskFromTemplate } from '../../src/host/disk/work-disk-template.js';

const MiB = 2 ** 20;
let dir: string;
let seed: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'banger-wtpl-'));
  const tree = join(dir, 'tree');
  await mkdir(join(tree, '.ssh'), { recursive: true });
  await writeFile(join(tree, '.bashrc'), '# seed bashrc\n');
  await writeFile(join(tree, '.gitconfig'), '[core]\n\teditor = vi\n');
  seed = join(dir, 'seed.ext4');
  await run('mkfs.ext4', ['-F', '-q', '-d', tree, seed, '16M']);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('host keys made in-process', () => {
  it('are OpenSSH ed25519 keys that ssh-keygen reads, each one new', async () => {
    const a = generateHostKey({ comment: 'banger-vm-a' });
    const b = generateHostKey({ comment: 'banger-vm-b' });
    expect(a.publicKey).toMatch(/^ssh-ed25519 AAAA[A-Za-z0-9+/=]+ banger-vm-a$/);
    expect(a.privateKey).toContain('BEGIN OPENSSH PRIVATE KEY');
    expect(a.publicKey).not.toBe(b.publicKey.replace('banger-vm-b', 'banger-vm-a'));
    const file = join(dir, 'hostkey');
    await writeFile(file, a.privateKey, { mode: 0o600 });
    const derived = (await run('ssh-keygen', ['-y', '-f', file])).stdout.trim();
    expect(derived.split(' ').slice(0, 2)).toEqual(a.publicKey.split(' ').slice(0, 2));
  });

  it("banger's user key too: ssh-keygen derives the .pub banger wrote", async () => {
    const keys = join(dir, 'keys');
    const k = await ensureUserKey(keys);
    const derived = (await run('ssh-keygen', ['-y', '-f', k.privateKeyPath])).stdout.trim();
    expect(derived.split(' ').slice(0, 2)).toEqual(k.publicKey.split(' ').slice(0, 2));
    expect((await stat(k.privateKeyPath)).mode & 0o777).toBe(0o600);
    expect((await ensureUserKey(keys)).publicKey).toBe(k.publicKey); // made once
  });
});

describe('workDiskFromTemplate', () => {
  it("clones one template per image, size and key; without a git identity (an identity disk carries it) a clone is one cp, no debugfs", async () => {
    const templateDir = join(dir, 'image');
    const calls: string[] = [];
    const counting: Runner = (cmd, args, opts) => {
      calls.push(cmd);
      return run(cmd, args, opts);
    };
    const opts = { templateDir, sizeBytes: 64 * MiB, seedImage: seed, authorizedKeys: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake banger\n', runner: counting };
    const disks: string[] = [];
    for (const vm of ['vm-a', 'vm-b']) {
      const dst = join(dir, `${vm}.ext4`);
      calls.length = 0;
      const strategy = await workDiskFromTemplate(dst, opts);
      expect(['reflink', 'sparse-copy']).toContain(strategy);
      if (vm === 'vm-b') expect(calls.filter((c) => c !== 'cp')).toEqual([]); // the template is reused: no mkfs, no debugfs
      expect(await readDiskFile(dst, '/.ssh/authorized_keys')).toBe(opts.authorizedKeys);
      expect(await readDiskFile(dst, '/.bashrc')).toBe('# seed bashrc\n');
      expect(await readDiskFile(dst, '/.gitconfig')).toContain('editor = vi');
      expect((await stat(dst)).size).toBe(64 * MiB);
      const fsck = await run('e2fsck', ['-fn', dst], { reject: false });
      expect(fsck.exitCode, fsck.stdout + fsck.stderr).toBe(0);
      disks.push(dst);
    }
    expect((await readdir(templateDir)).filter((n) => n.endsWith('.ext4'))).toHaveLength(1);

    // Another size is another template; an existing disk is refused (it may hold the user's work).
    await workDiskFromTemplate(join(dir, 'big.ext4'), { ...opts, sizeBytes: 128 * MiB });
    expect((await readdir(templateDir)).filter((n) => n.endsWith('.ext4'))).toHaveLength(2);
    await expect(workDiskFromTemplate(disks[0], opts)).rejects.toThrow(/already exists/);
  });

  it('with a git identity (raw root disks: no identity disk) writes it over the seed\'s .gitconfig, the template untouched', async () => {
    const templateDir = join(dir, 'image2');
    const dst = join(dir, 'raw-root.ext4');
    await workDiskFromTemplate(dst, { templateDir, sizeBytes: 32 * MiB, seedImage: seed, authorizedKeys: 'ssh-ed25519 AAAA k\n', gitIdentity: { name: 'n', email: 'e@x.invalid', source: 'default' } });
    const gitconfig = await readDiskFile(dst, '/.gitconfig');
    expect(gitconfig).toContain('editor = vi');
    expect(gitconfig).toContain('email = e@x.invalid');
    const [template] = (await readdir(templateDir)).filter((n) => n.endsWith('.ext4'));
    expect(await readDiskFile(join(templateDir, template), '/.gitconfig')).not.toContain('e@x.invalid');
  });
});
