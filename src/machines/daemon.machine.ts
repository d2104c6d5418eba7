/**
 * The daemon's root actor: one actor system per daemon, every actor in it reachable with `system.get`.
 *
 *   daemon (systemId "daemon")
 *    ├─ rootHelper (systemId "rootHelper")  the helper connection (invoked once the helper is wanted)
 *    ├─ tapPool    (systemId "tapPool")     a job queue of TAP operations (lease, release, refill, reconcile)
 *    └─ vm:<id>    (systemId "vm:<id>")     one per VM, spawned on VM.SPAWN
 *        └─ workspace                       the VM's job queue (prepare/export) while it runs
 *
 * Persistence is per VM (each VM's snapshot and its event row in one transaction, see src/actors): the
 * root itself holds nothing worth keeping, so on daemon start it is rebuilt by `restoredDaemonSnapshot`
 * from the VMs' own snapshots, and XState restores each VM — and whatever step it had in flight — as a
 * child of the new root. Pure: the children's side effects are supplied with `machine.provide()`.
 */
import { enqueueActions, setup, stopChild, type ActorRefFrom, type Snapshot } from 'xstate';
import { createJobQueueMachine } from './job-queue.machine.js';
import { rootHelperMachine } from './root-helper.machine.js';
import { vmMachine, type VmInput } from './vm.machine.js';

export const tapPoolMachine = createJobQueueMachine('tapPool');

export type DaemonEvent = { type: 'VM.SPAWN'; input: VmInput } | { type: 'VM.FORGET'; vmId: string } | { type: 'HELPER.ENABLE' };

export const vmActorId = (vmId: string): string => `vm:${vmId}`;

export const daemonMachine = setup({
  types: {
    events: {} as DaemonEvent,
    children: {} as { rootHelper: 'rootHelper'; tapPool: 'tapPool' },
  },
  actors: { vm: vmMachine, rootHelper: rootHelperMachine, tapPool: tapPoolMachine },
}).createMachine({
  id: 'daemon',
  initial: 'userNetOnly',
  on: {
    'VM.SPAWN': {
      actions: enqueueActions(({ enqueue, event }) => {
        const id = vmActorId(event.input.id);
        enqueue.spawnChild('vm', { id, systemId: id, input: event.input });
      }),
    },
    'VM.FORGET': { actions: stopChild(({ event }) => vmActorId(event.vmId)) },
  },
  states: {
    /** No root helper: user-mode networking only. */
    userNetOnly: {
      on: { 'HELPER.ENABLE': 'withRootHelper' },
    },
    withRootHelper: {
      invoke: [
        { id: 'rootHelper', src: 'rootHelper', systemId: 'rootHelper' },
        { id: 'tapPool', src: 'tapPool', systemId: 'tapPool', input: { owner: 'tapPool' } },
      ],
    },
  },
});

export type DaemonMachine = typeof daemonMachine;
export type DaemonActorRef = ActorRefFrom<DaemonMachine>;

/** The root's snapshot at daemon start: no helper yet, and every persisted VM restored as a child. */
export function restoredDaemonSnapshot(vms: Array<{ id: string; snapshot: Snapshot<unknown> }>): Snapshot<unknown> {
  const children = Object.fromEntries(
    vms.map(({ id, snapshot }) => [vmActorId(id), { snapshot, src: 'vm', systemId: vmActorId(id), syncSnapshot: false }]),
  );
  return { status: 'active', value: 'userNetOnly', historyValue: {}, context: {}, children } as unknown as Snapshot<unknown>;
}
