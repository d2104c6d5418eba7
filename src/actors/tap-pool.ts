/**
 * The tapPool actor: keeps N idle TAP devices warm, leases one to each VM and takes it back, and on daemon
 * start reconciles its leases (SQLite) with the devices that really exist (the root helper's tap.list):
 * devices a VM uses are adopted, strays are deleted — unless some VM could not be inspected, in which case
 * nothing is deleted (lima's reconcile rule). Every change is a job of the `tapPool` queue actor (a child of
 * the daemon's root, see src/machines/daemon.machine.ts): its mailbox runs them one at a time, in order.
 *
 * Ownership: every TAP this pool makes is named `bgtap<tag><random>`, where the tag is derived from the
 * owner's uid and state directory (the helper reports it), and its lease row is written before the device is
 * made. Reconcile deletes only devices it has a lease row for or that carry its tag, among those the helper
 * lists for this owner (tap.list answers only the caller's TAPs, and tap.delete refuses anyone else's):
 * another daemon's TAPs (another user or home) are never touched.
 */
import { randomBytes } from 'node:crypto';
import { nanoid } from 'nanoid';
import { fromPromise, type ActorRefFrom } from 'xstate';
import { BangerError, errorMessage } from '../errors.js';
import { tapPoolMachine } from '../machines/daemon.machine.js';
import type { Job, RunJobInput } from '../machines/job-queue.machine.js';
import { runQueuedJob } from './job-results.js';
import type { DB } from '../store/db.js';
import type { RootHelper } from './root-helper.js';

export interface TapPoolOptions {
  size: number;
  log: (line: string) => void;
  /**
   * This daemon's mark in its TAP names (see ownerTag). By default the one the root helper reports for this
   * socket's owner (ping), which is the only prefix the helper accepts; '' claims every bgtap device (tests).
   */
  tag?: string;
}

const RANDOM_LENGTH = 6;

export { ownerTag } from '../host/net/tap-owner.js';

/** bgtap + tag + random base36 chars: within IFNAMSIZ (15) and TAP_NAME_RE (at most 10 after bgtap). */
export function newTapName(tag = ''): string {
  const len = tag ? RANDOM_LENGTH : 8;
  const n = randomBytes(6).readUIntBE(0, 6).toString(36).padStart(len, '0').slice(-len);
  return `bgtap${tag}${n}`;
}

type TapPoolRef = ActorRefFrom<typeof tapPoolMachine>;
type ReconcileResult = { adopted: string[]; deleted: string[]; forgotten: string[] };
type TapOp =
  | { kind: 'reconcile'; vmTaps: Map<string, string>; inspectable: boolean; liveVms: () => Iterable<string> }
  | { kind: 'lease'; vmId: string }
  | { kind: 'release'; vmId: string }
  | { kind: 'refill' };

export class TapPool {
  /** The queue machine with its job runner, for the daemon's root to run as its `tapPool` child. */
  readonly logic: typeof tapPoolMachine;
  private ref?: TapPoolRef;
  /** Arguments that do not survive an event (functions, maps) wait here, by job id, until their job runs. */
  private ops = new Map<string, TapOp>();
  private stopped = false;
  private tag?: string;

  constructor(
    private db: DB,
    private helper: RootHelper,
    private opts: TapPoolOptions,
  ) {
    this.logic = tapPoolMachine.provide({ actors: { runJob: fromPromise<unknown, RunJobInput>(({ input }) => this.runOp(input.job)) } });
    this.tag = opts.tag;
  }

  /** The owner tag every TAP name carries: given, or asked of the helper once. */
  private async ownTag(): Promise<string> {
    this.tag ??= (await this.helper.request('ping', {})).owner.tag;
    return this.tag;
  }

  /** The live actor, once the daemon's root runs it. */
  attach(ref: TapPoolRef | undefined): void {
    if (!ref) throw new Error('the daemon has no tapPool actor: send HELPER.ENABLE first');
    this.ref = ref;
  }

