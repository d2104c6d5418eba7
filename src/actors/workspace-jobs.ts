/**
 * The workspace machine's `runJob` actor. A job restored from an earlier daemon session (the daemon died while
 * it was queued or in flight) has no requester left: it fails clearly instead of silently running again.
 */
import { fromPromise } from 'xstate';
import { BangerError, errorMessage } from '../errors.js';
import type { Job, RunJobInput } from '../machines/job-queue.machine.js';
import type { JobProgress, JobProgressUpdate } from './job-results.js';
import type { StepEnv } from './vm-steps.js';

export interface JobRunners {
  run(vmId: string, job: Job, ctx: { signal: AbortSignal; progress: (p: JobProgressUpdate) => void }): Promise<unknown>;
}

export function makeRunJob(runners: JobRunners, env: Pick<StepEnv, 'log'>, session: string, progress: JobProgress) {
  return fromPromise<unknown, RunJobInput>(async ({ input: { owner: vmId, job }, signal }) => {
    const step = `workspace.${job.kind}`;
    if (job.session !== session) {
      const msg = `${job.kind} job ${job.jobId} was queued or running when the daemon restarted; its requester is gone, so it was not run again — run it again`;
      env.log(vmId, step, 'error', undefined, msg);
      throw new BangerError('aborted', msg);
    }
    const t0 = performance.now();
    env.log(vmId, step, 'start', undefined, job.jobId);
    try {
      const out = await runners.run(vmId, job, { signal, progress: (p) => progress.report(job.jobId, p) });
      if (signal.aborted) throw signal.reason ?? new BangerError('aborted', 'job aborted');
      env.log(vmId, step, 'done', Math.round(performance.now() - t0), job.jobId);
      return out;
    } catch (e) {
      const err = signal.aborted ? new BangerError('aborted', `${job.kind} job ${job.jobId} aborted: the vm stopped while it ran`, 'start the VM and run the job again') : e;
      env.log(vmId, step, 'error', Math.round(performance.now() - t0), errorMessage(err));
      throw err;
    }
  });
}
