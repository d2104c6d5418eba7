/**
 * What the daemon does on a VM actor's transitions, outside the machine: a VM with no guest left to talk to has its
 * pooled SSH connections closed (a tap guest's never close by themselves), and a deleted VM's job runners forget it.
 */
import type { Transition } from '../rpc/types.js';

/** A VM's states with no guest to talk to: its pooled SSH connections are closed on the way in. */
export const VM_DOWN: ReadonlySet<string> = new Set(['stopping', 'stopped', 'failed', 'deleting', 'deleted']);

export function vmTransitionHooks(ssh: { drop(vmId: string): void }, jobs: { forget(vmId: string): void }): (t: Transition) => void {
  return (t) => {
    if (!t.actor.startsWith('vm:')) return;
    if (VM_DOWN.has(t.to)) ssh.drop(t.vmId);
    if (t.to === 'deleted') jobs.forget(t.vmId);
  };
}
