/**
 * A FIFO queue of jobs run one at a time, as a statechart: the queue lives in context, so the actor's own
 * mailbox serialises requests (no promise chains). Two actors of the system are such queues:
 *  - each running VM's `workspace` (prepare/export: two prepares never interleave their tar streams, an
 *    export never sees a half-streamed import);
 *  - the daemon's `tapPool` (lease, release, refill, reconcile of TAP devices).
 * Pure: the job runner is the `runJob` actor, supplied from src/actors with `machine.provide()`.
 *
 * Results travel as events: every job emits `job.started` and then `job.done` or `job.failed` to whoever
 * listens on this actor, and, when asked to (input `notifyParent`), tells its parent with JOB.SETTLED (a VM re-emits it to its own listeners, and
 * fails the jobs still pending when it leaves `running`). A job marked `coalesce` is dropped when one of
 * the same kind is already waiting (e.g. one pending refill serves every lease that asked for it).
 */
import { assign, emit, enqueueActions, fromPromise, sendParent, setup } from 'xstate';

export interface Job<K extends string = string> {
  jobId: string;
  kind: K;
  params: Record<string, unknown>;
  enqueuedAt: string;
  /** The daemon session that enqueued it: a job restored from an earlier session has no requester left. */
  session?: string;
  coalesce?: boolean;
}

export interface JobQueueContext {
  /** Whose queue this is (the VM id for a workspace). Logs before 0.2 recorded it as `vmId`. */
  owner: string;
  /** Tell the parent of each settled job (a VM's workspace does; a standalone queue has no parent). */
  notifyParent: boolean;
  queue: Job[];
  current: Job | null;
  done: number;
  failed: number;
}

export type JobQueueEvent = { type: 'ENQUEUE'; job: Job };

/** A failure as it travels in events: plain data, with the kind and hint of a BangerError when it was one. */
export interface JobError {
  message: string;
  kind?: string;
  hint?: string;
}

export type JobSettled = { type: 'JOB.SETTLED'; jobId: string; kind: string; ok: true; output: unknown } | { type: 'JOB.SETTLED'; jobId: string; kind: string; ok: false; error: JobError };

export type JobQueueEmitted =
  | { type: 'job.started'; jobId: string; kind: string }
  | { type: 'job.done'; jobId: string; kind: string; output: unknown }
  | { type: 'job.failed'; jobId: string; kind: string; error: JobError };

export interface RunJobInput {
  owner: string;
  job: Job;
}

export function jobError(e: unknown): JobError {
  if (!(e instanceof Error)) return { message: String(e) };
  const { kind, hint } = e as Error & { kind?: unknown; hint?: unknown };
  return { message: e.message, ...(typeof kind === 'string' ? { kind } : {}), ...(typeof hint === 'string' ? { hint } : {}) };
}

export function createJobQueueMachine(id: string) {
  return setup({
    types: {
      context: {} as JobQueueContext,
      events: {} as JobQueueEvent,
      input: {} as { owner?: string; vmId?: string; notifyParent?: boolean },
      emitted: {} as JobQueueEmitted,
    },
    actors: {
      runJob: fromPromise<unknown, RunJobInput>(async () => {
        throw new Error('actor runJob was not provided: supply it with machine.provide()');
      }),
    },
    guards: {
      hasQueued: ({ context }) => context.queue.length > 0,
      alreadyWaiting: ({ context, event }) => !!event.job.coalesce && context.queue.some((j) => j.kind === event.job.kind),
    },
  }).createMachine({
    id,
    context: ({ input }) => ({ owner: input.owner ?? input.vmId ?? id, notifyParent: input.notifyParent ?? false, queue: [], current: null, done: 0, failed: 0 }),
    initial: 'idle',
    on: {
      ENQUEUE: [{ guard: 'alreadyWaiting' }, { actions: assign({ queue: ({ context, event }) => [...context.queue, event.job] }) }],
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
          input: ({ context }) => ({ owner: context.owner, job: context.current! }),
          onDone: {
            target: 'idle',
            actions: enqueueActions(({ context, event, enqueue }) => {
              const { jobId, kind } = context.current!;
              enqueue(emit({ type: 'job.done' as const, jobId, kind, output: event.output }));
              if (context.notifyParent) enqueue(sendParent({ type: 'JOB.SETTLED', jobId, kind, ok: true, output: event.output } satisfies JobSettled));
              enqueue(assign({ current: null, done: context.done + 1 }));
            }),
          },
          onError: {
            target: 'idle',
            actions: enqueueActions(({ context, event, enqueue }) => {
              const { jobId, kind } = context.current!;
              const error = jobError(event.error);
              enqueue(emit({ type: 'job.failed' as const, jobId, kind, error }));
              if (context.notifyParent) enqueue(sendParent({ type: 'JOB.SETTLED', jobId, kind, ok: false, error } satisfies JobSettled));
              enqueue(assign({ current: null, failed: context.failed + 1 }));
            }),
          },
        },
      },
    },
  });
}

export type JobQueueMachine = ReturnType<typeof createJobQueueMachine>;

/** Every job still owed an answer: the one running and those waiting. */
export function pendingJobs(context: JobQueueContext): Job[] {
  return context.current ? [context.current, ...context.queue] : [...context.queue];
}
