/** Runs workspace jobs (prepare/export) against a running VM over SSH. */
import { BangerError } from '../errors.js';
import type { Supervisor } from '../actors/supervisor.js';
import { sshTargetFor, type StepEnv } from '../actors/vm-steps.js';
import type { JobRunners } from '../actors/workspace-jobs.js';
import { testStageDelay } from '../actors/fault-injection.js';
import { exec as sshExec } from '../host/guest/ssh.js';
import { exportWorkspace, prepareWorkspace, type GuestExec } from '../host/guest/workspace.js';

export function makeJobRunners(sup: () => Supervisor, env: StepEnv): JobRunners {
  return {
    async run(vmId, job, { signal, progress }) {
      await testStageDelay(job.kind, signal); // test hook, see fault-injection.ts
      const snap = sup().snapshot(vmId);
      const ctx = snap.context;
      if (!ctx.runtime) throw new BangerError('invalid_state', `vm ${ctx.name} is not running`);
      const target = await sshTargetFor(env, ctx, ctx.runtime);
      const guest: GuestExec = (command, opts = {}) =>
        sshExec(target, command, { stdin: opts.stdin, signal: opts.signal ?? signal }).then((r) => ({ exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr }));
      const p = job.params as Record<string, any>;
      if (job.kind === 'prepare') {
        const result = await prepareWorkspace(
          guest,
          { source: p.source, guestPath: p.guestPath, branch: p.branch, from: p.from, mode: p.mode, readOnly: p.readOnly, replace: p.replace },
          { signal, onProgress: (pr) => progress({ stage: pr.stage, bytes: pr.bytes }), runner: env.runner },
        );
        return { ...result, vmId };
      }
      const r = await exportWorkspace(guest, { guestPath: p.guestPath, baseCommit: p.baseCommit }, { signal, runner: env.runner });
      const utf8 = r.patch.toString('utf8');
      const binarySafe = Buffer.from(utf8, 'utf8').equals(r.patch);
      return {
        guestPath: r.guestPath,
        baseCommit: r.baseCommit,
        patch: binarySafe ? utf8 : r.patch.toString('base64'),
        patchEncoding: binarySafe ? 'utf8' : 'base64',
        changedFiles: r.changedFiles,
        hasChanges: r.hasChanges,
      };
    },
  };
}
