/** inspect.subscribe: a hello with the VMs there are, then every state transition until the client goes away. */
import type { Handlers } from '../../rpc/server.js';
import type { DaemonServices } from '../services.js';
import { vmAccess } from './vm-access.js';

export function inspectHandlers(d: DaemonServices): Pick<Handlers, 'inspect.subscribe'> {
  const { supervisor: sup } = d;
  const { resolveVm, view } = vmAccess(d);
  return {
    'inspect.subscribe': async (p, ctx) => {
      const only = p.vm ? resolveVm(p.vm) : undefined;
      ctx.stream({ type: 'hello', vms: sup.ids().map((id) => ({ id, name: view(id).name, state: view(id).state })) });
      await new Promise<void>((resolve) => {
        const off = sup.onTransition((t) => {
          if (!only || t.vmId === only) ctx.stream(t);
        });
        ctx.signal.addEventListener('abort', () => {
          off();
          resolve();
        });
      });
      return null;
    },
  };
}
