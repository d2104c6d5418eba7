/**
 * The supervisor: owns every VM actor (systemId `vm:<id>`), persists each actor's snapshot together with the
 * event-log row of the event that caused it (one SQLite transaction), restores them all on daemon start,
 * and fans live transitions out to `banger inspect`.
 */
import { createActor, type InspectionEvent, type Snapshot } from 'xstate';
import { BangerError } from '../errors.js';
import type { LogRow, Store } from '../store/repo.js';
import { SETTLED_STATES, vmMachine, type GitIdentity, type VmActorRef, type VmContext, type VmEvent, type VmInput, type VmSnapshot, type VmState } from '../machines/vm.machine.js';
import { workspaceMachine, type Job } from '../machines/workspace.machine.js';
import { makeSteps, type StepEnv } from './vm-steps.js';
import { JobRegistry, makeRunJob, type JobRunners } from './workspace-jobs.js';

export interface Transition {
  time: string;
  vmId: string;
  vmName: string;
  actor: string;
  event: string;
  from: string | null;
  to: string;
}

export interface VmView {
  id: string;
  name: string;
  state: VmState;
  image: string;
  vmm: string;
  accel: string;
  net: string;
  vcpus: number;
  memoryMiB: number;
  diskBytes: number;
  guestIp: string | null;
  sshPort: number | null;
  pid: number | null;
  createdAt: string;
  error: { stage: string; message: string } | null;
  stopReason: string | null;
  /** The guest's git identity and whether it is the host's or banger's default (null: created before it was recorded). */
  gitIdentity: GitIdentity | null;
  workspace?: { queued: number; running: string | null };
}

const stateOf = (s: { value: unknown }): VmState => (typeof s.value === 'string' ? s.value : Object.keys(s.value as object)[0]) as VmState;

export class Supervisor {
  private actors = new Map<string, VmActorRef>();
  private names = new Map<string, string>();
  private lastState = new Map<string, string>();
  private transitionListeners = new Set<(t: Transition) => void>();
  private logListeners = new Set<(row: LogRow) => void>();
  private persisting = true;
  readonly jobs = new JobRegistry();
  private machine;

  constructor(
    private env: StepEnv,
    jobRunners: JobRunners,
    /** Tests hand in fake steps here instead of mocking modules. */
    stepsOverride?: Partial<ReturnType<typeof makeSteps>>,
  ) {
    const store = env.store;
    // Lifecycle log rows are written to the store and fanned out to followers.
    const baseLog = env.log;
    env.log = (vmId, stage, status, ms, message) => {
      baseLog?.(vmId, stage, status, ms, message);
      const row = store.log(vmId, stage, status, ms, message);
      for (const l of this.logListeners) l(row);
    };
    const steps = { ...makeSteps(env), ...stepsOverride };
    this.machine = vmMachine.provide({
      actors: {
        ...steps,
        workspace: workspaceMachine.provide({ actors: { runJob: makeRunJob(this.jobs, jobRunners, env) } }),
      },
    });
  }

  get store(): Store {
    return this.env.store;
  }

  onTransition(fn: (t: Transition) => void): () => void {
    this.transitionListeners.add(fn);
    return () => this.transitionListeners.delete(fn);
  }

  onLog(fn: (row: LogRow) => void): () => void {
    this.logListeners.add(fn);
    return () => this.logListeners.delete(fn);
  }

  /** Restore every VM actor from its persisted snapshot; the restored steps reconcile with reality. */
  restoreAll(): { restored: number; errors: string[] } {
    const errors: string[] = [];
    let restored = 0;
    for (const row of this.store.listVms()) {
      if (!row.snapshot) {
        // Created but never persisted a snapshot: nothing was started for it.
        this.store.recordTransition(row.id, { actor: `vm:${row.id}`, type: 'daemon.restore', payload: {}, to: 'failed' }, 'failed', null);
        errors.push(`${row.name}: no snapshot`);
        continue;
      }
      try {
        const snapshot = JSON.parse(row.snapshot) as Snapshot<unknown>;
        this.startActor(row.id, row.name, { snapshot });
        restored++;
      } catch (e) {
        errors.push(`${row.name}: ${(e as Error).message}`);
      }
    }
    return { restored, errors };
  }

