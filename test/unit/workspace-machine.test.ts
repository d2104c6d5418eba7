import { describe, expect, it } from 'vitest';
import { createActor, fromPromise, initialTransition, transition } from 'xstate';
import { workspaceMachine, type Job, type WorkspaceEmitted } from '../../src/machines/workspace.machine.js';

const job = (n: number, kind: Job['kind'] = 'prepare'): Job => ({ jobId: `j${n}`, kind, params: { n }, enqueuedAt: '2026-01-01T00:00:00Z' });
const enqueue = (j: Job) => ({ type: 'ENQUEUE' as const, job: j });
const done = (output: unknown = {}) => ({ type: 'xstate.done.actor.job', output, actorId: 'job' }) as never;
const failed = (message: string) => ({ type: 'xstate.error.actor.job', error: new Error(message), actorId: 'job' }) as never;

describe('workspace machine: a FIFO queue, one job at a time', () => {
  it('runs the first job at once and queues the rest in order', () => {
    let [s] = initialTransition(workspaceMachine, { vmId: 'v' });
    expect(s.value).toBe('idle');
    [s] = transition(workspaceMachine, s, enqueue(job(1)));
    expect(s.value).toBe('working');
    expect(s.context.current?.jobId).toBe('j1');
    [s] = transition(workspaceMachine, s, enqueue(job(2)));
    [s] = transition(workspaceMachine, s, enqueue(job(3, 'export')));
    expect(s.context.current?.jobId).toBe('j1');
    expect(s.context.queue.map((j) => j.jobId)).toEqual(['j2', 'j3']);
    [s] = transition(workspaceMachine, s, done());
    expect(s.value).toBe('working');
    expect(s.context.current?.jobId).toBe('j2');
    [s] = transition(workspaceMachine, s, failed('boom'));
    expect(s.context.current?.jobId).toBe('j3');
    expect(s.context.failed).toBe(1);
    [s] = transition(workspaceMachine, s, done());
    expect(s.value).toBe('idle');
    expect(s.context).toMatchObject({ queue: [], current: null, done: 2, failed: 1 });
  });

  it('emits started/done/failed for each job, in order, with a live actor', async () => {
    const order: string[] = [];
    let running = 0;
    let maxRunning = 0;
    const machine = workspaceMachine.provide({
      actors: {
        runJob: fromPromise(async ({ input }) => {
          running++;
          maxRunning = Math.max(maxRunning, running);
          await new Promise((r) => setTimeout(r, 5));
          running--;
          if ((input.job.params as { n: number }).n === 2) throw new Error('second fails');
          return { n: input.job.params };
        }),
      },
    });
    const a = createActor(machine, { input: { vmId: 'v' } });
    const events: WorkspaceEmitted[] = [];
    a.on('*', (e) => events.push(e as WorkspaceEmitted));
    a.start();
    for (const n of [1, 2, 3]) a.send(enqueue(job(n)));
    await new Promise<void>((resolve) => a.subscribe((s) => s.matches('idle') && s.context.done + s.context.failed === 3 && resolve()));
    for (const e of events) order.push(`${e.type}:${e.jobId}`);
    expect(order).toEqual(['job.started:j1', 'job.done:j1', 'job.started:j2', 'job.failed:j2', 'job.started:j3', 'job.done:j3']);
    expect(maxRunning).toBe(1);
    a.stop();
  });

  it('restores a queue from a persisted snapshot and re-runs the job that was in flight', async () => {
    const started: string[] = [];
    const machine = workspaceMachine.provide({
      actors: {
        runJob: fromPromise(async ({ input, signal }) => {
          started.push(input.job.jobId);
          await new Promise((r) => signal.addEventListener('abort', r));
        }),
      },
    });
    const a1 = createActor(machine, { input: { vmId: 'v' } });
    a1.start();
    a1.send(enqueue(job(1)));
    a1.send(enqueue(job(2)));
    const persisted = JSON.parse(JSON.stringify(a1.getPersistedSnapshot()));
    a1.stop();
    started.length = 0;
    const a2 = createActor(machine, { snapshot: persisted, input: { vmId: 'v' } });
    a2.start();
    expect(a2.getSnapshot().value).toBe('working');
    expect(a2.getSnapshot().context.queue.map((j) => j.jobId)).toEqual(['j2']);
    await new Promise((r) => setTimeout(r, 10));
    expect(started).toEqual(['j1']);
    a2.stop();
  });
});
