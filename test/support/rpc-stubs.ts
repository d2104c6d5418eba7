/** A full handler map for tests that run a real RpcServer: the methods a test gives, and a loud failure for the rest. */
import { BangerError } from '../../src/errors.js';
import { methods, type MethodName } from '../../src/rpc/protocol.js';
import type { Handlers } from '../../src/rpc/server.js';
import type { DaemonStatus } from '../../src/rpc/types.js';

export function stubHandlers(given: Partial<Handlers>): Handlers {
  const notStubbed = (method: string) => async () => {
    throw new BangerError('internal', `${method} is not stubbed in this test`);
  };
  const all = Object.fromEntries((Object.keys(methods) as MethodName[]).map((m) => [m, given[m] ?? notStubbed(m)]));
  // Every method of the protocol is there, from `given` (typed by Handlers) or the thrower.
  return all as unknown as Handlers;
}

export function fakeStatus(over: Partial<DaemonStatus> = {}): DaemonStatus {
  return { pid: process.pid, socket: '/nowhere/daemon.sock', version: 'test', commit: 'test', uptimeSeconds: 0, vms: 0, home: '/nowhere', running: 0, rootHelper: null, tapPool: null, inspector: null, ...over };
}