  create(input: VmInput): VmActorRef {
    this.store.insertVm({ id: input.id, name: input.name, image: input.spec.image, createdAt: input.createdAt, state: 'creating' });
    return this.startActor(input.id, input.name, { input });
  }

  private startActor(id: string, name: string, opts: { input?: VmInput; snapshot?: Snapshot<unknown> }): VmActorRef {
    this.names.set(id, name);
    let actor: VmActorRef | undefined;
    const inspect = (ev: InspectionEvent) => {
      if (ev.type !== '@xstate.snapshot' || !actor || !this.persisting) return;
      const isRoot = ev.actorRef === actor;
      const isWorkspace = !isRoot && (ev.actorRef as { id?: string }).id === 'workspace';
      if (!isRoot && !isWorkspace) return;
      const snap = actor.getSnapshot() as VmSnapshot;
      const to = isRoot ? stateOf(ev.snapshot as VmSnapshot) : stateOf(ev.snapshot as unknown as { value: unknown });
      const label = isRoot ? `vm:${id}` : `workspace:${id}`;
      const fromKey = label;
      const from = this.lastState.get(fromKey) ?? null;
      this.lastState.set(fromKey, to);
      const event = ev.event as { type: string } & Record<string, unknown>;
      const { type, ...payload } = event;
      const persisted = isRoot ? (ev.snapshot as VmSnapshot) : snap;
      const rootState = stateOf(persisted);
      try {
        this.store.recordTransition(id, { actor: label, type, payload: scrub(payload), from: from ?? undefined, to }, rootState, actor.getPersistedSnapshot());
      } catch (e) {
        process.stderr.write(`banger: could not persist ${label}: ${(e as Error).message}\n`);
      }
      const t: Transition = { time: new Date().toISOString(), vmId: id, vmName: name, actor: label, event: type, from, to };
      for (const l of this.transitionListeners) l(t);
      if (isRoot && to !== 'running') this.jobs.failAll(id, `vm stopped: ${name} left running (now ${to}) while the job was queued or running`);
      if (isRoot && to === 'deleted') {
        this.actors.delete(id);
      }
    };
    actor = createActor(this.machine, {
      input: opts.input as VmInput,
      snapshot: opts.snapshot as never,
      systemId: `vm:${id}`,
      inspect,
    }) as unknown as VmActorRef;
    this.actors.set(id, actor);
    actor.subscribe({ error: (e) => process.stderr.write(`banger: vm ${name} actor error: ${(e as Error)?.message ?? e}\n`) });
    actor.start();
    return actor;
  }

  has(id: string): boolean {
    return this.actors.has(id);
  }

  actor(id: string): VmActorRef {
    const a = this.actors.get(id);
    if (!a) throw new BangerError('not_found', `vm ${id} has no live actor`);
    return a;
  }

  snapshot(id: string): VmSnapshot {
    return this.actor(id).getSnapshot() as VmSnapshot;
  }

  /** Deliver a lifecycle event; refused with the current state named when the machine would ignore it. */
  send(id: string, event: VmEvent): void {
    const a = this.actor(id);
    const snap = a.getSnapshot() as VmSnapshot;
    if (!snap.can(event)) {
      const name = this.names.get(id) ?? id;
      throw new BangerError('invalid_state', `cannot ${event.type.toLowerCase()} vm ${name}: it is ${stateOf(snap)}`, hintFor(event.type, stateOf(snap), name));
    }
    a.send(event);
  }

  enqueueJob(id: string, job: Job): void {
    const a = this.actor(id);
    const snap = a.getSnapshot() as VmSnapshot;
    const ws = (snap.children as Record<string, { send(e: unknown): void } | undefined>).workspace;
    if (stateOf(snap) !== 'running' || !ws) {
      throw new BangerError('invalid_state', `vm ${this.names.get(id) ?? id} is ${stateOf(snap)}: workspace jobs need a running VM`, `start it: banger vm start ${this.names.get(id) ?? id}`);
    }
    ws.send({ type: 'ENQUEUE', job });
  }

