/** The VM statechart's snapshot states, through transition(): restoring (a restore or fork) and snapshotting. */
import { describe, expect, it } from 'vitest';
import { transition } from 'xstate';
import { vmMachine } from '../../src/machines/vm.machine.js';
import { done, error, runtime, vmInput, walk } from '../support/vm-fixtures.js';


const restoreInput = () => vmInput({ restore: { snapshotId: 'snap1', chain: ['snap1'] } });
const up = [done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime })];
const snapshot = (stop = false) => ({ type: 'SNAPSHOT', snapshotId: 's1', name: 'first', stop });

describe('vm machine: restore and fork', () => {
  it('a restore goes creating → restoring → running, never through the work seed or a boot', () => {
    const r = walk([done('prepareDisks', { net: {} })], restoreInput());
    expect(r.value).toBe('restoring');
    expect(typeof r.context.bootDeadline).toBe('number');
    const s = walk([done('prepareDisks', { net: {} }), done('restore', { runtime })], restoreInput());
    expect(s.value).toBe('running');
    expect(s.context.runtime).toEqual(runtime);
    expect(s.context.bootDeadline).toBeNull();
  });

  it('a failed restore lands in failed (stage restoring); START then cold-boots the fork\'s own disks', () => {
    const f = walk([done('prepareDisks', { net: {} }), error('restore', 'state file truncated')], restoreInput());
    expect(f.value).toBe('failed');
    expect(f.context.error).toEqual({ stage: 'restoring', message: 'state file truncated' });
    expect(transition(vmMachine, f, { type: 'START' })[0].value).toBe('booting');
  });

  it('STOP while restoring stops it', () => {
    const s = walk([done('prepareDisks', { net: {} }), { type: 'STOP' }], restoreInput());
    expect(s.value).toBe('stopping');
  });

  it('a VM without a snapshot to restore still boots', () => {
    expect(walk([done('prepareDisks', { net: {} })]).value).toBe('applyingWorkSeed');
  });
});

describe('vm machine: snapshots', () => {
  it('SNAPSHOT from running → snapshotting → running, the request kept in context meanwhile', () => {
    const s = walk([...up, snapshot()]);
    expect(s.value).toBe('snapshotting');
    expect(s.context.pendingSnapshot).toEqual({ snapshotId: 's1', name: 'first', stop: false });
    const back = walk([...up, snapshot(), done('takeSnapshot')]);
    expect(back.value).toBe('running');
    expect(back.context.pendingSnapshot).toBeNull();
    expect(back.context.runtime).toEqual(runtime);
  });

  it('with stop, the VM ends stopped and its runtime is cleared', () => {
    const s = walk([...up, snapshot(true), done('takeSnapshot')]);
    expect(s.value).toBe('stopped');
    expect(s.context.runtime).toBeNull();
    expect(s.context.stopReason).toBe('stopped after a snapshot');
  });

  it('a failed snapshot returns to running with the error kept', () => {
    const s = walk([...up, snapshot(), error('takeSnapshot', 'migration failed')]);
    expect(s.value).toBe('running');
    expect(s.context.error).toEqual({ stage: 'snapshotting', message: 'migration failed' });
  });

  it('SNAPSHOT is refused unless running', () => {
    const stopped = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed')], vmInput({ start: false }));
    expect(stopped.value).toBe('stopped');
    expect(stopped.can(snapshot() as never)).toBe(false);
    const snapshotting = walk([...up, snapshot()]);
    expect(snapshotting.can(snapshot() as never)).toBe(false);
    expect(snapshotting.can({ type: 'DELETE' })).toBe(false);
  });
});

describe('vm machine: warm-pool claims', () => {
  const pooled = () => vmInput({ pool: { key: 'debian-bookworm/2/1024' } });

  it('CLAIM renames a running pooled VM once; a second CLAIM is refused', () => {
    const s = walk([...up, { type: 'CLAIM', name: 'mine' }], pooled());
    expect(s.value).toBe('running');
    expect(s.context.name).toBe('mine');
    expect(s.context.claimedBy).toBe('mine');
    expect(s.can({ type: 'CLAIM', name: 'yours' })).toBe(false);
    const again = transition(vmMachine, s, { type: 'CLAIM', name: 'yours' })[0];
    expect(again.context.name).toBe('mine');
  });

  it('a VM that is not pooled, or not running yet, cannot be claimed', () => {
    expect(walk(up).can({ type: 'CLAIM', name: 'x' })).toBe(false);
    const booting = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed')], pooled());
    expect(booting.value).toBe('booting');
    expect(booting.can({ type: 'CLAIM', name: 'x' })).toBe(false);
  });

  it('the claim is in the persisted snapshot', () => {
    const s = walk([...up, { type: 'CLAIM', name: 'mine' }], pooled());
    expect(JSON.parse(JSON.stringify(s.context)).claimedBy).toBe('mine');
  });
});
