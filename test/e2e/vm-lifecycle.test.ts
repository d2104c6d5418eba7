/**
 * Whole commands against real guests under QEMU: vm run, the lifecycle of one VM (stop/start keeping the
 * work disk, vm set --disk, refused events), the daemon killed with SIGKILL and the VM adopted, and a
 * guest that never answers SSH. Each boot costs ~15 s or more under TCG, so the suite boots as few as it can.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { waitUntil } from '../support/wait.js';
import { Banger, describeE2E, pidAlive } from './harness.js';

/**
 * The accelerator the daemon must have chosen on this host: TCG when told so, else what its KVM verdict says
 * (cached in the home's cache dir after a probe boot; no cache means it never got past opening /dev/kvm).
 */
async function expectedAccel(b: Banger): Promise<'kvm' | 'tcg'> {
  if (b.env.BANGER_ACCEL === 'tcg') return 'tcg';
  const cache = join(b.env.BANGER_CACHE_DIR, 'kvm-probe.json');
  return existsSync(cache) && JSON.parse(readFileSync(cache, 'utf8')).usable === true ? 'kvm' : 'tcg';
}

describeE2E('vm lifecycle against real guests', () => {
  let b: Banger;
  beforeAll(async () => {
    b = await Banger.create();
  });
  afterAll(async () => {
    await b?.cleanup();
  });

  it('vm run --rm -- CMD prints the guest output, exits with its status and leaves nothing behind', async () => {
    const r = await b.run(['vm', 'run', '--rm', '--name', 'once', '--', 'sh', '-c', 'cat /etc/os-release; exit 3'], { timeoutMs: 420_000 });
    expect(r.stdout).toContain('VERSION_CODENAME=bookworm');
    expect(r.exitCode).toBe(3);
    expect(r.stderr).toMatch(/ssh\.wait \d/);
    // --rm returns as soon as the command ends; the delete finishes in the daemon (the VM shows as deleting meanwhile)
    const list = await b.json<Array<{ state: string }>>(['vm', 'list']);
    expect(list.every((v) => v.state === 'deleting')).toBe(true);
    await waitUntil('the --rm VM to be deleted', async () => (await b.json<unknown[]>(['vm', 'list'])).length === 0, 120_000, 250);
    expect(b.qemuPids()).toEqual([]);
  });

  it('one VM: exit status, stop/start keeps the work disk, set --disk grows it, refused events, SIGKILL of the daemon', async () => {
    await b.hostGitIdentity('Ada Lovelace', 'ada@example.invalid');
    const created = await b.json(['vm', 'create', '--name', 'life', '--disk', '1G'], { timeoutMs: 420_000 });
    expect(created).toMatchObject({ name: 'life', state: 'running', image: 'debian-bookworm', vmm: 'qemu', accel: await expectedAccel(b), net: 'user', diskBytes: 2 ** 30 });
    expect(created.sshPort).toBeGreaterThan(0);
    expect(pidAlive(created.pid)).toBe(true);
    // the host's git identity went into the guest as it is, with no note
    expect(created.gitIdentity).toEqual({ name: 'Ada Lovelace', email: 'ada@example.invalid', source: 'host' });
    expect((await b.ok(['vm', 'ssh', 'life', '--', 'cat', '/root/.gitconfig'])).stdout).toMatch(/^\[user\]\n\tname = Ada Lovelace\n\temail = ada@example\.invalid\n/m);
    expect((await b.ok(['vm', 'ssh', 'life', '--', 'cat', '/root/.gitconfig'])).stdout).not.toContain('Set by banger');

    // ssh -- CMD exits with CMD's status; the host's pinned key is the guest's own
    expect((await b.run(['vm', 'ssh', 'life', '--', 'sh', '-c', 'exit 7'])).exitCode).toBe(7);
    await b.ok(['vm', 'ssh', 'life', '--', 'sh', '-c', 'echo kept > /root/marker && sync']);
    // the root disk is a qcow2 overlay on the image; the guest applied its identity from its identity disk at boot
    // (the git identity above came that way too), a read-only disk with the serial banger-identity
    expect((await b.ok(['vm', 'ssh', 'life', '--', 'hostname'])).stdout.trim()).toBe('life');
    expect(existsSync(join(b.home, 'vms', created.id, 'root.qcow2'))).toBe(true);
    expect(existsSync(join(b.home, 'vms', created.id, 'identity.tar'))).toBe(true);
    expect((await b.ok(['vm', 'ssh', 'life', '--', 'lsblk', '-dno', 'SERIAL,RO'])).stdout).toMatch(/^banger-identity\s+1$/m);

    // refused while running: START and SET name the state and change nothing
    const start = await b.run(['vm', 'start', 'life']);
    expect(start.exitCode).toBe(1);
    expect(start.stderr).toContain('it is running');
    const set = await b.run(['vm', 'set', 'life', '--disk', '2G']);
    expect(set.exitCode).toBe(1);
    expect(set.stderr).toContain('it is running');

    // SIGKILL the daemon: the VM keeps running; the next command restarts the daemon, which adopts it
    const dpid = b.daemonPid()!;
    process.kill(dpid, 'SIGKILL');
    await waitUntil('the killed daemon to be gone', () => !pidAlive(dpid));
    expect(pidAlive(created.pid)).toBe(true);
    const adopted = await b.json(['vm', 'show', 'life']);
    expect(adopted.state).toBe('running');
    expect(adopted.pid).toBe(created.pid);
    expect(b.daemonPid()).not.toBe(dpid);
    expect((await b.ok(['vm', 'ssh', 'life', '--', 'cat', '/root/marker'])).stdout.trim()).toBe('kept');

    // stop; grow the disk while stopped; start again: the file is still there and the disk is bigger
    const stopped = await b.json(['vm', 'stop', 'life'], { timeoutMs: 120_000 });
    expect(stopped.state).toBe('stopped');
    expect(pidAlive(created.pid)).toBe(false);
    const shrink = await b.run(['vm', 'set', 'life', '--disk', '512M']);
    expect(shrink.exitCode).toBe(2);
    expect(shrink.stderr).toContain('disks only grow');
    const grown = await b.json(['vm', 'set', 'life', '--disk', '2G']);
    expect(grown.diskBytes).toBe(2 * 2 ** 30);
    const again = await b.json(['vm', 'start', 'life'], { timeoutMs: 420_000 });
    expect(again.state).toBe('running');
    expect((await b.ok(['vm', 'ssh', 'life', '--', 'cat', '/root/marker'])).stdout.trim()).toBe('kept');
    const df = await b.ok(['vm', 'ssh', 'life', '--', 'df', '-B1', '--output=size', '/root']);
    const size = Number(df.stdout.trim().split('\n').pop());
    expect(size).toBeGreaterThan(1.8 * 2 ** 30);

    // the lifecycle log has every stage with its duration; the event log replays
    const logs = await b.ok(['--json', 'vm', 'logs', 'life']);
    const stages = JSON.parse(logs.stdout).filter((r: any) => r.status === 'done').map((r: any) => r.stage);
    expect(stages).toEqual(expect.arrayContaining(['rootDisk', 'identity', 'workDisk', 'vmm.launch', 'ssh.wait', 'vmm.stop', 'workDisk.grow']));
    const events = (await b.ok(['vm', 'events', 'life'])).stdout.trim().split('\n').map((l) => JSON.parse(l));
    expect(events[0].type).toBe('xstate.init');
    expect(events.map((e: any) => e.type)).toEqual(expect.arrayContaining(['STOP', 'START', 'SET']));

    // delete: the VMM is gone and so are the VM's files
    const vmDir = join(b.home, 'vms', created.id);
    await b.ok(['vm', 'delete', 'life']);
    expect(existsSync(vmDir)).toBe(false);
    expect(b.qemuPids()).toEqual([]);
    const gone = await b.run(['vm', 'show', 'life']);
    expect(gone.exitCode).toBe(1);
    expect(gone.stderr).toContain('no vm named "life"');
  });

  it('a guest that never answers SSH fails after a bounded wait with the stage and the serial console', async () => {
    const fast = await Banger.create({ BANGER_BOOT_TIMEOUT_MS: '2500' });
    try {
      const r = await fast.run(['vm', 'create', '--name', 'slow'], { timeoutMs: 120_000 });
      expect(r.exitCode).toBe(1);
      expect(r.stderr).toContain('failed while booting');
      const v = await fast.json(['vm', 'show', 'slow']);
      expect(v.state).toBe('failed');
      expect(v.error.stage).toBe('booting');
      expect(v.error.message).toContain('serial console');
      expect(fast.qemuPids()).toEqual([]);
    } finally {
      await fast.cleanup();
    }
  });
});

describeE2E('bad input never creates anything', () => {
  let b: Banger;
  beforeAll(async () => {
    b = await Banger.create();
  });
  afterAll(async () => {
    await b?.cleanup();
  });

  it('refuses names that are not plain identifiers with exit 2, before anything is created', async () => {
    for (const name of ['a;b', '../x', '', 'x'.repeat(64), '$(id)', 'a b']) {
      const r = await b.run(['vm', 'create', '--name', name]);
      expect(r.exitCode, name).toBe(2);
      expect(r.stderr).toContain('invalid vm name');
    }
    expect(await b.json(['vm', 'list'])).toEqual([]);
  });

  it('names the unknown VM or image with exit 1', async () => {
    const r = await b.run(['vm', 'show', 'nope']);
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toContain('no vm named "nope"');
    const i = await b.run(['vm', 'create', '--image', 'nosuch']);
    expect(i.exitCode).toBe(1);
    expect(i.stderr).toContain('image nosuch is not here');
    const s = await b.run(['image', 'show', 'nosuch']);
    expect(s.exitCode).toBe(1);
  });
});
