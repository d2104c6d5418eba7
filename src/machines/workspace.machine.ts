/**
 * The workspace sub-actor of a running VM: its FIFO queue of prepare and export jobs, run one at a time
 * (see job-queue.machine.ts). The VM forwards ENQUEUE to it only while `running`; when the VM leaves
 * `running` it stops this actor, which aborts the running job's AbortSignal, and fails every pending job.
 */
import { createJobQueueMachine, type Job } from './job-queue.machine.js';

export type JobKind = 'prepare' | 'export';
export type WorkspaceJob = Job<JobKind>;
export type { Job, JobQueueEmitted as WorkspaceEmitted, RunJobInput } from './job-queue.machine.js';

export const workspaceMachine = createJobQueueMachine('workspace');
export type WorkspaceMachine = typeof workspaceMachine;
