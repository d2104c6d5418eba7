import { describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { eventsSocketPath, hostTscKhz, KERNEL_RAN_RE, kvmProbeArgv, qemuArgv, qemuOptEscape, qmpSocketPath, type LaunchSpec } from '../../src/host/vmm/qemu/qemu.js';

const base: LaunchSpec = {
  id: 'abc123',
  vmDir: '/var/b/vms/abc123',
  runDir: '/run/b',
  kernel: '/var/b/images/deb/vmlinuz',
  initrd: '/var/b/images/deb/initrd.img',
  cmdline: 'console=ttyS0 root=/dev/vda rw panic=-1 quiet',
  rootDisk: '/var/b/vms/abc123/rootfs.ext4',
  workDisk: '/var/b/vms/abc123/work.ext4',
  vcpus: 2,
  memoryMiB: 1024,
  accel: 'tcg',
  net: { mode: 'user', sshPort: 40022 },
  serialLog: '/var/b/vms/abc123/serial.log',
};
const files = { qmpSocket: '/run/b/abc123.qmp', pidFile: '/var/b/vms/abc123/vmm.pid' };

/** The value following each occurrence of a flag. */
const values = (argv: string[], flag: string) => argv.flatMap((a, i) => (a === flag ? [argv[i + 1]] : []));

describe('qemuArgv', () => {
  it("gives the guest agent a virtio-serial port whose host side is a Unix socket next to the QMP socket", () => {
    const argv = qemuArgv(base, files);
    expect(values(argv, '-chardev')).toContain('socket,id=agent0,path=/run/b/abc123.agent,server=on,wait=off');
    expect(values(argv, '-device')).toEqual(expect.arrayContaining(['virtio-serial-device', 'virtserialport,chardev=agent0,name=org.banger.agent']));
  });

  it('adds the bulk port on the same virtio-serial device, unless a restore of a snapshot from before it says not to', () => {
    const argv = qemuArgv(base, files);
    expect(values(argv, '-chardev')).toContain('socket,id=bulk0,path=/run/b/abc123.bulk,server=on,wait=off');
    expect(values(argv, '-device')).toContain('virtserialport,chardev=bulk0,name=org.banger.bulk');
    expect(values(argv, '-device').filter((d) => d === 'virtio-serial-device')).toHaveLength(1);
    const old = qemuArgv({ ...base, bulkPort: false, incoming: true }, files);
    expect(old.join(' ')).not.toContain('bulk');
    expect(values(old, '-device')).toContain('virtserialport,chardev=agent0,name=org.banger.agent');
  });

  it('user net through passt (config userNet "passt"): a stream netdev on passt\'s socket, no hostfwd', () => {
    const argv = qemuArgv({ ...base, net: { mode: 'user', sshPort: 2222, backend: 'passt' } }, files);
    expect(values(argv, '-netdev')).toEqual([`stream,id=n0,server=off,addr.type=unix,addr.path=${base.runDir}/abc123.passt`]);
    expect(argv.join(' ')).not.toMatch(/hostfwd|-netdev user/);
  });

  it('user net through slirp: published ports are hostfwds on their address; a bad one is refused', () => {
    const publish = [{ hostAddress: '0.0.0.0', hostPort: 8080, guestPort: 80 }];
    expect(values(qemuArgv({ ...base, net: { mode: 'user', sshPort: 2222, publish } }, files), '-netdev')).toEqual(['user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:0.0.0.0:8080-:80']);
    const bad = [{ hostAddress: '1.2.3.4,guestfwd=x', hostPort: 8080, guestPort: 80 }];
    expect(() => qemuArgv({ ...base, net: { mode: 'user', sshPort: 2222, publish: bad } }, files)).toThrow(/invalid forward/);
  });

  it('isolated user net (config userNet "isolated"): hostfwds listen on 0.0.0.0:10000+i inside QEMU\'s namespace, SSH first', () => {
    const publish = [{ hostAddress: '127.0.0.1', hostPort: 18080, guestPort: 8080 }];
    const argv = qemuArgv({ ...base, net: { mode: 'user', sshPort: 2222, publish, backend: 'isolated' } }, files);
    expect(values(argv, '-netdev')).toEqual(['user,id=n0,hostfwd=tcp:0.0.0.0:10000-:22,hostfwd=tcp:0.0.0.0:10001-:8080']);
  });

  it('user net with egress none: slirp restrict=on on the host\'s ports, whatever the backend', () => {
    for (const backend of ['isolated', 'slirp', 'passt'] as const) {
      const argv = qemuArgv({ ...base, net: { mode: 'user', sshPort: 2222, backend, egress: 'none' } }, files);
      expect(values(argv, '-netdev'), backend).toEqual(['user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22']);
    }
  });

  it('builds a microvm TCG command line with user networking', () => {
    const argv = qemuArgv(base, files);
    expect(values(argv, '-M')).toEqual(['microvm,acpi=on']);
    expect(values(argv, '-accel')).toEqual(['tcg']);
    expect(values(argv, '-cpu')).toEqual(['max']);
    expect(values(argv, '-smp')).toEqual(['2']);
    expect(values(argv, '-m')).toEqual(['1024']);
    expect(values(argv, '-name')).toEqual(['banger-abc123']);
    expect(values(argv, '-kernel')).toEqual([base.kernel]);
    expect(values(argv, '-initrd')).toEqual([base.initrd]);
    expect(values(argv, '-append')).toEqual([base.cmdline]);
    expect(values(argv, '-serial')).toEqual(['chardev:serial0']);
    expect(values(argv, '-chardev')).toEqual([
      `file,id=serial0,path=${base.serialLog},append=on`,
      'socket,id=agent0,path=/run/b/abc123.agent,server=on,wait=off',
      'socket,id=bulk0,path=/run/b/abc123.bulk,server=on,wait=off',
    ]);
    expect(values(argv, '-display')).toEqual(['none']);
    for (const f of ['-nodefaults', '-no-user-config', '-daemonize', '-no-reboot']) expect(argv).toContain(f);
    expect(values(argv, '-pidfile')).toEqual([files.pidFile]);
    expect(values(argv, '-qmp')).toEqual(['unix:/run/b/abc123.qmp,server=on,wait=off', 'unix:/run/b/abc123.qev,server=on,wait=off']);
    // slirp by default: SSH forwarded from the host's loopback only
    expect(values(argv, '-netdev')).toEqual(['user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22']);
    expect(values(argv, '-device')).toContain('virtio-net-device,netdev=n0');
  });

  it('puts the root disk before the work disk, both as virtio-blk-device', () => {
    const argv = qemuArgv(base, files);
    expect(values(argv, '-drive')).toEqual([
      `id=root,file=${base.rootDisk},format=raw,if=none,cache=writeback,discard=unmap,werror=enospc,rerror=report`,
      `id=work,file=${base.workDisk},format=raw,if=none,cache=writeback,discard=unmap,werror=enospc,rerror=report`,
    ]);
    const devs = values(argv, '-device').filter((d) => d.startsWith('virtio-blk-device'));
    expect(devs).toEqual(['virtio-blk-device,drive=root', 'virtio-blk-device,drive=work']);
    // -drive/-device pairs come in order root, work
    expect(argv.indexOf('virtio-blk-device,drive=root')).toBeLessThan(argv.indexOf(values(argv, '-drive')[1]));
  });

  it('uses KVM with -cpu host', () => {
    const argv = qemuArgv({ ...base, accel: 'kvm' }, files);
    expect(values(argv, '-accel')).toEqual(['kvm']);
    expect(values(argv, '-cpu')).toEqual(['host']);
  });

  it('builds tap networking with the MAC', () => {
    const argv = qemuArgv({ ...base, net: { mode: 'tap', tap: 'bgtap3', mac: '02:AB:00:00:00:07' } }, files);
    expect(values(argv, '-netdev')).toEqual(['tap,id=n0,ifname=bgtap3,script=no,downscript=no']);
    expect(values(argv, '-device')).toContain('virtio-net-device,netdev=n0,mac=02:ab:00:00:00:07');
    expect(argv.join(' ')).not.toContain('hostfwd');
  });

  it('omits -initrd without one and honours the disk cache mode', () => {
    const argv = qemuArgv({ ...base, initrd: undefined, diskCache: 'unsafe' }, files);
    expect(argv).not.toContain('-initrd');
    expect(values(argv, '-drive').every((d) => d.includes('cache=unsafe'))).toBe(true);
  });

  it('escapes commas in QEMU option values', () => {
    expect(qemuOptEscape('/a,b/c')).toBe('/a,,b/c');
    const argv = qemuArgv({ ...base, rootDisk: '/x,y/root.ext4' }, { qmpSocket: '/r,s/q.qmp', pidFile: '/p' });
    expect(values(argv, '-drive')[0]).toContain('file=/x,,y/root.ext4,format=raw');
    expect(values(argv, '-qmp')[0]).toBe('unix:/r,,s/q.qmp,server=on,wait=off');
  });

  it('can leave out the events monitor', () => {
    expect(values(qemuArgv(base, { ...files, eventsSocket: null }), '-qmp')).toHaveLength(1);
  });

  it('tells a TCG guest the TSC frequency unless the cmdline already does', () => {
    expect(values(qemuArgv(base, files, { tscKhz: 2250000 }), '-append')).toEqual([`${base.cmdline} tsc_early_khz=2250000`]);
    expect(values(qemuArgv(base, files), '-append')).toEqual([base.cmdline]);
    expect(values(qemuArgv({ ...base, accel: 'kvm' }, files, { tscKhz: 2250000 }), '-append')).toEqual([base.cmdline]);
    const own = { ...base, cmdline: 'console=ttyS0 tsc_early_khz=1000' };
    expect(values(qemuArgv(own, files, { tscKhz: 2250000 }), '-append')).toEqual([own.cmdline]);
  });

  it('is pure', () => {
    expect(qemuArgv(base, files)).toEqual(qemuArgv(structuredClone(base), { ...files }));
  });

  it.each([
    ['relative kernel', { kernel: 'vmlinuz' }],
    ['bad id', { id: 'a b' }],
    ['bad id with comma', { id: 'a,b' }],
    ['zero vcpus', { vcpus: 0 }],
    ['tiny memory', { memoryMiB: 16 }],
    ['bad port', { net: { mode: 'user', sshPort: 70000 } }],
    ['bad tap', { net: { mode: 'tap', tap: 'tap0,script=/evil', mac: '02:00:00:00:00:01' } }],
    ['bad mac', { net: { mode: 'tap', tap: 'tap0', mac: 'zz' } }],
    ['newline in path', { serialLog: '/tmp/a\nb' }],
  ] as [string, Partial<LaunchSpec>][])('rejects %s', (_name, patch) => {
    expect(() => qemuArgv({ ...base, ...patch } as LaunchSpec, files)).toThrow(BangerError);
  });
});

describe('hostTscKhz', () => {
  it('reads a positive frequency on x86 Linux, or nothing', async () => {
    const khz = await hostTscKhz();
    if (process.arch === 'x64') expect(khz).toBeGreaterThan(100_000);
    else expect(khz === undefined || khz > 0).toBe(true);
  });
});

describe('socket paths', () => {
  it('names the QMP sockets by id in the run dir', () => {
    expect(qmpSocketPath('/run/user/1000/banger', 'v1')).toBe('/run/user/1000/banger/v1.qmp');
    expect(eventsSocketPath('/run/user/1000/banger/v1.qmp')).toBe('/run/user/1000/banger/v1.qev');
    expect(eventsSocketPath('/somewhere/else.sock')).toBeUndefined();
  });
  it('refuses a path longer than a Unix socket allows', () => {
    expect(() => qmpSocketPath(`/${'d'.repeat(100)}`, 'vm')).toThrow(/too long/);
    expect(() => qemuArgv(base, { ...files, qmpSocket: `/${'d'.repeat(110)}.qmp` })).toThrow(/too long/);
  });
});

describe('KVM probe', () => {
  it('boots with KVM, no disks, no reboot, panic=-1', () => {
    const argv = kvmProbeArgv('/k', '/i', '/s.log');
    expect(values(argv, '-accel')).toEqual(['kvm']);
    expect(values(argv, '-cpu')).toEqual(['host']);
    expect(argv).toContain('-no-reboot');
    expect(values(argv, '-append')[0]).toContain('panic=-1');
    expect(argv).not.toContain('-drive');
    expect(values(argv, '-serial')).toEqual(['file:/s.log']);
  });
  it('recognises a kernel that ran', () => {
    expect(KERNEL_RAN_RE.test('[    1.2] Run /init as init process')).toBe(true);
    expect(KERNEL_RAN_RE.test('Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)')).toBe(true);
    expect(KERNEL_RAN_RE.test('')).toBe(false);
    expect(KERNEL_RAN_RE.test('qemu: failed to set MSR')).toBe(false);
  });
});