  private queue<T>(op: TapOp, coalesce = false): Promise<T> {
    if (!this.ref) return Promise.reject(new BangerError('unsupported', 'tap networking is not enabled in this daemon', 'use --net user'));
    const job: Job = { jobId: `${op.kind}-${nanoid(8)}`, kind: op.kind, params: 'vmId' in op ? { vmId: op.vmId } : {}, enqueuedAt: new Date().toISOString(), coalesce };
    this.ops.set(job.jobId, op);
    return runQueuedJob(this.ref, job).finally(() => this.ops.delete(job.jobId)) as Promise<T>;
  }

  private async runOp(job: Job): Promise<unknown> {
    const op = this.ops.get(job.jobId);
    if (!op) throw new BangerError('aborted', `TAP ${job.kind} ${job.jobId} has no requester left`);
    switch (op.kind) {
      case 'reconcile':
        return this.doReconcile(op.vmTaps, op.inspectable, op.liveVms);
      case 'lease':
        return this.doLease(op.vmId);
      case 'release':
        return this.doRelease(op.vmId);
      case 'refill':
        return this.doRefill();
    }
  }

  private rows(): Array<{ tap: string; vm_id: string | null }> {
    return this.db.prepare('SELECT tap, vm_id FROM tap_leases ORDER BY tap').all() as Array<{ tap: string; vm_id: string | null }>;
  }

  leases(): Array<{ tap: string; vmId: string | null }> {
    return this.rows().map((r) => ({ tap: r.tap, vmId: r.vm_id }));
  }

  /**
   * Reconcile with reality. `vmTaps`: the TAP each live VM records; `liveVms`: every VM that exists when
   * the reconcile runs (its leases are kept even when it has not recorded its TAP yet: a create interrupted
   * right after its lease, or one started while the reconcile waited for the helper);
   * `inspectable`: false when some VM could not be inspected (then nothing is deleted).
   */
  reconcile(vmTaps: Map<string, string>, inspectable: boolean, liveVms: () => Iterable<string> = () => vmTaps.values()): Promise<ReconcileResult> {
    return this.queue({ kind: 'reconcile', vmTaps, inspectable, liveVms });
  }

  private async doReconcile(vmTaps: Map<string, string>, inspectable: boolean, liveVms: () => Iterable<string>): Promise<ReconcileResult> {
    const real = new Set((await this.helper.request('tap.list', {})).taps.map((t) => t.name));
    const live = new Set(liveVms());
    const adopted: string[] = [];
    const deleted: string[] = [];
    const forgotten: string[] = [];
    // Every TAP a VM records is leased to it (adopt), whatever the table said.
    for (const [tap, vmId] of vmTaps) {
      if (!real.has(tap)) continue; // the VM will get a fresh one on its next boot
      this.db.prepare('INSERT INTO tap_leases (tap, vm_id, leased_at) VALUES (?, ?, ?) ON CONFLICT(tap) DO UPDATE SET vm_id = excluded.vm_id').run(tap, vmId, new Date().toISOString());
      adopted.push(tap);
    }
    const known = new Map(this.rows().map((r) => [r.tap, r.vm_id]));
    for (const [tap, vmId] of known) {
      if (!real.has(tap)) {
        if (vmTaps.has(tap)) continue;
        this.db.prepare('DELETE FROM tap_leases WHERE tap = ?').run(tap);
        forgotten.push(tap);
        continue;
      }
      if (vmId !== null && !live.has(vmId) && inspectable) {
        // Leased to a VM that no longer exists: deleted (the pool warms fresh devices instead).
        await this.helper.request('tap.delete', { name: tap });
        this.db.prepare('DELETE FROM tap_leases WHERE tap = ?').run(tap);
        deleted.push(tap);
      }
    }
    if (!inspectable) {
      this.opts.log('tapPool: some VM could not be inspected; stray TAP devices are left alone');
      return { adopted, deleted, forgotten };
    }
    // A device with our tag and no lease row: made by us, and its row is gone (never written by an older
    // version, or a lease row removed by hand). Devices without our tag belong to someone else.
    const mine = `bgtap${await this.ownTag()}`;
    for (const tap of real) {
      if (known.has(tap) || !tap.startsWith(mine)) continue;
      await this.helper.request('tap.delete', { name: tap });
      deleted.push(tap);
    }
    return { adopted, deleted, forgotten };
  }

