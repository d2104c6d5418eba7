/**
 * Bridges the workspace machine's `runJob` actor and the RPC requests waiting on job results.
 * A job whose requester is gone (the daemon restarted while it was queued or in flight) fails clearly
 * instead of silently running again or being lost.
 */
import { fromPromise } from 'xstate';
import { BangerError, errorMessage } from '../errors.js';
import type { Job, RunJobInput } from '../machines/workspace.machine.js';
import type { StepEnv } from './vm-steps.js';

export interface JobProgress {
  stage: string;
  bytes?: number;
  detail?: string;
}

export interface JobRunners {
  run(vmId: string, job: Job, ctx: { signal: AbortSignal; progress: (p: JobProgress) => void }): Promise<unknown>;
}

interface Entry {
  vmId: string;
  job: Job;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  progress: (p: JobProgress) => void;
  started: boolean;
}

export class JobRegistry {
  private entries = new Map<string, Entry>();

  /** Register a job before it is enqueued; the returned promise settles with the job's result. */
  register(vmId: string, job: Job, progress: (p: JobProgress) => void = () => {}): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.entries.set(job.jobId, { vmId, job, resolve, reject, progress, started: false });
    });
  }

  get(jobId: string): Entry | undefined {
    return this.entries.get(jobId);
  }

  settle(jobId: string, ok: boolean, value: unknown): void {
    const e = this.entries.get(jobId);
    if (!e) return;
    this.entries.delete(jobId);
    if (ok) e.resolve(value);
    else e.reject(value);
  }

  /** Fail every job of a VM (it stopped, restarted or was deleted). */
  failAll(vmId: string, why: string): void {
    for (const [id, e] of this.entries) {
      if (e.vmId !== vmId) continue;
      this.entries.delete(id);
      e.reject(new BangerError('aborted', `${e.job.kind} job ${id} failed: ${why}`, 'start the VM and run the job again'));
    }
  }

  pending(vmId: string): number {
    let n = 0;
    for (const e of this.entries.values()) if (e.vmId === vmId) n++;
    return n;
  }
}

export function makeRunJob(registry: JobRegistry, runners: JobRunners, env: Pick<StepEnv, 'log'>) {
  return fromPromise<unknown, RunJobInput>(async ({ input: { vmId, job }, signal }) => {
    const entry = registry.get(job.jobId);
    if (!entry) {
      const msg = `${job.kind} job ${job.jobId} was queued or running when the daemon restarted; its requester is gone, so it was not run again — run it again`;
      env.log(vmId, `workspace.${job.kind}`, 'error', undefined, msg);
      throw new BangerError('aborted', msg);
    }
    entry.started = true;
    const t0 = performance.now();
    env.log(vmId, `workspace.${job.kind}`, 'start', undefined, job.jobId);
    try {
      const out = await runners.run(vmId, job, { signal, progress: entry.progress });
      if (signal.aborted) throw signal.reason ?? new BangerError('aborted', 'job aborted');
      env.log(vmId, `workspace.${job.kind}`, 'done', Math.round(performance.now() - t0), job.jobId);
      registry.settle(job.jobId, true, out);
      return out;
    } catch (e) {
      const err = signal.aborted
        ? new BangerError('aborted', `${job.kind} job ${job.jobId} aborted: the vm stopped while it ran`, 'start the VM and run the job again')
        : e;
      env.log(vmId, `workspace.${job.kind}`, 'error', Math.round(performance.now() - t0), errorMessage(err));
      registry.settle(job.jobId, false, err);
      throw err;
    }
  });
}
