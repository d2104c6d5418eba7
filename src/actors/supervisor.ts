/**
 * The daemon's actor system (src/machines/daemon.machine.ts) bound to the host: one root actor, every VM a
 * child of it (systemId `vm:<id>`), the root helper and the TAP pool beside them. This class is the door to
 * that system for the RPC handlers — it holds no actors of its own; everything is found with `system.get`.
 *
 * Observers of the system, one job each:
 *  - persistence (VmPersistence): each VM's snapshot written with the event-log row of the event that caused
 *    it, in one SQLite transaction; the same transitions are announced to `banger inspect`;
 *  - the live inspector (`daemon start --inspect`), when one is served.
 */
import { createActor, type Actor, type InspectionEvent, type Observer, type Snapshot } from 'xstate';
import { nanoid } from 'nanoid';
import { BangerError } from '../errors.js';
import type { LogRow } from '../store/repo.js';
import { daemonMachine, restoredDaemonSnapshot, tapPoolMachine, vmActorId, type DaemonMachine } from '../machines/daemon.machine.js';
import type { rootHelperMachine } from '../machines/root-helper.machine.js';
import { vmMachine, type VmActorRef, type VmEvent, type VmInput, type VmSnapshot, type VmState } from '../machines/vm.machine.js';
import { workspaceMachine, type JobKind } from '../machines/workspace.machine.js';
import type { StepEnv } from './vm-steps.js';
import { makeSteps } from './steps.js';
import { makeRunJob, type JobRunners } from './workspace-jobs.js';
import { JobProgress, runQueuedJob, type JobProgressUpdate } from './job-results.js';
import { VmPersistence, type Transition } from './persistence.js';

export type { Transition };

const stateOf = (s: { value: unknown }): VmState => (typeof s.value === 'string' ? s.value : Object.keys(s.value as object)[0]) as VmState;

export interface SupervisorOptions {
  /** Tests hand in fake steps here instead of mocking modules. */
  steps?: Partial<ReturnType<typeof makeSteps>>;
  /** The root helper's and the TAP pool's logic (src/actors/root-helper.ts, tap-pool.ts), when this daemon has them. */
  infra?: { rootHelper: typeof rootHelperMachine; tapPool: typeof tapPoolMachine };
  /** The live inspector's observer. */
  inspect?: Observer<InspectionEvent>;
}

/** The supervisor calls the daemon's handlers make. */
export type VmSupervisor = Pick<Supervisor, 'has' | 'create' | 'send' | 'snapshot' | 'ids' | 'waitFor' | 'onLog' | 'onTransition' | 'runJob'>;

export class Supervisor {
  /** This daemon run: a job restored from an earlier run has no requester left (see workspace-jobs.ts). */
  readonly session = nanoid(10);
  readonly progress = new JobProgress();
  private readonly persistence: VmPersistence;
  private readonly machine: DaemonMachine;
  private readonly vmLogic: typeof vmMachine;
  private root?: Actor<DaemonMachine>;
  private logListeners = new Set<(row: LogRow) => void>();

  constructor(
    private env: StepEnv,
    jobRunners: JobRunners,
    private opts: SupervisorOptions = {},
  ) {
    const baseLog = env.log;
    env.log = (vmId, stage, status, ms, message) => {
      baseLog?.(vmId, stage, status, ms, message);
      const row = env.store.log(vmId, stage, status, ms, message);
      for (const l of this.logListeners) l(row);
    };
    const workspace = workspaceMachine.provide({ actors: { runJob: makeRunJob(jobRunners, env, this.session, this.progress) } });
    this.vmLogic = vmMachine.provide({ actors: { ...makeSteps(env), ...opts.steps, workspace } });
    this.machine = daemonMachine.provide({ actors: { vm: this.vmLogic, ...opts.infra } });
    this.persistence = new VmPersistence(env.store, (vmId) => this.ref(vmId), (vmId) => this.root?.send({ type: 'VM.FORGET', vmId }));
  }

  /** Start the system: a new root with every persisted VM restored as its child (and whatever step it had in flight). */
  start(): { restored: number; errors: string[] } {
    const { vms, errors } = this.restorable();
    const observers = [this.persistence.observer, this.opts.inspect].filter((o): o is Observer<InspectionEvent> => !!o);
    this.root = createActor(this.machine, {
      snapshot: restoredDaemonSnapshot(vms) as never,
      systemId: 'daemon',
      inspect: (ev) => observers.forEach((o) => o.next?.(ev)),
    });
    this.root.subscribe({ error: (e) => process.stderr.write(`banger: the daemon's actor system failed: ${(e as Error)?.message ?? e}\n`) });
    this.root.start();
    return { restored: vms.length, errors };
  }

  /** Every live VM whose snapshot can be restored; the others are marked failed, with the reason. */
  private restorable(): { vms: Array<{ id: string; snapshot: Snapshot<unknown> }>; errors: string[] } {
    const vms: Array<{ id: string; snapshot: Snapshot<unknown> }> = [];
    const errors: string[] = [];
    for (const row of this.env.store.listVms()) {
      try {
        if (!row.snapshot) throw new Error('it never persisted a snapshot: nothing was started for it');
        const snapshot = JSON.parse(row.snapshot) as Snapshot<unknown>;
        createActor(this.vmLogic, { snapshot, input: undefined } as never); // throws on a snapshot it cannot restore
        vms.push({ id: row.id, snapshot });
      } catch (e) {
        this.env.store.recordTransition(row.id, { actor: vmActorId(row.id), type: 'daemon.restore', payload: { error: (e as Error).message }, to: 'failed' }, 'failed', null);
        errors.push(`${row.name}: ${(e as Error).message}`);
      }
    }
    return { vms, errors };
  }

