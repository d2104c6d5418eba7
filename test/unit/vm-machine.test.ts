import { describe, expect, it } from 'vitest';
import { createActor, fromPromise, initialTransition, transition } from 'xstate';
import { vmMachine } from '../../src/machines/vm.machine.js';
import { done, error, runtime, vmInput, walk } from '../support/vm-fixtures.js';


describe('vm machine: pure transitions', () => {
  it('starts in creating and invokes prepareDisks without running it', () => {
    const [s, actions] = initialTransition(vmMachine, vmInput());
    expect(s.value).toBe('creating');
    expect(actions.some((a) => a.type === 'xstate.spawnChild')).toBe(true);
  });

  it('walks creating → applyingWorkSeed → booting → running', () => {
    expect(walk([done('prepareDisks', { net: {} })]).value).toBe('applyingWorkSeed');
    expect(walk([done('prepareDisks', { net: {} }), done('applyWorkSeed')]).value).toBe('booting');
    const s = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime })]);
    expect(s.value).toBe('running');
    expect(s.context.runtime).toEqual(runtime);
    expect(s.context.bootDeadline).toBeNull();
  });

  it('--no-start stops after the work disk', () => {
    const s = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed')], vmInput({ start: false }));
    expect(s.value).toBe('stopped');
  });

  it('keeps a deadline in context while booting (timers are not persisted)', () => {
    const s = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed')]);
    expect(typeof s.context.bootDeadline).toBe('number');
  });

  it('a failing step lands in failed with the stage and the error', () => {
    const s = walk([error('prepareDisks', 'no space left')]);
    expect(s.value).toBe('failed');
    expect(s.context.error).toEqual({ stage: 'creating', message: 'no space left' });
    const b = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed'), error('boot', 'ssh timeout')]);
    expect(b.context.error).toEqual({ stage: 'booting', message: 'ssh timeout' });
  });

  it('START from failed retries the failed stage: creation or boot', () => {
    const c = walk([error('prepareDisks', 'x'), { type: 'START' }]);
    expect(c.value).toBe('creating');
    expect(c.context.error).toBeNull();
    const b = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed'), error('boot', 'x'), { type: 'START' }]);
    expect(b.value).toBe('booting');
  });

  it('STOP, START, RESTART and a VMM that exits on its own', () => {
    const up = [done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime })];
    expect(walk([...up, { type: 'STOP' }]).value).toBe('stopping');
    const stopped = walk([...up, { type: 'STOP' }, done('stopVmm')]);
    expect(stopped.value).toBe('stopped');
    expect(stopped.context.runtime).toBeNull();
    expect(walk([...up, { type: 'STOP' }, done('stopVmm'), { type: 'START' }]).value).toBe('booting');
    const restarting = walk([...up, { type: 'RESTART' }]);
    expect(restarting.value).toBe('stopping');
    expect(walk([...up, { type: 'RESTART' }, done('stopVmm')]).value).toBe('booting');
    const exited = walk([...up, done('vmm', { reason: 'VMM exited on its own: guest-shutdown' })]);
    expect(exited.value).toBe('stopped');
    expect(exited.context.stopReason).toContain('guest-shutdown');
  });

  it('refuses events that do not apply, naming nothing changed', () => {
    const creating = walk([]);
    expect(creating.can({ type: 'DELETE' })).toBe(false);
    expect(creating.can({ type: 'START' })).toBe(false);
    const running = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime })]);
    expect(running.can({ type: 'START' })).toBe(false);
    expect(running.can({ type: 'SET', diskBytes: 1 })).toBe(false);
    const [same] = transition(vmMachine, running, { type: 'START' });
    expect(same.value).toBe('running');
  });

  it('SET on a stopped VM reconfigures and updates the spec; a failed resize keeps the old spec', () => {
    const stopped = [done('prepareDisks', { net: {} }), done('applyWorkSeed')];
    const input = vmInput({ start: false });
    const s = walk([...stopped, { type: 'SET', diskBytes: 16 * 2 ** 30, vcpus: 4 }, done('applySettings')], input);
    expect(s.value).toBe('stopped');
    expect(s.context.spec.diskBytes).toBe(16 * 2 ** 30);
    expect(s.context.spec.vcpus).toBe(4);
    const f = walk([...stopped, { type: 'SET', diskBytes: 16 * 2 ** 30 }, error('applySettings', 'resize2fs failed')], input);
    expect(f.value).toBe('stopped');
    expect(f.context.spec.diskBytes).toBe(8 * 2 ** 30);
    expect(f.context.error?.stage).toBe('reconfiguring');
  });

  it('DELETE from settled states ends in the final deleted state', () => {
    const s = walk([done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime }), { type: 'DELETE' }, done('destroy')]);
    expect(s.value).toBe('deleted');
    expect(s.status).toBe('done');
    expect(walk([error('prepareDisks', 'x'), { type: 'DELETE' }]).value).toBe('deleting');
  });
});

describe('vm machine: restore from a persisted snapshot', () => {
  // For every long-running state: snapshot → JSON → createActor({ snapshot }) keeps the state and re-runs its step.
  const longRunning: Array<[string, unknown[]]> = [
    ['creating', []],
    ['applyingWorkSeed', [done('prepareDisks', { net: {} })]],
    ['booting', [done('prepareDisks', { net: {} }), done('applyWorkSeed')]],
    ['running', [done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime })]],
    ['stopping', [done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime }), { type: 'STOP' }]],
    ['deleting', [error('prepareDisks', 'x'), { type: 'DELETE' }]],
  ];
  for (const [state, events] of longRunning) {
    it(`restores ${state} and re-runs its step`, async () => {
      const started: string[] = [];
      const never = (name: string) =>
        fromPromise(async ({ signal }) => {
          started.push(name);
          await new Promise((r) => signal.addEventListener('abort', r));
          throw new Error('aborted');
        });
      const machine = vmMachine.provide({
        actors: {
          prepareDisks: never('prepareDisks') as never,
          applyWorkSeed: never('applyWorkSeed') as never,
          boot: never('boot') as never,
          watchVmm: never('watchVmm') as never,
          stopVmm: never('stopVmm') as never,
          applySettings: never('applySettings') as never,
          destroy: never('destroy') as never,
        },
      });
      // Drive a live actor to the state, persist, stop (after taking the snapshot), restore.
      const s = walk(events);
      const a1 = createActor(machine as never, { snapshot: s, input: undefined } as never);
      a1.start();
      const persisted = JSON.parse(JSON.stringify(a1.getPersistedSnapshot()));
      a1.stop();
      started.length = 0;
      const a2 = createActor(machine as never, { snapshot: persisted, input: undefined } as never) as ReturnType<typeof createActor<typeof machine>>;
      a2.start();
      expect(a2.getSnapshot().value).toBe(state);
      expect(a2.getSnapshot().context).toEqual(s.context);
      await new Promise((r) => setTimeout(r, 10));
      const expected: Record<string, string> = { creating: 'prepareDisks', applyingWorkSeed: 'applyWorkSeed', booting: 'boot', running: 'watchVmm', stopping: 'stopVmm', deleting: 'destroy' };
      expect(started).toContain(expected[state]);
      a2.stop();
    });
  }
});
