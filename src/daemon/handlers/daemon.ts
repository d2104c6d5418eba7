/** daemon.status, daemon.stop and doctor.run. */
import type { Handlers } from '../../rpc/server.js';
import { runDoctor } from '../doctor.js';
import type { DaemonServices, HandlerDeps } from '../services.js';
import { viewOf } from '../views.js';

export function daemonHandlers(d: DaemonServices, deps: HandlerDeps): Pick<Handlers, 'daemon.status' | 'daemon.stop' | 'doctor.run'> {
  const { supervisor: sup, layout } = d;
  return {
    'daemon.status': async () => ({
      pid: process.pid,
      socket: layout.socket,
      version: deps.version,
      commit: deps.commit,
      uptimeSeconds: Math.round((Date.now() - d.startedAt) / 1000),
      vms: sup.ids().length,
      home: layout.home,
      running: sup.ids().filter((id) => viewOf(sup.snapshot(id)).state === 'running').length,
      rootHelper: d.rootHelper ? { socket: d.helperSocket, ...d.rootHelper.state() } : null,
      tapPool: d.tapPool ? d.tapPool.leases() : null,
      inspector: d.inspector ? `ws://127.0.0.1:${d.inspector.port}` : null,
      warmPool: d.warmPool?.status() ?? [],
    }),

    'daemon.stop': async () => {
      setTimeout(() => {
        void d.stop().then(() => process.exit(0));
      }, 50);
      return { stopping: true, pid: process.pid };
    },

    'doctor.run': async () => runDoctor(d, deps),
  };
}
