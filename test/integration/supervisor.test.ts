/**
 * The supervisor over a real SQLite store with fake steps (handed in, not mocked): snapshot and event-log row
 * written together, refused events name the state and change nothing, restore after a "crash".
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { fromPromise } from 'xstate';
import { Supervisor } from '../../src/actors/supervisor.js';
import { openDb } from '../../src/store/db.js';
import { Store } from '../../src/store/repo.js';
import { layout } from '../../src/paths.js';
import { configSchema } from '../../src/config.js';
import { BangerError } from '../../src/errors.js';
import { viewOf } from '../../src/daemon/views.js';
import type { JobRunners } from '../../src/actors/workspace-jobs.js';
import { vmInput, runtime } from '../support/vm-fixtures.js';
import { vmTransitionHooks } from '../../src/daemon/vm-hooks.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function gate() {
  let open!: () => void;
  const p = new Promise<void>((r) => (open = r));
  return { p, open };
}

function setup(dbPath?: string, runners: JobRunners = { run: async () => ({}) }) {
  const home = mkdtempSync(join(tmpdir(), 'bgsup-'));
  dirs.push(home);
  const store = new Store(openDb(dbPath ?? join(home, 'banger.db')));
  const creating = gate();
  const steps = {
    prepareDisks: fromPromise(async () => {
      await creating.p;
      return { net: {} };
    }),
    applyWorkSeed: fromPromise(async () => undefined),
    boot: fromPromise(async () => ({ runtime })),
    watchVmm: fromPromise(async ({ signal }) => {
      await new Promise((r) => signal.addEventListener('abort', r));
      return { reason: 'aborted' };
    }),
    stopVmm: fromPromise(async () => undefined),
    applySettings: fromPromise(async () => undefined),
    destroy: fromPromise(async () => undefined),
  };
  const env = {
    layout: layout({ BANGER_HOME: home }),
    store,
    config: configSchema.parse({}),
    runner: async () => ({ exitCode: 0, stdout: '', stderr: '' }),
    userKey: async () => ({ privateKeyPath: '', publicKeyPath: '', privateKey: Buffer.alloc(0), publicKey: '' }),
    driver: () => {
      throw new Error('no driver in this test');
    },
    log: () => {},
  };
  const sup = new Supervisor(env as never, runners, { steps: steps as never });
  return { sup, store, creating, home };
}

describe('supervisor over SQLite with fake steps', () => {
  it('refuses DELETE during creating with the state named, and nothing changes', async () => {
    const { sup, store, creating } = setup();
    sup.start();
    const input = vmInput();
    sup.create(input);
    let err: unknown;
    try {
      sup.send(input.id, { type: 'DELETE' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(BangerError);
    expect((err as BangerError).kind).toBe('invalid_state');
    expect((err as BangerError).message).toContain('it is creating');
    expect(viewOf(sup.snapshot(input.id)).state).toBe('creating');
    creating.open();
    await sup.waitFor(input.id, ['running'], 5000);
    expect(store.getVm(input.id)?.state).toBe('running');
  });

  it('writes every transition with its event row; the store restores the VM where it was', async () => {
    const { sup, store, creating, home } = setup();
    sup.start();
    const input = vmInput();
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['running'], 5000);
    const events = store.events(input.id).filter((e) => e.actor.startsWith('vm:'));
    expect(events.map((e) => e.to)).toEqual(['creating', 'applyingWorkSeed', 'booting', 'running']);
    expect(JSON.parse(store.getVm(input.id)!.snapshot!).value).toBe('running');
    // "crash": a new supervisor on the same database restores the actor in running (no step re-run needed)
    const again = setup(join(home, 'banger.db'));
    const r = again.sup.start();
    expect(r).toEqual({ restored: 1, errors: [] });
    expect(viewOf(again.sup.snapshot(input.id))).toMatchObject({ state: 'running', pid: runtime.pid, sshPort: runtime.sshPort });
    again.sup.send(input.id, { type: 'STOP' });
    await again.sup.waitFor(input.id, ['stopped'], 5000);
    expect(() => again.sup.send(input.id, { type: 'STOP' })).toThrow(/it is stopped/);
    again.sup.detachAll();
    sup.detachAll();
  });

  it("the daemon's transition hooks: a VM's SSH connections are dropped as it goes down, its job runners forget it once deleted", async () => {
    const { sup, creating } = setup();
    const calls: string[] = [];
    sup.onTransition(vmTransitionHooks({ drop: (id) => calls.push(`drop ${id}`) }, { forget: (id) => calls.push(`forget ${id}`) }));
    sup.start();
    const input = vmInput();
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['running'], 5000);
    expect(calls).toEqual([]); // creating → running: nothing is down
    sup.send(input.id, { type: 'STOP' });
    await sup.waitFor(input.id, ['stopped'], 5000);
    expect(calls).toEqual([`drop ${input.id}`, `drop ${input.id}`]); // stopping, stopped
    sup.send(input.id, { type: 'DELETE' });
    await waitUntil(() => calls.includes(`forget ${input.id}`));
    expect(calls.slice(2)).toEqual([`drop ${input.id}`, `drop ${input.id}`, `forget ${input.id}`]); // deleting, deleted
    sup.detachAll();
  });

  it('fails workspace jobs clearly when the VM is not running', async () => {
    const { sup, creating } = setup();
    sup.start();
    const input = vmInput({ start: false });
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['stopped'], 5000);
    await expect(sup.runJob(input.id, 'export', {}, () => {})).rejects.toThrow(/workspace jobs need a running VM/);
    sup.detachAll();
  });
});

describe('one actor system per daemon', () => {
  it('every VM is a child of the root, found with system.get; a deleted VM leaves the system', async () => {
    const { sup, creating } = setup();
    sup.start();
    const input = vmInput({ start: false });
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['stopped'], 5000);
    expect(sup.system.get(`vm:${input.id}`)).toBeDefined();
    expect(sup.system.get('daemon')).toBeDefined();
    expect(sup.ids()).toEqual([input.id]);
    sup.send(input.id, { type: 'DELETE' });
    await sup.waitFor(input.id, ['deleted'], 5000).catch(() => undefined);
    await waitUntil(() => sup.ids().length === 0);
    expect(sup.system.get(`vm:${input.id}`)).toBeUndefined();
    sup.detachAll();
  });

  it('workspace jobs run through the VM, one at a time, in order; results come back as events and are not logged', async () => {
    const order: string[] = [];
    const runners: JobRunners = {
      run: async (_vm, job, { progress }) => {
        order.push(`start ${job.params.n}`);
        progress({ stage: 'sending', bytes: 1 });
        await new Promise((r) => setTimeout(r, 20));
        order.push(`end ${job.params.n}`);
        if (job.params.n === 2) throw new BangerError('usage', 'job 2 refused', 'the hint travels too');
        return { n: job.params.n, big: 'x'.repeat(1000) };
      },
    };
    const { sup, store, creating } = setup(undefined, runners);
    sup.start();
    const input = vmInput();
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['running'], 5000);
    const seen: string[] = [];
    const results = await Promise.allSettled([1, 2, 3].map((n) => sup.runJob(input.id, 'prepare', { n }, (p) => seen.push(`${n}:${p.stage}`))));
    expect(order).toEqual(['start 1', 'end 1', 'start 2', 'end 2', 'start 3', 'end 3']);
    expect(results[0]).toMatchObject({ status: 'fulfilled', value: { n: 1 } });
    expect(results[1]).toMatchObject({ status: 'rejected', reason: { kind: 'usage', message: 'job 2 refused', hint: 'the hint travels too' } });
    expect(results[2]).toMatchObject({ status: 'fulfilled', value: { n: 3 } });
    expect(seen).toEqual(['1:sending', '2:sending', '3:sending']);
    const settled = store.events(input.id).filter((e) => e.type === 'JOB.SETTLED');
    expect(settled).toHaveLength(3);
    expect(JSON.stringify(settled)).not.toContain('xxxxxxxxxx');
    sup.detachAll();
  });

  it('a STOP while jobs are pending fails them at once with "vm stopped", and the stop does not wait for them', async () => {
    const release = gate();
    const runners: JobRunners = { run: async (_vm, _job, { signal }) => new Promise((_, reject) => signal.addEventListener('abort', () => reject(new Error('aborted')))).then(() => release.p) };
    const { sup, creating } = setup(undefined, runners);
    sup.start();
    const input = vmInput();
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['running'], 5000);
    const jobs = [sup.runJob(input.id, 'prepare', {}, () => {}), sup.runJob(input.id, 'export', {}, () => {})];
    sup.send(input.id, { type: 'STOP' });
    for (const j of jobs) await expect(j).rejects.toMatchObject({ kind: 'aborted', message: expect.stringMatching(/vm stopped/) });
    await sup.waitFor(input.id, ['stopped'], 5000);
    sup.detachAll();
  });

  it('a job restored from an earlier daemon session is not run again: it fails, saying why', async () => {
    const ran: string[] = [];
    const runners: JobRunners = { run: async (_vm, job) => (ran.push(job.jobId), new Promise(() => {})) };
    const { sup, store, creating, home } = setup(undefined, runners);
    sup.start();
    const input = vmInput();
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['running'], 5000);
    void sup.runJob(input.id, 'prepare', {}, () => {}).catch(() => {});
    await waitUntil(() => ran.length === 1);
    // "crash": the persisted workspace holds the job in flight; a new daemon session restores it
    const again = setup(join(home, 'banger.db'), runners);
    again.sup.start();
    await waitUntil(() => store.logs(input.id).some((l) => l.status === 'error' && /requester is gone/.test(l.message ?? '')));
    expect(ran).toHaveLength(1);
    again.sup.detachAll();
    sup.detachAll();
  });
});

async function waitUntil(cond: () => boolean, timeoutMs = 5000): Promise<void> {
  for (const t0 = Date.now(); !cond(); await new Promise((r) => setTimeout(r, 10))) {
    if (Date.now() - t0 > timeoutMs) throw new Error('timed out waiting for the condition');
  }
}
