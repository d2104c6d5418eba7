import { describe, expect, it } from 'vitest';
import { initialTransition, transition } from 'xstate';
import { vmMachine, type VmSnapshot } from '../../src/machines/vm.machine.js';
import { describeIoErrorStop, ioErrorFromBlocks, ioErrorFromEvent, qemuArgv, type LaunchSpec } from '../../src/host/vmm/qemu/qemu.js';
import { runtime, vmInput } from '../support/vm-fixtures.js';

const done = (id: string, output: unknown = undefined) => ({ type: `xstate.done.actor.${id}`, output, actorId: id }) as never;

function walk(events: unknown[]): VmSnapshot {
  let [s] = initialTransition(vmMachine, vmInput());
  for (const e of events) [s] = transition(vmMachine, s, e as never);
  return s as VmSnapshot;
}

const up = [done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime })];

describe('a VMM paused on a disk error', () => {
  it('fails the VM (stage running) with the reason; START then boots it again', () => {
    const s = walk([...up, done('vmm', { reason: 'paused', error: "the guest's work disk hit an I/O error; free space" })]);
    expect(s.value).toBe('failed');
    expect(s.context.error).toEqual({ stage: 'running', message: "the guest's work disk hit an I/O error; free space" });
    expect(s.context.runtime).toBeNull();
    expect(walk([...up, done('vmm', { reason: 'paused', error: 'x' }), { type: 'START' }]).value).toBe('booting');
  });

  it('a VMM that exits (no error) still stops the VM', () => {
    const s = walk([...up, done('vmm', { reason: 'VMM exited on its own: process exited' })]);
    expect(s.value).toBe('stopped');
    expect(s.context.error).toBeNull();
  });
});

describe('QMP disk-error mapping', () => {
  it('takes a BLOCK_IO_ERROR that stopped the guest, and nothing else', () => {
    const ev = {
      event: 'BLOCK_IO_ERROR',
      data: { device: 'work', 'node-name': '#block123', operation: 'write', action: 'stop', nospace: true, reason: 'No space left on device' },
    };
    expect(ioErrorFromEvent(ev)).toEqual({ device: 'work', operation: 'write', nospace: true, detail: 'No space left on device' });
    expect(ioErrorFromEvent({ ...ev, data: { ...ev.data, action: 'report' } })).toBeUndefined();
    expect(ioErrorFromEvent({ event: 'STOP' })).toBeUndefined();
  });

  it('names the disk, ENOSPC and the operation', () => {
    expect(describeIoErrorStop({ device: 'work', operation: 'write', nospace: true })).toBe(
      "the guest's work disk hit an I/O error (ENOSPC: no space left on device) on write and QEMU paused it",
    );
    expect(describeIoErrorStop({ device: 'root', nospace: false, detail: 'Input/output error' })).toBe(
      "the guest's root disk hit an I/O error (Input/output error) and QEMU paused it",
    );
    expect(describeIoErrorStop(undefined)).toBe("the guest's disk hit an I/O error and QEMU paused it");
  });

  it("reads query-block's io-status", () => {
    expect(ioErrorFromBlocks([{ device: 'root', 'io-status': 'ok' }, { device: 'work', 'io-status': 'nospace' }])).toEqual({ device: 'work', nospace: true });
    expect(ioErrorFromBlocks([{ device: 'root', 'io-status': 'failed' }])).toEqual({ device: 'root', nospace: false });
    expect(ioErrorFromBlocks([{ device: 'root', 'io-status': 'ok' }])).toBeUndefined();
    expect(ioErrorFromBlocks({ not: 'an array' })).toBeUndefined();
  });

  it('tells QEMU explicitly to pause on ENOSPC and report other errors, for both disks', () => {
    const spec: LaunchSpec = {
      id: 'abc123', vmDir: '/v', runDir: '/run/b', kernel: '/k', cmdline: 'console=ttyS0', rootDisk: '/v/root.ext4', workDisk: '/v/work.ext4',
      vcpus: 1, memoryMiB: 256, accel: 'tcg', net: { mode: 'user', sshPort: 40022 }, serialLog: '/v/serial.log',
    };
    const argv = qemuArgv(spec, { qmpSocket: '/run/b/abc123.qmp', pidFile: '/v/vmm.pid' });
    const drives = argv.filter((_, i) => argv[i - 1] === '-drive');
    expect(drives).toHaveLength(2);
    for (const d of drives) expect(d.split(',')).toEqual(expect.arrayContaining(['werror=enospc', 'rerror=report']));
  });
});
