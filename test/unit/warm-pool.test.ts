/** The warm pool's hand-out and refill over VM snapshots driven by the real statechart (transition()). */
import { describe, expect, it, vi } from 'vitest';
import { initialTransition, transition } from 'xstate';
import { configSchema } from '../../src/config.js';
import { vmMachine, type VmEvent, type VmInput, type VmSnapshot } from '../../src/machines/vm.machine.js';
import type { DaemonServices } from '../../src/daemon/services.js';
import type { VmSupervisor } from '../../src/actors/supervisor.js';
import { poolKey, WarmPool } from '../../src/daemon/warm-pool.js';
import { runtime, vmInput } from '../support/vm-fixtures.js';
import { poolKindOf } from '../../src/daemon/handlers/vms.js';

const done = (id: string, output: unknown = undefined) => ({ type: `xstate.done.actor.${id}`, output, actorId: id }) as never;

/** VMs as pure snapshots: create spawns one in creating; boot() walks it to running. */
function fakeSupervisor() {
  const vms = new Map<string, VmSnapshot>();
  const sup = {
    ids: () => [...vms.keys()],
    snapshot: (id: string) => vms.get(id)!,
    send: (id: string, e: VmEvent) => {
      const s = vms.get(id)!;
      if (!s.can(e)) throw new Error(`refused ${e.type}`);
      vms.set(id, transition(vmMachine, s, e)[0] as VmSnapshot);
    },
    create: (input: VmInput) => vms.set(input.id, initialTransition(vmMachine, input)[0] as VmSnapshot),
  };
  const boot = (id: string) => {
    for (const e of [done('prepareDisks', { net: {} }), done('applyWorkSeed'), done('boot', { runtime })]) vms.set(id, transition(vmMachine, vms.get(id)!, e)[0] as VmSnapshot);
  };
  return { sup: sup as unknown as VmSupervisor, vms, boot };
}

const config = configSchema.parse({ warmPool: [{ image: 'debian-bookworm', size: 2, vcpus: 1, memoryMiB: 1024 }] });
const kind = { image: 'debian-bookworm', vcpus: 1, memoryMiB: 1024 };

function pool(warm?: (id: string) => Promise<void>, refillAfterHandOutMs = 0) {
  const f = fakeSupervisor();
  let n = 0;
  const create = async (_k: unknown, key: string) => {
    const base = vmInput({ pool: { key }, vcpus: 1 });
    f.sup.create({ ...base, id: `pool${n}`, name: `pool-${n++}` });
  };
  const p = new WarmPool(config, f.sup, { create, warm }, () => {}, refillAfterHandOutMs);
  return { p, ...f };
}

describe('warm pool', () => {
  it('refills to its size and reports ready and starting VMs', async () => {
    const { p, boot } = pool();
    await p.refill();
    expect(p.status()).toEqual([{ ...kind, size: 2, ready: 0, starting: 2 }]);
    boot('pool0');
    expect(p.status()[0]).toMatchObject({ ready: 1, starting: 1 });
    await p.refill();
    expect(p.status()[0]).toMatchObject({ ready: 1, starting: 1 }); // full: nothing more is created
  });

  it('two requests get two distinct VMs; a third gets none while nothing else is ready', async () => {
    const { p, boot, vms } = pool();
    await p.refill();
    boot('pool0');
    boot('pool1');
    const a = p.claim(kind, 'run-a');
    const b = p.claim(kind, 'run-b');
    expect(a).toBeDefined();
    expect(b).toBeDefined();
    expect(a).not.toBe(b);
    expect(vms.get(a!)!.context.name).toBe('run-a');
    expect(vms.get(b!)!.context.name).toBe('run-b');
    expect(p.claim(kind, 'run-c')).toBeUndefined();
    p.stop();
  });

  it('a request of another kind is not served from the pool', async () => {
    const { p, boot } = pool();
    await p.refill();
    boot('pool0');
    expect(p.claim({ ...kind, memoryMiB: 2048 }, 'x')).toBeUndefined();
    expect(poolKey(kind)).toBe('debian-bookworm/1/1024');
  });
});

describe('warm connections, refill after a hand-out, stop', () => {
  it('warms each running member once; a failed warm-up is tried again; a handed-out VM is not warmed again', async () => {
    const warmed: string[] = [];
    let failNext = true;
    const { p, boot } = pool(async (id) => {
      warmed.push(id);
      if (id === 'pool1' && failNext) {
        failNext = false;
        throw new Error('no banner');
      }
    });
    await p.refill();
    expect(warmed).toEqual([]); // nothing runs yet
    boot('pool0');
    boot('pool1');
    await p.refill();
    await p.refill();
    await new Promise((r) => setImmediate(r));
    await p.refill();
    expect(warmed.sort()).toEqual(['pool0', 'pool1', 'pool1']);
    p.claim(kind, 'run-a');
    await p.refill();
    expect(warmed.filter((id) => id === 'pool0')).toHaveLength(1);
    await p.stop();
  });

  it('a member counts as ready once its warm-up finished, and a claim takes a warm member before a cold one', async () => {
    const pending = new Map<string, () => void>();
    const { p, boot } = pool((id) => new Promise<void>((resolve) => pending.set(id, resolve)));
    await p.refill();
    boot('pool0');
    boot('pool1');
    await p.refill();
    expect(p.status()[0]).toMatchObject({ ready: 0, starting: 2 }); // running, still warming
    pending.get('pool1')!();
    await new Promise((r) => setImmediate(r));
    expect(p.status()[0]).toMatchObject({ ready: 1, starting: 1 });
    expect(p.claim(kind, 'run-a')).toBe('pool1');
    expect(p.claim(kind, 'run-b')).toBe('pool0'); // a cold member still beats a cold boot
    await p.stop();
  });

  it('refills a moment after a hand-out, not at once', async () => {
    vi.useFakeTimers();
    try {
      const { p, boot, vms } = pool(undefined, 3000);
      await p.refill();
      boot('pool0');
      boot('pool1');
      expect(p.claim(kind, 'run-a')).toBeDefined();
      await vi.advanceTimersByTimeAsync(2900);
      expect(vms.size).toBe(2);
      await vi.advanceTimersByTimeAsync(200);
      expect(vms.size).toBe(3);
      expect(p.status()[0]).toMatchObject({ ready: 1, starting: 1 });
      await p.stop();
    } finally {
      vi.useRealTimers();
    }
  });

  it('a stopped pool creates and warms nothing more', async () => {
    const warmed: string[] = [];
    const { p, vms } = pool(async (id) => void warmed.push(id));
    await p.stop();
    await p.refill();
    expect(vms.size).toBe(0);
  });
});

describe('which requests the pool may serve', () => {
  const d = { config } as unknown as DaemonServices;
  it('a plain request of a pooled kind', () => {
    expect(poolKindOf(d, { vcpus: 1, memoryMiB: 1024 })).toEqual(kind);
  });
  it.each([
    ['--publish', { publish: ['8080:80'] }],
    ['--workspace', { workspace: { source: '/src' } }],
    ['--egress', { egress: 'none' }],
    ['--allow-peers', { allowPeers: true }],
    ['--allow', { allow: ['10.0.0.0/8'] }],
    ['--disk', { disk: '2G' }],
    ['--net tap', { net: 'tap' }],
    ['--no-start', { start: false }],
  ])('not one with %s: a pooled VM was made without it', (_flag, extra) => {
    expect(poolKindOf(d, { vcpus: 1, memoryMiB: 1024, ...extra } as never)).toBeUndefined();
  });
});
