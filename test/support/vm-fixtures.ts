import { initialTransition, transition } from 'xstate';
import { vmMachine, type VmInput, type VmSnapshot } from '../../src/machines/vm.machine.js';

export function vmInput(over: Partial<VmInput['spec']> = {}): VmInput {
  return {
    id: 'abc123xyz0',
    name: 'test-vm',
    createdAt: '2026-01-01T00:00:00.000Z',
    spec: {
      image: 'debian-bookworm',
      vcpus: 2,
      memoryMiB: 1024,
      diskBytes: 8 * 2 ** 30,
      vmm: 'qemu',
      accel: 'tcg',
      net: 'user',
      start: true,
      bootTimeoutMs: 180_000,
      stopTimeoutMs: 15_000,
      ...over,
    },
  };
}

export const runtime = { pid: 4242, control: '/run/x.qmp', sshPort: 2222, bootedAt: '2026-01-01T00:00:10.000Z' };

/** An invoked actor's completion or failure, as the machine receives it. */
export const done = (id: string, output: unknown = undefined) => ({ type: `xstate.done.actor.${id}`, output, actorId: id }) as never;
export const error = (id: string, message: string) => ({ type: `xstate.error.actor.${id}`, error: new Error(message), actorId: id }) as never;

/** The VM machine after these events, through pure transition(). */
export function walk(events: unknown[], input = vmInput()): VmSnapshot {
  let [s] = initialTransition(vmMachine, input);
  for (const e of events) [s] = transition(vmMachine, s, e as never);
  return s as VmSnapshot;
}
