/**
 * The rootHelper actor against a real helper server on a temp socket (operations replaced by recorders):
 * requests wait while the helper is down and go through after it comes back; a helper that dies in the
 * middle of a create has the (idempotent) request sent again after the reconnect; and the warm TAP pool
 * leases, refills and reconciles through it without leaking devices or leases.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { RootHelper } from '../../src/actors/root-helper.js';
import { TapPool, ownerTag } from '../../src/actors/tap-pool.js';
import { openDb } from '../../src/store/db.js';
import { startRootHelper, type HelperOps, type RootHelperServer } from '../../src/roothelper/server.js';
import { waitUntil } from '../support/wait.js';
import { runInSystem } from '../support/infra.js';

/** The socket's owner: whoever runs the test (only root may serve another uid a socket). */
const me = { uid: process.getuid!(), gid: process.getgid!() };
const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function fakeHost() {
  const taps = new Set<string>();
  const calls: string[] = [];
  const ops: Partial<HelperOps> = {
    createTap: async (_caller, name) => {
      calls.push(`create ${name}`);
      const created = !taps.has(name);
      taps.add(name);
      return { name, created };
    },
    deleteTap: async (_caller, name) => {
      calls.push(`delete ${name}`);
      return { name, deleted: taps.delete(name) };
    },
    listTaps: async () => ({ taps: [...taps].map((name) => ({ name, up: true })) as never }),
    ensureBridge: async () => ({ name: 'banger0', cidr: '172.30.0.1/24', created: false, addressAdded: false }),
  };
  return { taps, calls, ops };
}

async function serve(dir: string, ops: Partial<HelperOps>): Promise<RootHelperServer> {
  const s = await startRootHelper({ socketPath: join(dir, 'h.sock'), stateDir: dir, owner: me, ops, log: () => {} });
  return s;
}

describe('rootHelper actor and tapPool', () => {
  it('holds requests while the helper is down and sends them once it is back', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'bgrh-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const host = fakeHost();
    let server = await serve(dir, host.ops);
    const helper = new RootHelper({ socket: join(dir, 'h.sock'), spawnChild: false, stateDir: dir, network: { bridge: 'banger0', cidr: '172.30.0.1/24', nat: false }, log: () => {} });
    cleanups.push(() => helper.stop());
    cleanups.push(runInSystem(helper));
    expect(await helper.reachable(5000)).toBe(true);
    const tag = ownerTag(me.uid, dir);
    await helper.request('tap.create', { name: `bgtap${tag}a1` });
    await server.close();
    await waitUntil('the actor to notice the helper went away', () => helper.state().state !== 'connected');
    let settled = false;
    const pending = helper.request('tap.create', { name: `bgtap${tag}a2` }, { timeoutMs: 20_000 });
    void pending.finally(() => (settled = true)).catch(() => undefined);
    // the request waits through a failed reconnect rather than failing with it
    await waitUntil('a failed reconnect attempt while the helper is down', () => helper.state().attempts >= 1);
    expect(settled).toBe(false);
    server = await serve(dir, host.ops);
    cleanups.push(() => server.close());
    await expect(pending).resolves.toMatchObject({ name: `bgtap${tag}a2`, created: true });
    expect([...host.taps].sort()).toEqual([`bgtap${tag}a1`, `bgtap${tag}a2`]);
  });

  it('a helper that dies mid-create: the request is sent again after the reconnect, nothing leaks', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'bgrh-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const host = fakeHost();
    let server!: RootHelperServer;
    let died = false;
    const dying: Partial<HelperOps> = {
      ...host.ops,
      createTap: async (caller, name) => {
        if (!died) {
          died = true;
          await host.ops.createTap!(caller, name); // the device is made, then the helper dies before answering
          void server.close();
          return new Promise(() => {});
        }
        return host.ops.createTap!(caller, name);
      },
    };
    server = await serve(dir, dying);
    const helper = new RootHelper({ socket: join(dir, 'h.sock'), spawnChild: false, stateDir: dir, network: { bridge: 'banger0', cidr: '172.30.0.1/24', nat: false }, log: () => {} });
    cleanups.push(() => helper.stop());
    const db = openDb(':memory:');
    const pool = new TapPool(db, helper, { size: 0, log: () => {} });
    cleanups.push(() => pool.stop());
    cleanups.push(runInSystem(helper, pool));
    expect(await helper.reachable(5000)).toBe(true);
    const leased = pool.lease('vm1');
    await waitUntil('the helper to die mid-create and the actor to notice', () => died && helper.state().state !== 'connected');
    const again = await serve(dir, host.ops);
    cleanups.push(() => again.close());
    const { tap } = await leased;
    expect(host.taps.has(tap)).toBe(true);
    expect(pool.leases()).toEqual([{ tap, vmId: 'vm1' }]);
    await pool.release('vm1');
    expect(pool.leases()).toEqual([]);
    expect(host.taps.size).toBe(0);
  });

  it('warms the pool, hands out warm devices, and reconciles: adopts what VMs use, deletes strays', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'bgrh-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const host = fakeHost();
    const server = await serve(dir, host.ops);
    cleanups.push(() => server.close());
    const helper = new RootHelper({ socket: join(dir, 'h.sock'), spawnChild: false, stateDir: dir, network: { bridge: 'banger0', cidr: '172.30.0.1/24', nat: false }, log: () => {} });
    cleanups.push(() => helper.stop());
    const db = openDb(':memory:');
    const pool = new TapPool(db, helper, { size: 2, log: () => {} });
    cleanups.push(() => pool.stop());
    cleanups.push(runInSystem(helper, pool));
    await pool.refill();
    expect(host.taps.size).toBe(2);
    const a = await pool.lease('vmA');
    expect(a.warm).toBe(true);
    await pool.refill();
    expect(pool.leases().filter((l) => l.vmId === null)).toHaveLength(2);
    const stray = `bgtap${ownerTag(me.uid, dir)}s1`;
    host.taps.add(stray);
    // a stray device of this owner's, and a VM that still claims its TAP
    let r = await pool.reconcile(new Map([[a.tap, 'vmA']]), false);
    expect(r.deleted).toEqual([]); // some VM could not be inspected: nothing is deleted
    expect(host.taps.has(stray)).toBe(true);
    r = await pool.reconcile(new Map([[a.tap, 'vmA']]), true);
    expect(r.adopted).toEqual([a.tap]);
    expect(r.deleted).toEqual([stray]);
    expect(host.taps.has(a.tap)).toBe(true);
  });
});
