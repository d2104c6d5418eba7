/**
 * The workspace sub-actor of a running VM: a FIFO queue of jobs (prepare, export) run one at a time, so two
 * prepares never interleave their tar streams and an export never sees a half-streamed import.
 * Pure: the job runner is the `runJob` actor, supplied from src/actors. Lifecycle events never reach this
 * machine: when the VM leaves `running` the parent stops it, which aborts the running job's AbortSignal.
 */
import { assign, emit, fromPromise, setup } from 'xstate';

export type JobKind = 'prepare' | 'export';

export interface Job {
  jobId: string;
  kind: JobKind;
  params: Record<string, unknown>;
  enqueuedAt: string;
}

export interface WorkspaceContext {
  vmId: string;
  queue: Job[];
  current: Job | null;
  done: number;
  failed: number;
}

export type WorkspaceEvent = { type: 'ENQUEUE'; job: Job };

export type WorkspaceEmitted =
  | { type: 'job.started'; jobId: string; kind: JobKind }
  | { type: 'job.done'; jobId: string; kind: JobKind; output: unknown }
  | { type: 'job.failed'; jobId: string; kind: JobKind; error: string };

export interface RunJobInput {
  vmId: string;
  job: Job;
}

export const workspaceMachine = setup({
  types: {
    context: {} as WorkspaceContext,
    events: {} as WorkspaceEvent,
    input: {} as { vmId: string },
    emitted: {} as WorkspaceEmitted,
  },
  actors: {
    runJob: fromPromise<unknown, RunJobInput>(async () => {
      throw new Error('actor runJob was not provided: supply it with machine.provide()');
    }),
  },
  guards: {
    hasQueued: ({ context }) => context.queue.length > 0,
  },
}).createMachine({
  id: 'workspace',
  context: ({ input }) => ({ vmId: input.vmId, queue: [], current: null, done: 0, failed: 0 }),
  initial: 'idle',
  on: {
    ENQUEUE: { actions: assign({ queue: ({ context, event }) => [...context.queue, event.job] }) },
  },
  states: {
    idle: {
      always: { guard: 'hasQueued', target: 'working' },
    },
    working: {
      entry: [
        assign({ current: ({ context }) => context.queue[0], queue: ({ context }) => context.queue.slice(1) }),
        emit(({ context }) => ({ type: 'job.started' as const, jobId: context.current!.jobId, kind: context.current!.kind })),
      ],
      invoke: {
        id: 'job',
        src: 'runJob',
        input: ({ context }) => ({ vmId: context.vmId, job: context.current! }),
        onDone: {
          target: 'idle',
          actions: [
            emit(({ context, event }) => ({ type: 'job.done' as const, jobId: context.current!.jobId, kind: context.current!.kind, output: event.output })),
            assign({ current: null, done: ({ context }) => context.done + 1 }),
          ],
        },
        onError: {
          target: 'idle',
          actions: [
            emit(({ context, event }) => ({
              type: 'job.failed' as const,
              jobId: context.current!.jobId,
              kind: context.current!.kind,
              error: event.error instanceof Error ? event.error.message : String(event.error),
            })),
            assign({ current: null, failed: ({ context }) => context.failed + 1 }),
          ],
        },
      },
    },
  },
});

export type WorkspaceMachine = typeof workspaceMachine;
