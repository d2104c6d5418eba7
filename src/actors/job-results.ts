/**
 * How a caller gets a job's result: it listens on the actor that owns the queue (a VM, or the tapPool) for
 * the job's `job.done` / `job.failed` event, then sends ENQUEUE. Results travel as emitted events; nothing
 * else holds a promise per job. Progress, which is frequent and never persisted, goes through JobProgress.
 */
import type { AnyActorRef } from 'xstate';
import { BangerError, type ErrorKind } from '../errors.js';
import type { Job, JobError, JobQueueEmitted } from '../machines/job-queue.machine.js';

export function errorFromJob(e: JobError): BangerError {
  return new BangerError((e.kind as ErrorKind | undefined) ?? 'host', e.message, e.hint);
}

/** Enqueue `job` on `owner` and resolve with its output (or reject with its error). */
export function runQueuedJob(owner: AnyActorRef, job: Job): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const subs = [
      owner.on('job.done', (e: JobQueueEmitted & { type: 'job.done' }) => e.jobId === job.jobId && settle(() => resolve(e.output))),
      owner.on('job.failed', (e: JobQueueEmitted & { type: 'job.failed' }) => e.jobId === job.jobId && settle(() => reject(errorFromJob(e.error)))),
    ];
    const settle = (f: () => void) => {
      for (const s of subs) s.unsubscribe();
      f();
    };
    owner.send({ type: 'ENQUEUE', job });
  });
}

export interface JobProgressUpdate {
  stage: string;
  bytes?: number;
  detail?: string;
}

/** Progress of running jobs, by job id, to the request waiting on each. */
export class JobProgress {
  private listeners = new Map<string, (p: JobProgressUpdate) => void>();

  listen(jobId: string, fn: (p: JobProgressUpdate) => void): () => void {
    this.listeners.set(jobId, fn);
    return () => this.listeners.delete(jobId);
  }

  report(jobId: string, p: JobProgressUpdate): void {
    this.listeners.get(jobId)?.(p);
  }
}