  /** Wait until the VM reaches one of `states` (or a terminal failure); bounded by timeoutMs. */
  waitFor(id: string, states: VmState[], timeoutMs: number, signal?: AbortSignal): Promise<VmSnapshot> {
    const a = this.actor(id);
    return new Promise((resolve, reject) => {
      let done = false;
      const finish = (f: () => void) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        sub.unsubscribe();
        signal?.removeEventListener('abort', onAbort);
        f();
      };
      const check = (s: VmSnapshot) => {
        const st = stateOf(s);
        if (states.includes(st)) finish(() => resolve(s));
        else if (st === 'failed' && !states.includes('failed')) {
          const err = s.context.error;
          finish(() => reject(new BangerError('host', `vm ${s.context.name} failed while ${err?.stage ?? 'working'}: ${err?.message ?? 'unknown error'}`, `see banger vm logs ${s.context.name}`)));
        } else if (st === 'deleted' && !states.includes('deleted')) finish(() => reject(new BangerError('not_found', `vm ${s.context.name} was deleted`)));
      };
      const onAbort = () => finish(() => reject(new BangerError('aborted', 'the request was cancelled')));
      const timer = setTimeout(() => finish(() => reject(new BangerError('timeout', `vm ${this.names.get(id)} did not reach ${states.join('/')} within ${Math.round(timeoutMs / 1000)} s (it is ${stateOf(a.getSnapshot())})`))), timeoutMs);
      signal?.addEventListener('abort', onAbort);
      const sub = a.subscribe((s) => check(s as VmSnapshot));
      check(a.getSnapshot() as VmSnapshot);
    });
  }

  view(id: string): VmView {
    const s = this.snapshot(id);
    return viewOf(s);
  }

  ids(): string[] {
    return [...this.actors.keys()];
  }

  /** Stop every actor without touching the VMs: persisted snapshots stay as they were (daemon shutdown). */
  detachAll(): void {
    this.persisting = false;
    for (const a of this.actors.values()) a.stop();
    this.actors.clear();
  }
}

export function viewOf(s: VmSnapshot): VmView {
  const c: VmContext = s.context;
  const ws = (s.children as Record<string, { getSnapshot(): { context: { queue: unknown[]; current: { kind: string } | null } } } | undefined>).workspace;
  const wsCtx = ws?.getSnapshot().context;
  return {
    id: c.id,
    name: c.name,
    state: stateOf(s),
    image: c.spec.image,
    vmm: c.spec.vmm,
    accel: c.spec.accel,
    net: c.spec.net,
    vcpus: c.spec.vcpus,
    memoryMiB: c.spec.memoryMiB,
    diskBytes: c.spec.diskBytes,
    guestIp: c.runtime?.guestIp ?? c.net?.guestIp ?? null,
    sshPort: c.runtime?.sshPort ?? null,
    pid: c.runtime?.pid ?? null,
    createdAt: c.createdAt,
    error: c.error,
    stopReason: c.stopReason,
    gitIdentity: c.spec.gitIdentity ?? null,
    ...(wsCtx ? { workspace: { queued: wsCtx.queue.length, running: wsCtx.current?.kind ?? null } } : {}),
  };
}

function hintFor(type: string, state: string, name: string): string {
  if (type === 'START' && state === 'running') return `it is already running; banger vm restart ${name} restarts it`;
  if (type === 'SET') return `stop it first: banger vm stop ${name}`;
  if (type === 'DELETE') return `wait until it is running, stopped or failed (banger vm show ${name}), then delete it`;
  if (type === 'STOP') return `it is not running`;
  return `see banger vm show ${name}`;
}

function scrub(payload: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(payload)) {
    if (k === 'error') out.error = v instanceof Error ? { message: v.message } : v;
    else out[k] = v;
  }
  return out;
}

export { SETTLED_STATES };
