import { describe, expect, it } from 'vitest';
import { qemuArgv, type LaunchSpec } from '../../src/host/vmm/qemu/qemu.js';

const base: LaunchSpec = {
  id: 'abc123',
  vmDir: '/var/b/vms/abc123',
  runDir: '/run/b',
  kernel: '/var/b/images/deb/vmlinuz',
  cmdline: 'console=ttyS0 root=/dev/vda rw',
  rootDisk: '/var/b/vms/abc123/root.qcow2',
  workDisk: '/var/b/vms/abc123/work.ext4',
  vcpus: 1,
  memoryMiB: 512,
  accel: 'tcg',
  net: { mode: 'user', sshPort: 40022 },
  serialLog: '/var/b/vms/abc123/serial.log',
};
const files = { qmpSocket: '/run/b/abc123.qmp', pidFile: '/var/b/vms/abc123/vmm.pid' };
const drives = (argv: string[]) => argv.flatMap((a, i) => (a === '-drive' ? [argv[i + 1]] : []));

describe('qemuArgv root disk format', () => {
  it('opens a qcow2 overlay root disk as qcow2 and keeps the work disk raw', () => {
    const [root, work] = drives(qemuArgv({ ...base, rootFormat: 'qcow2' }, files));
    expect(root).toContain(`file=${base.rootDisk},format=qcow2,`);
    expect(work).toContain(`file=${base.workDisk},format=raw,`);
  });

  it('defaults to raw (clones of the image, Firecracker-compatible)', () => {
    expect(drives(qemuArgv(base, files))[0]).toContain('format=raw,');
  });
});
