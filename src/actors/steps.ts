/**
 * The VM machine's steps (src/machines/vm.machine.ts), each an actor over the host layer: vm-steps.ts for a VM's
 * own lifecycle, snapshot-steps.ts for snapshots, restores and forks.
 */
import { fromPromise } from 'xstate';
import type { BootOutput, PrepareDisksOutput, StepInput, WatchOutput } from '../machines/vm.machine.js';
import { testStageDelay } from './fault-injection.js';
import { makeSnapshotSteps } from './snapshot-steps.js';
import { applyVmSettings, bootVm, destroyVm, makeWorkDisk, prepareFreshDisks, stopVm, watchVm, type StepEnv } from './vm-steps.js';

export function makeSteps(env: StepEnv) {
  const snapshots = makeSnapshotSteps(env);
  const prepareDisks = fromPromise<PrepareDisksOutput, StepInput>(async ({ input: { ctx }, signal }) => {
    await testStageDelay('creating', signal); // test hook, see fault-injection.ts
    return ctx.spec.restore ? snapshots.prepareRestoreDisks(ctx, signal) : prepareFreshDisks(env, ctx, signal);
  });

  const applyWorkSeed = fromPromise<void, StepInput>(async ({ input: { ctx }, signal }) => {
    await testStageDelay('applyingWorkSeed', signal); // test hook, see fault-injection.ts
    await makeWorkDisk(env, ctx, signal);
  });

  const boot = fromPromise<BootOutput, StepInput>(async ({ input: { ctx }, signal }) => {
    await testStageDelay('booting', signal); // test hook, see fault-injection.ts
    return bootVm(env, ctx, signal);
  });

  const watchVmm = fromPromise<WatchOutput, StepInput>(({ input: { ctx }, signal }) => watchVm(env, ctx, signal));

  const stopVmm = fromPromise<void, StepInput>(({ input: { ctx }, signal }) => stopVm(env, ctx, signal));

  const applySettings = fromPromise<void, StepInput>(({ input: { ctx }, signal }) => applyVmSettings(env, ctx, signal));

  const destroy = fromPromise<void, StepInput>(({ input: { ctx } }) => destroyVm(env, ctx));

  return { prepareDisks, applyWorkSeed, boot, watchVmm, stopVmm, applySettings, destroy, restore: snapshots.restore, takeSnapshot: snapshots.takeSnapshot };
}