  /** The system, for the parts that find their actors in it (root helper, TAP pool). */
  get system(): Actor<DaemonMachine>['system'] {
    return this.started().system;
  }

  /** Turn the root helper and the TAP pool on (once tap networking is wanted). */
  enableRootHelper(): void {
    this.started().send({ type: 'HELPER.ENABLE' });
  }

  onTransition(fn: (t: Transition) => void): () => void {
    return this.persistence.onTransition(fn);
  }

  onLog(fn: (row: LogRow) => void): () => void {
    this.logListeners.add(fn);
    return () => this.logListeners.delete(fn);
  }

  create(input: VmInput): void {
    this.env.store.insertVm({ id: input.id, name: input.name, image: input.spec.image, createdAt: input.createdAt, state: 'creating' });
    this.started().send({ type: 'VM.SPAWN', input });
  }

  has(id: string): boolean {
    return !!this.ref(id);
  }

  snapshot(id: string): VmSnapshot {
    return this.actor(id).getSnapshot();
  }

  ids(): string[] {
    return Object.keys(this.started().getSnapshot().children).flatMap((k) => (k.startsWith('vm:') ? [k.slice(3)] : []));
  }

  /** Deliver a lifecycle event; refused with the current state named when the machine would ignore it. */
  send(id: string, event: VmEvent): void {
    const snap = this.snapshot(id);
    if (!snap.can(event)) {
      const name = snap.context.name;
      throw new BangerError('invalid_state', `cannot ${event.type.toLowerCase()} vm ${name}: it is ${stateOf(snap)}`, hintFor(event.type, stateOf(snap), name));
    }
    this.actor(id).send(event);
  }

  /** Queue a workspace job on the VM and wait for its result (a `job.done` / `job.failed` event of the VM). */
  async runJob(id: string, kind: JobKind, params: Record<string, unknown>, onProgress: (p: JobProgressUpdate) => void): Promise<unknown> {
    const job = { jobId: `${kind}-${nanoid(10)}`, kind, params, enqueuedAt: new Date().toISOString(), session: this.session };
    const snap = this.snapshot(id);
    if (!snap.can({ type: 'ENQUEUE', job })) {
      throw new BangerError('invalid_state', `vm ${snap.context.name} is ${stateOf(snap)}: workspace jobs need a running VM`, `start it: banger vm start ${snap.context.name}`);
    }
    const stopListening = this.progress.listen(job.jobId, onProgress);
    try {
      return await runQueuedJob(this.actor(id), job);
    } finally {
      stopListening();
    }
  }

  /** Wait until the VM reaches one of `states` (or a terminal failure); bounded by timeoutMs. */
  waitFor(id: string, states: VmState[], timeoutMs: number, signal?: AbortSignal): Promise<VmSnapshot> {
    const a = this.actor(id);
    return new Promise((resolve, reject) => {
      const finish = (f: () => void) => {
        clearTimeout(timer);
        sub.unsubscribe();
        signal?.removeEventListener('abort', onAbort);
        f();
      };
      const check = (s: VmSnapshot) => {
        const st = stateOf(s);
        if (states.includes(st)) finish(() => resolve(s));
        else if (st === 'failed' && !states.includes('failed')) finish(() => reject(failedError(s)));
        else if (st === 'deleted' && !states.includes('deleted')) finish(() => reject(new BangerError('not_found', `vm ${s.context.name} was deleted`)));
      };
      const onAbort = () => finish(() => reject(new BangerError('aborted', 'the request was cancelled')));
      const timer = setTimeout(() => finish(() => reject(new BangerError('timeout', `vm ${a.getSnapshot().context.name} did not reach ${states.join('/')} within ${Math.round(timeoutMs / 1000)} s (it is ${stateOf(a.getSnapshot())})`))), timeoutMs);
      signal?.addEventListener('abort', onAbort);
      const sub = a.subscribe((s) => check(s));
      check(a.getSnapshot());
    });
  }

  /** Stop the system without touching the VMs: persisted snapshots stay as they were (daemon shutdown). */
  detachAll(): void {
    this.persistence.pause();
    this.root?.stop();
  }

  private started(): Actor<DaemonMachine> {
    if (!this.root) throw new Error('the actor system is not started');
    return this.root;
  }

  private ref(id: string): VmActorRef | undefined {
    return this.root?.system.get(vmActorId(id)) as VmActorRef | undefined;
  }

  private actor(id: string): VmActorRef {
    const a = this.ref(id);
    if (!a) throw new BangerError('not_found', `vm ${id} has no live actor`);
    return a;
  }
}

function failedError(s: VmSnapshot): BangerError {
  const err = s.context.error;
  return new BangerError('host', `vm ${s.context.name} failed while ${err?.stage ?? 'working'}: ${err?.message ?? 'unknown error'}`, `see banger vm logs ${s.context.name}`);
}

function hintFor(type: string, state: string, name: string): string {
  if (type === 'START' && state === 'running') return `it is already running; banger vm restart ${name} restarts it`;
  if (type === 'SET') return `stop it first: banger vm stop ${name}`;
  if (type === 'DELETE') return `wait until it is running, stopped or failed (banger vm show ${name}), then delete it`;
  if (type === 'STOP') return `it is not running`;
  if (type === 'SNAPSHOT') return `a snapshot needs a running VM: banger vm start ${name}`;
  return `see banger vm show ${name}`;
}

