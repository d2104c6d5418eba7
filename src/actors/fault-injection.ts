/**
 * TEST HOOK — not a feature. `BANGER_TEST_STAGE_DELAY=<stage>:<ms>[,<stage>:<ms>...]` in the daemon's
 * environment makes the named step wait that long before it does anything, so that the crash tests
 * (test/e2e/crash.test.ts) can SIGKILL the daemon while a VM is in a state that normally lasts milliseconds.
 * Stages: the VM states whose step starts with a call to testStageDelay (creating, applyingWorkSeed,
 * booting, stopping, reconfiguring, deleting) and the workspace jobs (prepare, export).
 * Unset (always, outside tests) it costs one map lookup. The wait ends early when the step is aborted.
 */
import { BangerError } from '../errors.js';
import { sleep } from '../host/exec/wait.js';

const ENV = 'BANGER_TEST_STAGE_DELAY';
let delays: Map<string, number> | undefined;

export function parseStageDelays(text: string | undefined): Map<string, number> {
  const out = new Map<string, number>();
  for (const part of (text ?? '').split(',').map((p) => p.trim()).filter(Boolean)) {
    const m = /^([A-Za-z]+):(\d{1,7})$/.exec(part);
    if (!m) throw new BangerError('usage', `${ENV}: ${JSON.stringify(part)} is not <stage>:<ms>`, `e.g. ${ENV}=booting:3000,deleting:3000`);
    out.set(m[1], Number(m[2]));
  }
  return out;
}

/** Wait as long as BANGER_TEST_STAGE_DELAY asks for this stage (read once per process); 0 when unset. */
export async function testStageDelay(stage: string, signal?: AbortSignal): Promise<void> {
  delays ??= parseStageDelays(process.env[ENV]);
  const ms = delays.get(stage);
  if (ms) await sleep(ms, signal);
}
