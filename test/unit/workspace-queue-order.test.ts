/**
 * The workspace queue is FIFO: jobs that arrive while one runs start in the order they were enqueued.
 * (scripts/mutations.ts runs this file against a LIFO queue and expects it to fail.)
 */
import { describe, expect, it } from 'vitest';
import { createActor, fromPromise, initialTransition, transition } from 'xstate';
import { workspaceMachine, type Job, type WorkspaceEmitted } from '../../src/machines/workspace.machine.js';

const job = (id: string): Job => ({ jobId: id, kind: 'prepare', params: {}, enqueuedAt: '2026-01-01T00:00:00Z' });
const enqueue = (id: string) => ({ type: 'ENQUEUE' as const, job: job(id) });
const jobDone = () => ({ type: 'xstate.done.actor.job', output: {}, actorId: 'job' }) as never;

describe('workspace queue order', () => {
  it('pure transitions: three jobs enqueued while one runs start first-in, first-out', () => {
    let [s] = initialTransition(workspaceMachine, { vmId: 'v' });
    [s] = transition(workspaceMachine, s, enqueue('running'));
    expect(s.context.current?.jobId).toBe('running');
    for (const id of ['first', 'second', 'third']) [s] = transition(workspaceMachine, s, enqueue(id));
    const started: string[] = [];
    for (let i = 0; i < 3; i++) {
      [s] = transition(workspaceMachine, s, jobDone());
      started.push(s.context.current!.jobId);
    }
    expect(started).toEqual(['first', 'second', 'third']);
    [s] = transition(workspaceMachine, s, jobDone());
    expect(s.value).toBe('idle');
    expect(s.context).toMatchObject({ queue: [], current: null, done: 4 });
  });

  it('a live actor: the job runner is called, and job.started emitted, in enqueue order', async () => {
    const release: Array<() => void> = [];
    const runnerCalls: string[] = [];
    const machine = workspaceMachine.provide({
      actors: {
        runJob: fromPromise(async ({ input }) => {
          runnerCalls.push(input.job.jobId);
          await new Promise<void>((r) => release.push(r));
        }),
      },
    });
    const actor = createActor(machine, { input: { vmId: 'v' } });
    const startedEvents: string[] = [];
    actor.on('job.started', (e: WorkspaceEmitted) => startedEvents.push(e.jobId));
    actor.start();
    try {
      actor.send(enqueue('running'));
      for (const id of ['first', 'second', 'third']) actor.send(enqueue(id));
      expect(actor.getSnapshot().context.queue.map((j) => j.jobId)).toEqual(['first', 'second', 'third']);
      const allDone = new Promise<void>((r) => actor.subscribe((s) => s.matches('idle') && s.context.done === 4 && r()));
      // release each job once its runner has been called; the next one starts only then
      for (let i = 0; i < 4; i++) {
        await waitFor(() => release.length > 0);
        release.shift()!();
      }
      await allDone;
      expect(runnerCalls).toEqual(['running', 'first', 'second', 'third']);
      expect(startedEvents).toEqual(['running', 'first', 'second', 'third']);
    } finally {
      actor.stop();
    }
  });
});

async function waitFor(cond: () => boolean, timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('timed out waiting for the next job to start');
    await new Promise((r) => setTimeout(r, 1));
  }
}
