/**
 * The warm pool: VMs booted ahead of time (config `warmPool: [{ image, size, vcpus, memoryMiB }]`), each marked
 * with its kind (spec.pool.key). A `vm create` / `vm run` whose request is of that kind takes a running one: the
 * VM's actor gets CLAIM with the new name, which it accepts once only (guard `claimable`), and the claim is
 * persisted with the rename in the same SQLite transaction as the transition. Node runs one handler at a time, so
 * two requests never see the same VM unclaimed; a daemon killed at any point restarts with every pooled VM either
 * still in the pool or handed out under its new name. The pool refills in the background, a moment after a
 * hand-out (so that a new VM's boot does not compete with the first seconds of the command it was taken for).
 * Each waiting VM's pooled SSH connection is dialled and used once ahead of time (`warm`): a command run in a
 * handed-out VM then opens a channel on a live connection instead of paying a key exchange under TCG.
 * The daemon makes it (src/daemon/daemon.ts), starts it once it serves, and stops it on shutdown.
 */
import type { Config } from '../config.js';
import type { VmState } from '../machines/vm.machine.js';
import type { VmSupervisor } from '../actors/supervisor.js';

export interface PoolKind {
  image: string;
  vcpus: number;
  memoryMiB: number;
}

export interface PoolStatus extends PoolKind {
  size: number;
  /** Running and unclaimed: a request of this kind gets one at once. */
  ready: number;
  /** Being created or booted. */
  starting: number;
}

export const poolKey = (k: PoolKind): string => `${k.image}/${k.vcpus}/${k.memoryMiB}`;

const stateOf = (s: { value: unknown }): VmState => (typeof s.value === 'string' ? s.value : Object.keys(s.value as object)[0]) as VmState;
const STARTING: VmState[] = ['creating', 'applyingWorkSeed', 'booting', 'restoring'];

export interface PoolHooks {
  /** Creates one pool VM of this kind (not waited for). */
  create(kind: PoolKind, key: string): Promise<void>;
  /** Opens (and uses once) a running pool VM's pooled SSH connection, so its first command starts at once. */
  warm?(id: string): Promise<void>;
}

export class WarmPool {
  private timer?: NodeJS.Timeout;
  private refilling?: Promise<void>;
  private stopped = false;
  /** Pool VMs whose connection is warm, or being warmed (a failed warm-up is tried again on the next tick). */
  private readonly warmed = new Set<string>();
  /** Pool VMs whose warm-up finished: `ready` counts these, and a claim takes them first. */
  private readonly warmDone = new Set<string>();

  constructor(
    private readonly config: Config,
    private readonly sup: VmSupervisor,
    private readonly hooks: PoolHooks,
    private readonly log: (line: string) => void,
    /** How long after a hand-out the refill waits. */
    private readonly refillAfterHandOutMs = 3000,
  ) {}

  kinds(): Array<PoolKind & { size: number; key: string }> {
    return (this.config.warmPool ?? []).map((e) => {
      const kind = { image: e.image, vcpus: e.vcpus ?? this.config.defaultVcpus, memoryMiB: e.memoryMiB ?? this.config.defaultMemoryMiB };
      return { ...kind, size: e.size, key: poolKey(kind) };
    });
  }

  /** Pooled, unclaimed VMs of a kind, by state. */
  private members(key: string): Array<{ id: string; state: VmState }> {
    return this.sup.ids().flatMap((id) => {
      const s = this.sup.snapshot(id);
      return s.context.spec.pool?.key === key && !s.context.claimedBy ? [{ id, state: stateOf(s) }] : [];
    });
  }

  status(): PoolStatus[] {
    return this.kinds().map(({ key, ...k }) => {
      const m = this.members(key);
      const ready = m.filter((x) => this.isReady(x)).length;
      return { ...k, ready, starting: m.filter((x) => STARTING.includes(x.state) || (x.state === 'running' && !this.isReady(x))).length };
    });
  }

  /** Hands out a running pool VM of this kind under `name`; its id, or undefined when none is ready. */
  claim(kind: PoolKind, name: string): string | undefined {
    const key = poolKey(kind);
    if (!this.kinds().some((k) => k.key === key)) return undefined;
    // Warm members first: a member still warming would pay the SSH handshake in the user's command.
    const running = this.members(key).filter((m) => m.state === 'running');
    for (const m of [...running.filter((x) => this.isReady(x)), ...running.filter((x) => !this.isReady(x))]) {
      this.sup.send(m.id, { type: 'CLAIM', name });
      if (this.sup.snapshot(m.id).context.claimedBy !== name) continue;
      this.log(`warm pool: ${m.id} handed out as ${name}`);
      this.warmed.delete(m.id);
      this.warmDone.delete(m.id);
      setTimeout(() => void this.refill(), this.refillAfterHandOutMs).unref();
      return m.id;
    }
    return undefined;
  }

  start(everyMs = 2000): void {
    if (!this.config.warmPool?.length || this.timer) return;
    this.timer = setInterval(() => void this.refill(), everyMs);
    this.timer.unref();
    void this.refill();
  }

  /** No more refills or warm-ups; resolves once a refill under way has finished creating. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    this.timer = undefined;
    await this.refilling;
  }

  /**
   * Tops every kind up to its size and warms the connections of running members; a pooled VM that failed is
   * deleted (it would never be handed out).
   */
  refill(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    this.refilling ??= this.topUp().finally(() => (this.refilling = undefined));
    return this.refilling;
  }

  private async topUp(): Promise<void> {
    for (const k of this.kinds()) {
      const members = this.members(k.key);
      for (const m of members.filter((x) => x.state === 'failed')) this.sup.send(m.id, { type: 'DELETE' });
      for (const m of members.filter((x) => x.state === 'running')) this.warm(m.id);
      const live = members.filter((x) => x.state === 'running' || STARTING.includes(x.state)).length;
      for (let i = live; i < k.size && !this.stopped; i++) {
        await this.hooks.create(k, k.key).catch((e) => this.log(`warm pool: creating a ${k.key} VM failed: ${(e as Error).message}`));
        // Warm what just came up now, not a tick later.
        for (const m of this.members(k.key).filter((x) => x.state === 'running')) this.warm(m.id);
      }
    }
  }

  /** Running, and warm (or nothing to warm with). */
  private isReady(m: { id: string; state: VmState }): boolean {
    return m.state === 'running' && (!this.hooks.warm || this.warmDone.has(m.id));
  }

  /** Warms a member's connection once (not waited for). */
  private warm(id: string): void {
    if (!this.hooks.warm || this.warmed.has(id) || this.stopped) return;
    this.warmed.add(id);
    this.hooks.warm(id).then(() => this.warmDone.add(id), (e) => {
      this.warmed.delete(id);
      this.log(`warm pool: warming ${id}'s SSH connection failed: ${(e as Error).message}`);
    });
  }
}
