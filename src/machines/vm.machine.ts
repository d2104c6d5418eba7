/**
 * The VM statechart. Pure: no host imports. Every side effect is an actor named in `setup({ actors })`
 * whose real implementation lives in src/actors (and is supplied with `machine.provide`). The logic
 * placeholders below only define the input/output types; they throw if ever run unprovided.
 *
 *   creating → applyingWorkSeed → booting → running → stopping → stopped
 *   stopped --START--> booting;  running --RESTART--> stopping → booting
 *   settled --DELETE--> deleting → deleted (final);  any failing step → failed (keeps stage + error)
 *   running --(VMM exits on its own)--> stopped (with the reason)
 *   running --(VMM paused on a disk error)--> failed (stage 'running', the reason and the fix)
 *   a restore or fork: creating (overlays on the snapshot's layers) → restoring (state loaded, not booted) → running
 *   running --SNAPSHOT--> snapshotting → running (or stopped, with stop set)
 *   running --CLAIM--> running, renamed (a warm-pool VM handed out; once only)
 */
import type { PublishedPort } from '../rpc/publish.js';
import { assign, emit, enqueueActions, fromPromise, sendTo, setup, type ActorRefFrom, type SnapshotFrom } from 'xstate';
import { pendingJobs, type Job, type JobQueueContext, type JobQueueEmitted, type JobSettled } from './job-queue.machine.js';
import { workspaceMachine } from './workspace.machine.js';

export type VmmKind = 'qemu' | 'firecracker';
export type Accel = 'kvm' | 'tcg';
export type NetMode = 'user' | 'tap';

export interface VmSpec {
  image: string;
  vcpus: number;
  memoryMiB: number;
  diskBytes: number;
  vmm: VmmKind;
  accel: Accel;
  net: NetMode;
  /** Boot once the disks exist (`vm create` without --no-start). */
  start: boolean;
  bootTimeoutMs: number;
  stopTimeoutMs: number;
  /** The guest's git identity, decided at create (absent in VMs created before it was recorded). */
  gitIdentity?: GitIdentity;
  /** A tap VM's isolation policy, decided at create (absent: the default, internet only). */
  isolation?: { egress: 'internet' | 'none'; allowPeers: boolean; allow: string[] };
  /** A restore or fork: the snapshot it starts from, and every snapshot its disks depend on (that one first). */
  restore?: { snapshotId: string; chain: string[] };
  /** A warm-pool VM: booted ahead of time, waiting for a `vm create` / `vm run` whose request matches `key`. */
  pool?: { key: string };
  /** Host ports published to the guest (`--publish`), open while the VM runs. */
  publish?: PublishedPort[];
  /** Created for a workspace (`--workspace`): its cache key, and the cached work disk to clone on a hit. */
  workspace?: { key: string; cachedDisk?: string };
}

/** `source`: the host's own identity, or banger's default because the host has none. */
export interface GitIdentity {
  name: string;
  email: string;
  source: 'host' | 'default';
}

export interface VmRuntime {
  pid: number;
  /** VMM control socket (QMP for QEMU, the API socket for Firecracker). */
  control: string;
  sshPort?: number;
  guestIp?: string;
  tap?: string;
  bootedAt: string;
}

export interface VmError {
  stage: string;
  message: string;
}

export interface VmContext {
  id: string;
  name: string;
  createdAt: string;
  spec: VmSpec;
  runtime: VmRuntime | null;
  /** Set by networking during disk preparation; kept across boots. */
  net: { sshPort?: number; guestIp?: string; tap?: string } | null;
  error: VmError | null;
  stopReason: string | null;
  restartPending: boolean;
  /** Deadline (epoch ms) of the boot in progress: timers are not persisted, deadlines in context are. */
  bootDeadline: number | null;
  pendingSet: SetParams | null;
  /** The snapshot being taken (absent in snapshots persisted before snapshots existed). */
  pendingSnapshot?: SnapshotParams | null;
  /** A warm-pool VM handed out: the name it was given. Persisted with the transition, so never handed out twice. */
  claimedBy?: string | null;
}

export interface SnapshotParams {
  snapshotId: string;
  name: string;
  /** Stop the VM once saved, instead of resuming it. */
  stop: boolean;
}

export interface SetParams {
  vcpus?: number;
  memoryMiB?: number;
  diskBytes?: number;
}

export interface VmInput {
  id: string;
  name: string;
  createdAt: string;
  spec: VmSpec;
}

