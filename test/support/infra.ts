/** Runs a RootHelper (and a TapPool) as the daemon does: children of a daemon root actor, attached to their links. */
import { createActor } from 'xstate';
import { daemonMachine } from '../../src/machines/daemon.machine.js';
import type { RootHelper } from '../../src/actors/root-helper.js';
import type { TapPool } from '../../src/actors/tap-pool.js';

/** Start the system; returns its stop (for the test's cleanups). */
export function runInSystem(helper: RootHelper, pool?: TapPool): () => void {
  const root = createActor(daemonMachine.provide({ actors: { rootHelper: helper.logic, ...(pool ? { tapPool: pool.logic } : {}) } }));
  root.start();
  root.send({ type: 'HELPER.ENABLE' });
  helper.attach(root.system.get('rootHelper'));
  pool?.attach(root.system.get('tapPool'));
  return () => root.stop();
}
