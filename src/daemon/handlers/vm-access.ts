/** What the VM handlers share: a ref to a live actor's id, its view, and waiting for a state with progress. */
import { customAlphabet } from 'nanoid';
import { BangerError } from '../../errors.js';
import type { VmState } from '../../machines/vm.machine.js';
import type { CallContext } from '../../rpc/server.js';
import type { VmView } from '../../rpc/types.js';
import type { DaemonServices } from '../services.js';
import { viewOf } from '../views.js';

/** VM ids and job ids: 10 characters of [0-9a-z]. */
export const newId = customAlphabet('0123456789abcdefghijklmnopqrstuvwxyz', 10);

export interface VmAccess {
  /** The id of the VM a ref names (id, unique id prefix or name), which must have a live actor. */
  resolveVm(ref: string): string;
  view(id: string): VmView;
  /** Wait for one of `states`, forwarding the VM's log rows as progress meanwhile. */
  waitState(id: string, states: VmState[], ctx: CallContext, timeoutMs: number): Promise<VmView>;
  /** How long a boot may take, the guest's own timeout plus room for the host's steps. */
  bootWait(): number;
}

export function vmAccess(d: DaemonServices): VmAccess {
  const { supervisor: sup, store, config } = d;
  return {
    resolveVm(ref) {
      const row = store.findVm(ref);
      if (!sup.has(row.id)) throw new BangerError('not_found', `vm ${row.name} has no live actor (its snapshot could not be restored)`, 'see the daemon log; banger vm delete is the way out');
      return row.id;
    },
    view: (id) => viewOf(sup.snapshot(id)),
    async waitState(id, states, ctx, timeoutMs) {
      const off = sup.onLog((row) => {
        if (row.vmId === id) ctx.progress({ stage: row.stage, status: row.status, ms: row.durationMs ?? undefined, detail: row.message ?? undefined });
      });
      try {
        return viewOf(await sup.waitFor(id, states, timeoutMs, ctx.signal));
      } finally {
        off();
      }
    },
    bootWait: () => config.bootTimeoutMs + 300_000,
  };
}