export type VmEvent =
  | { type: 'START' }
  | { type: 'STOP'; reason?: string }
  | { type: 'RESTART' }
  | { type: 'DELETE' }
  | ({ type: 'SET' } & SetParams)
  | ({ type: 'SNAPSHOT' } & SnapshotParams)
  /** Hand a running warm-pool VM out under `name`. */
  | { type: 'CLAIM'; name: string }
  /** A workspace job (prepare/export): accepted only while running, forwarded to the workspace queue. */
  | { type: 'ENQUEUE'; job: Job }
  | JobSettled;

/** Names of the states a VM is "settled" in: nothing is in flight. */
export const SETTLED_STATES = ['running', 'stopped', 'failed'] as const;

// ---- actor contracts (input → output) -------------------------------------------------------------
export interface StepInput {
  ctx: VmContext;
}
export interface PrepareDisksOutput {
  net: { sshPort?: number; guestIp?: string; tap?: string };
}
export interface BootOutput {
  runtime: VmRuntime;
}
export interface WatchOutput {
  reason: string;
  /** Set when the VMM did not exit but cannot go on (QEMU paused the guest on a full disk): the VM fails with it. */
  error?: string;
}

const unprovided = (name: string) =>
  fromPromise<never, StepInput>(async () => {
    throw new Error(`actor ${name} was not provided: the machine is pure, supply it with machine.provide()`);
  });

