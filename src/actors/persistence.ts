/**
 * Persistence of the VM actors, as an observer of the actor system's inspection events: after every
 * transition of a VM (or of its workspace queue) the VM's persisted snapshot is written together with the
 * event-log row of the event that caused it, in one SQLite transaction. The same transition is announced to
 * `banger inspect`. A VM that reaches `deleted` is then let go of by its parent.
 */
import type { InspectionEvent, Observer } from 'xstate';
import type { Store } from '../store/repo.js';
import type { VmActorRef, VmSnapshot } from '../machines/vm.machine.js';
import type { Transition } from '../rpc/types.js';

export type { Transition };

const stateOf = (s: { value: unknown }): string => (typeof s.value === 'string' ? s.value : Object.keys(s.value as object)[0]);

/** The VM an inspected actor belongs to, and how it is labelled in the event log. */
function ownerOf(ev: InspectionEvent & { type: '@xstate.snapshot' }): { vmId: string; label: string } | undefined {
  const id = (ev.actorRef as unknown as { id: string }).id;
  if (id.startsWith('vm:')) return { vmId: id.slice(3), label: id };
  if (id !== 'workspace') return undefined;
  const owner = (ev.snapshot as { context?: { owner?: string } }).context?.owner;
  return owner ? { vmId: owner, label: `workspace:${owner}` } : undefined;
}

/** What an event's payload may put in the log: job results (a patch can be large) are summarised, errors flattened. */
function logged(event: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(event)) {
    if (k === 'type') continue;
    if (k === 'error') out.error = v instanceof Error ? { message: v.message } : v;
    else if (k === 'output' && event.type === 'JOB.SETTLED') out.output = '(the job result is returned to its requester, not logged)';
    else out[k] = v;
  }
  return out;
}

export class VmPersistence {
  private lastState = new Map<string, string>();
  private listeners = new Set<(t: Transition) => void>();
  private paused = false;

  constructor(
    private store: Store,
    private vm: (vmId: string) => VmActorRef | undefined,
    private forget: (vmId: string) => void,
  ) {}

  readonly observer: Observer<InspectionEvent> = {
    next: (ev) => {
      if (ev.type === '@xstate.snapshot' && !this.paused) this.record(ev);
    },
  };

  onTransition(fn: (t: Transition) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Stop writing (daemon shutdown): what is persisted stays as it was. */
  pause(): void {
    this.paused = true;
  }

  private record(ev: InspectionEvent & { type: '@xstate.snapshot' }): void {
    const owner = ownerOf(ev);
    if (!owner) return;
    // A VM that reached its final state has already left the system's registry: its own ref is the event's.
    const vm = owner.label.startsWith('vm:') ? (ev.actorRef as unknown as VmActorRef) : this.vm(owner.vmId);
    if (!vm) return;
    const to = stateOf(ev.snapshot as unknown as { value: unknown });
    const from = this.lastState.get(owner.label) ?? null;
    this.lastState.set(owner.label, to);
    const event = ev.event as { type: string } & Record<string, unknown>;
    const vmSnap = (owner.label.startsWith('vm:') ? ev.snapshot : vm.getSnapshot()) as VmSnapshot;
    try {
      this.store.recordTransition(owner.vmId, { actor: owner.label, type: event.type, payload: logged(event), from: from ?? undefined, to }, stateOf(vmSnap), vm.getPersistedSnapshot(), vmSnap.context.name);
    } catch (e) {
      process.stderr.write(`banger: could not persist ${owner.label}: ${(e as Error).message}\n`);
    }
    const t: Transition = { time: new Date().toISOString(), vmId: owner.vmId, vmName: vmSnap.context.name, actor: owner.label, event: event.type, from, to };
    for (const l of this.listeners) l(t);
    if (owner.label.startsWith('vm:') && to === 'deleted') queueMicrotask(() => this.forget(owner.vmId));
  }
}
