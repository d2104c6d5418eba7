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
import { vmInput, runtime } from '../support/vm-fixtures.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function gate() {
  let open!: () => void;
  const p = new Promise<void>((r) => (open = r));
  return { p, open };
}

function setup(dbPath?: string) {
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
  const sup = new Supervisor(env as never, { run: async () => ({}) }, steps as never);
  return { sup, store, creating, home };
}

describe('supervisor over SQLite with fake steps', () => {
  it('refuses DELETE during creating with the state named, and nothing changes', async () => {
    const { sup, store, creating } = setup();
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
    expect(sup.view(input.id).state).toBe('creating');
    creating.open();
    await sup.waitFor(input.id, ['running'], 5000);
    expect(store.getVm(input.id)?.state).toBe('running');
  });

  it('writes every transition with its event row; the store restores the VM where it was', async () => {
    const { sup, store, creating, home } = setup();
    const input = vmInput();
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['running'], 5000);
    const events = store.events(input.id).filter((e) => e.actor.startsWith('vm:'));
    expect(events.map((e) => e.to)).toEqual(['creating', 'applyingWorkSeed', 'booting', 'running']);
    expect(JSON.parse(store.getVm(input.id)!.snapshot!).value).toBe('running');
    // "crash": a new supervisor on the same database restores the actor in running (no step re-run needed)
    const again = setup(join(home, 'banger.db'));
    const r = again.sup.restoreAll();
    expect(r).toEqual({ restored: 1, errors: [] });
    expect(again.sup.view(input.id)).toMatchObject({ state: 'running', pid: runtime.pid, sshPort: runtime.sshPort });
    again.sup.send(input.id, { type: 'STOP' });
    await again.sup.waitFor(input.id, ['stopped'], 5000);
    expect(() => again.sup.send(input.id, { type: 'STOP' })).toThrow(/it is stopped/);
    again.sup.detachAll();
    sup.detachAll();
  });

  it('fails workspace jobs clearly when the VM is not running', async () => {
    const { sup, creating } = setup();
    const input = vmInput({ start: false });
    sup.create(input);
    creating.open();
    await sup.waitFor(input.id, ['stopped'], 5000);
    expect(() => sup.enqueueJob(input.id, { jobId: 'j', kind: 'export', params: {}, enqueuedAt: '' })).toThrow(/workspace jobs need a running VM/);
    sup.detachAll();
  });
});