export const vmMachine = setup({
  types: {
    context: {} as VmContext,
    events: {} as VmEvent,
    input: {} as VmInput,
    emitted: {} as JobQueueEmitted,
    children: {} as { workspace: 'workspace' },
  },
  actors: {
    prepareDisks: unprovided('prepareDisks') as unknown as ReturnType<typeof fromPromise<PrepareDisksOutput, StepInput>>,
    applyWorkSeed: unprovided('applyWorkSeed') as unknown as ReturnType<typeof fromPromise<void, StepInput>>,
    boot: unprovided('boot') as unknown as ReturnType<typeof fromPromise<BootOutput, StepInput>>,
    restore: unprovided('restore') as unknown as ReturnType<typeof fromPromise<BootOutput, StepInput>>,
    takeSnapshot: unprovided('takeSnapshot') as unknown as ReturnType<typeof fromPromise<void, StepInput>>,
    watchVmm: unprovided('watchVmm') as unknown as ReturnType<typeof fromPromise<WatchOutput, StepInput>>,
    stopVmm: unprovided('stopVmm') as unknown as ReturnType<typeof fromPromise<void, StepInput>>,
    applySettings: unprovided('applySettings') as unknown as ReturnType<typeof fromPromise<void, StepInput>>,
    destroy: unprovided('destroy') as unknown as ReturnType<typeof fromPromise<void, StepInput>>,
    workspace: workspaceMachine,
  },
  guards: {
    startAfterCreate: ({ context }) => context.spec.start,
    isRestore: ({ context }) => !!context.spec.restore,
    snapshotStops: ({ context }) => !!context.pendingSnapshot?.stop,
    claimable: ({ context }) => !!context.spec.pool && !context.claimedBy,
    restartPending: ({ context }) => context.restartPending,
    /** The VMM watch ended with an error (the VMM is there but cannot go on), not with an exit. */
    vmmFailed: ({ event }) => !!(event as unknown as { output?: WatchOutput }).output?.error,
    failedBeforeDisks: ({ context }) => context.error?.stage === 'creating' || context.error?.stage === 'applyingWorkSeed',
  },
  actions: {
    /** A job's result, to whoever listens on this VM (the request that enqueued it). */
    announceJob: emit(({ event }) => {
      const e = event as JobSettled;
      return e.ok ? { type: 'job.done' as const, jobId: e.jobId, kind: e.kind, output: e.output } : { type: 'job.failed' as const, jobId: e.jobId, kind: e.kind, error: e.error };
    }),
    /** Leaving `running` stops the workspace (aborting its job): every job it still owed fails, saying why. */
    failPendingJobs: enqueueActions(({ context, self, enqueue }) => {
      const ws = self.getSnapshot().children.workspace?.getSnapshot() as { context: JobQueueContext } | undefined;
      for (const job of ws ? pendingJobs(ws.context) : []) {
        const message = `${job.kind} job ${job.jobId} failed: vm stopped (${context.name} left running while the job was queued or running)`;
        enqueue.emit({ type: 'job.failed', jobId: job.jobId, kind: job.kind, error: { message, kind: 'aborted', hint: 'start the VM and run the job again' } });
      }
    }),
    clearError: assign({ error: null }),
    clearRuntime: assign({ runtime: null, bootDeadline: null }),
  },
}).createMachine({
  id: 'vm',
  context: ({ input }) => ({
    id: input.id,
    name: input.name,
    createdAt: input.createdAt,
    spec: input.spec,
    runtime: null,
    net: null,
    error: null,
    stopReason: null,
    restartPending: false,
    bootDeadline: null,
    pendingSet: null,
    pendingSnapshot: null,
  }),
  initial: 'creating',
  states: {
    creating: {
      invoke: {
        id: 'prepareDisks',
        src: 'prepareDisks',
        input: ({ context }) => ({ ctx: context }),
        onDone: [
          { guard: 'isRestore', target: 'restoring', actions: assign({ net: ({ event }) => event.output.net }) },
          { target: 'applyingWorkSeed', actions: assign({ net: ({ event }) => event.output.net }) },
        ],
        onError: {
          target: 'failed',
          actions: assign({ error: ({ event }) => ({ stage: 'creating', message: messageOf(event.error) }) }),
        },
      },
    },
    applyingWorkSeed: {
      invoke: {
        id: 'applyWorkSeed',
        src: 'applyWorkSeed',
        input: ({ context }) => ({ ctx: context }),
        onDone: [
          { guard: 'startAfterCreate', target: 'booting' },
          { target: 'stopped', actions: assign({ stopReason: 'created without starting' }) },
        ],
        onError: {
          target: 'failed',
          actions: assign({ error: ({ event }) => ({ stage: 'applyingWorkSeed', message: messageOf(event.error) }) }),
        },
      },
    },
    booting: {
      entry: [
        'clearError',
        assign({
          restartPending: false,
          stopReason: null,
          bootDeadline: ({ context }) => context.bootDeadline ?? Date.now() + context.spec.bootTimeoutMs,
        }),
      ],
      invoke: {
        id: 'boot',
        src: 'boot',
        input: ({ context }) => ({ ctx: context }),
        onDone: {
          target: 'running',
          actions: assign({ runtime: ({ event }) => event.output.runtime, bootDeadline: null }),
        },
        onError: {
          target: 'failed',
          actions: [
            assign({ error: ({ event }) => ({ stage: 'booting', message: messageOf(event.error) }) }),
            'clearRuntime',
          ],
        },
      },
      on: {
        STOP: { target: 'stopping', actions: assign({ stopReason: ({ event }) => event.reason ?? 'stopped by user' }) },
      },
    },
    /** A restore or fork: a VMM started from the snapshot's saved state (no boot), then the guest's new identity. */
    restoring: {
      entry: [
        'clearError',
        assign({ stopReason: null, bootDeadline: ({ context }) => context.bootDeadline ?? Date.now() + context.spec.bootTimeoutMs }),
      ],
      invoke: {
        id: 'restore',
        src: 'restore',
        input: ({ context }) => ({ ctx: context }),
        onDone: { target: 'running', actions: assign({ runtime: ({ event }) => event.output.runtime, bootDeadline: null }) },
        onError: {
          target: 'failed',
          actions: [assign({ error: ({ event }) => ({ stage: 'restoring', message: messageOf(event.error) }) }), 'clearRuntime'],
        },
      },
      on: {
        STOP: { target: 'stopping', actions: assign({ stopReason: ({ event }) => event.reason ?? 'stopped by user' }) },
      },
    },
    /** Paused, disks frozen as layers and memory saved; then running again, or stopped. */
    snapshotting: {
      invoke: {
        id: 'takeSnapshot',
        src: 'takeSnapshot',
        input: ({ context }) => ({ ctx: context }),
        onDone: [
          { guard: 'snapshotStops', target: 'stopped', actions: [assign({ pendingSnapshot: null, stopReason: 'stopped after a snapshot' }), 'clearRuntime'] },
          { target: 'running', actions: assign({ pendingSnapshot: null }) },
        ],
        onError: {
          // The step resumes the guest whatever happened; a VMM that died meanwhile is seen by running's watch.
          target: 'running',
          actions: assign({ error: ({ event }) => ({ stage: 'snapshotting', message: messageOf(event.error) }), pendingSnapshot: null }),
        },
      },
    },
    running: {
      invoke: [
        {
          id: 'vmm',
          src: 'watchVmm',
          input: ({ context }) => ({ ctx: context }),
          onDone: [
            {
              guard: 'vmmFailed',
              target: 'failed',
              actions: [assign({ error: ({ event }) => ({ stage: 'running', message: event.output.error! }) }), 'clearRuntime'],
            },
            {
              target: 'stopped',
              actions: [assign({ stopReason: ({ event }) => event.output.reason }), 'clearRuntime'],
            },
          ],
          onError: {
            target: 'stopped',
            actions: [assign({ stopReason: ({ event }) => `VMM watch failed: ${messageOf(event.error)}` }), 'clearRuntime'],
          },
        },
        {
          id: 'workspace',
          src: 'workspace',
          input: ({ context }) => ({ owner: context.id, notifyParent: true }),
        },
      ],
      exit: 'failPendingJobs',
      on: {
        ENQUEUE: { actions: sendTo('workspace', ({ event }) => event) },
        'JOB.SETTLED': { actions: 'announceJob' },
        STOP: { target: 'stopping', actions: assign({ stopReason: ({ event }) => event.reason ?? 'stopped by user' }) },
        RESTART: { target: 'stopping', actions: assign({ restartPending: true, stopReason: 'restart' }) },
        DELETE: { target: 'deleting' },
        CLAIM: { guard: 'claimable', actions: assign({ name: ({ event }) => event.name, claimedBy: ({ event }) => event.name }) },
        SNAPSHOT: { target: 'snapshotting', actions: ['clearError', assign({ pendingSnapshot: ({ event }) => ({ snapshotId: event.snapshotId, name: event.name, stop: event.stop }) })] },
      },
    },
    stopping: {
      invoke: {
        id: 'stopVmm',
        src: 'stopVmm',
        input: ({ context }) => ({ ctx: context }),
        onDone: [
          { guard: 'restartPending', target: 'booting', actions: 'clearRuntime' },
          { target: 'stopped', actions: 'clearRuntime' },
        ],
        onError: {
          target: 'failed',
          actions: assign({ error: ({ event }) => ({ stage: 'stopping', message: messageOf(event.error) }) }),
        },
      },
    },
    stopped: {
      on: {
        START: { target: 'booting' },
        SET: { target: 'reconfiguring', actions: assign({ pendingSet: ({ event }) => pickSet(event) }) },
        DELETE: { target: 'deleting' },
      },
    },
    reconfiguring: {
      invoke: {
        id: 'applySettings',
        src: 'applySettings',
        input: ({ context }) => ({ ctx: context }),
        onDone: {
          target: 'stopped',
          actions: assign({
            spec: ({ context }) => ({ ...context.spec, ...definedOnly(context.pendingSet ?? {}) }),
            pendingSet: null,
          }),
        },
        onError: {
          // A refused or failed resize leaves the VM as it was: stopped, with the error kept.
          target: 'stopped',
          actions: assign({
            error: ({ event }) => ({ stage: 'reconfiguring', message: messageOf(event.error) }),
            pendingSet: null,
          }),
        },
      },
    },
    failed: {
      on: {
        START: [{ guard: 'failedBeforeDisks', target: 'creating', actions: 'clearError' }, { target: 'booting' }],
        DELETE: { target: 'deleting' },
      },
    },
    deleting: {
      invoke: {
        id: 'destroy',
        src: 'destroy',
        input: ({ context }) => ({ ctx: context }),
        onDone: { target: 'deleted' },
        onError: {
          target: 'failed',
          actions: assign({ error: ({ event }) => ({ stage: 'deleting', message: messageOf(event.error) }) }),
        },
      },
    },
    deleted: { type: 'final' },
  },
});

export type VmMachine = typeof vmMachine;
export type VmSnapshot = SnapshotFrom<VmMachine>;
export type VmActorRef = ActorRefFrom<VmMachine>;
export type VmState =
  | 'creating'
  | 'applyingWorkSeed'
  | 'booting'
  | 'restoring'
  | 'running'
  | 'snapshotting'
  | 'stopping'
  | 'stopped'
  | 'reconfiguring'
  | 'failed'
  | 'deleting'
  | 'deleted';

export function messageOf(e: unknown): string {
  if (e instanceof Error) return e.message;
  if (e && typeof e === 'object' && 'message' in e) return String((e as { message: unknown }).message);
  return String(e);
}

function pickSet(e: SetParams): SetParams {
  return definedOnly({ vcpus: e.vcpus, memoryMiB: e.memoryMiB, diskBytes: e.diskBytes });
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
