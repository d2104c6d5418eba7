/**
 * The daemon's RPC handlers, one module per domain under ./handlers/, assembled here into the full map the
 * server is typed against (a method without its handler does not compile). Each handler is thin: a validated
 * call into the supervisor, the store or the host layer.
 */
import type { Handlers } from '../rpc/server.js';
import { daemonHandlers } from './handlers/daemon.js';
import { guestHandlers } from './handlers/guest.js';
import { imageHandlers } from './handlers/images.js';
import { inspectHandlers } from './handlers/inspect.js';
import { vmInfoHandlers } from './handlers/vm-info.js';
import { vmHandlers } from './handlers/vms.js';
import { workspaceHandlers } from './handlers/workspace.js';
import { snapshotHandlers } from './handlers/snapshots.js';
import { cacheHandlers } from './handlers/cache.js';
import type { DaemonServices, HandlerDeps } from './services.js';

export type { DaemonServices, HandlerDeps } from './services.js';

export function makeHandlers(d: DaemonServices, deps: HandlerDeps): Handlers {
  return {
    ...daemonHandlers(d, deps),
    ...imageHandlers(d),
    ...vmHandlers(d, deps),
    ...vmInfoHandlers(d),
    ...workspaceHandlers(d),
    ...cacheHandlers(d),
    ...inspectHandlers(d),
    ...guestHandlers(d),
    ...snapshotHandlers(d),
  };
}