  /** Lease a TAP to a VM (idempotent per VM): a warm idle one when there is one, else a cold create. */
  lease(vmId: string): Promise<{ tap: string; warm: boolean }> {
    return this.queue({ kind: 'lease', vmId });
  }

  private async doLease(vmId: string): Promise<{ tap: string; warm: boolean }> {
    const mine = this.db.prepare('SELECT tap FROM tap_leases WHERE vm_id = ?').get(vmId) as { tap: string } | undefined;
    if (mine) {
      await this.helper.request('tap.create', { name: mine.tap });
      return { tap: mine.tap, warm: true };
    }
    const idle = this.db.prepare('SELECT tap FROM tap_leases WHERE vm_id IS NULL ORDER BY tap LIMIT 1').get() as { tap: string } | undefined;
    if (idle) {
      this.db.prepare('UPDATE tap_leases SET vm_id = ?, leased_at = ? WHERE tap = ?').run(vmId, new Date().toISOString(), idle.tap);
      this.kickRefill();
      return { tap: idle.tap, warm: true };
    }
    const tap = newTapName(await this.ownTag());
    // Record the lease first: a crash between create and record must not leak an unaccounted device.
    this.db.prepare('INSERT INTO tap_leases (tap, vm_id, leased_at) VALUES (?, ?, ?)').run(tap, vmId, new Date().toISOString());
    try {
      await this.helper.request('tap.create', { name: tap });
    } catch (e) {
      this.db.prepare('DELETE FROM tap_leases WHERE tap = ?').run(tap);
      await this.helper.request('tap.delete', { name: tap }).catch(() => {});
      throw e;
    }
    this.kickRefill();
    return { tap, warm: false };
  }

  /** Give a VM's TAP back: the device is deleted (a fresh one is warmed instead), the lease removed. */
  release(vmId: string): Promise<void> {
    return this.queue({ kind: 'release', vmId });
  }

  private async doRelease(vmId: string): Promise<void> {
    const mine = this.db.prepare('SELECT tap FROM tap_leases WHERE vm_id = ?').all(vmId) as Array<{ tap: string }>;
    for (const { tap } of mine) {
      await this.helper.request('tap.delete', { name: tap });
      this.db.prepare('DELETE FROM tap_leases WHERE tap = ?').run(tap);
    }
    this.kickRefill();
  }

  /** Bring the number of idle TAPs up to the configured size. */
  refill(): Promise<number> {
    return this.queue({ kind: 'refill' }, true);
  }

  private async doRefill(): Promise<number> {
    let made = 0;
    const idle = () => (this.db.prepare('SELECT COUNT(*) n FROM tap_leases WHERE vm_id IS NULL').get() as { n: number }).n;
    while (!this.stopped && idle() < this.opts.size) {
      const tap = newTapName(await this.ownTag());
      this.db.prepare('INSERT INTO tap_leases (tap, vm_id, leased_at) VALUES (?, NULL, NULL)').run(tap);
      try {
        await this.helper.request('tap.create', { name: tap });
        made++;
      } catch (e) {
        this.db.prepare('DELETE FROM tap_leases WHERE tap = ?').run(tap);
        throw new BangerError('host', `could not warm a TAP device: ${errorMessage(e)}`);
      }
    }
    return made;
  }

  /**
   * Queue a refill behind the current change. A refill job coalesces only with one still waiting (not with
   * one already running), so a lease that runs after a refill has begun always gets another: none goes unrefilled.
   */
  private kickRefill(): void {
    if (this.stopped) return;
    this.refill().catch((e) => this.opts.log(`tapPool: refill failed: ${errorMessage(e)}`));
  }

  stop(): void {
    this.stopped = true;
  }
}
