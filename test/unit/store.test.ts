import Database from 'better-sqlite3';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { makeHandlers } from '../../src/daemon/handlers.js';
import type { DaemonServices, HandlerDeps } from '../../src/daemon/services.js';
import type { CallContext } from '../../src/rpc/server.js';
import { BangerError } from '../../src/errors.js';
import { migrate, openDb, SCHEMA_VERSION, type DB } from '../../src/store/db.js';
import { Store } from '../../src/store/repo.js';

let dir: string;
let db: DB;
let store: Store;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'banger-store-'));
  db = openDb(join(dir, 'banger.db'));
  store = new Store(db);
});

afterEach(async () => {
  db.close();
  await rm(dir, { recursive: true, force: true });
});

function addVm(id: string, name: string, createdAt = '2026-01-01T00:00:00.000Z'): void {
  store.insertVm({ id, name, image: 'debian-bookworm', createdAt, state: 'creating' });
}

function markDeleted(id: string): void {
  store.recordTransition(id, { actor: `vm:${id}`, type: 'DELETE', payload: {}, to: 'deleted' }, 'deleted', { value: 'deleted' });
}

function refusal(fn: () => unknown): BangerError {
  try {
    fn();
  } catch (e) {
    expect(e, 'expected a BangerError').toBeInstanceOf(BangerError);
    return e as BangerError;
  }
  throw new Error('expected a refusal, got none');
}

describe('resolving a vm ref', () => {
  beforeEach(() => {
    addVm('abc1234567', 'only');
  });

  it.each(['_', '%', 'a_', '%%', '_bc', 'a%', '__________'])('the LIKE wildcard ref %j matches nothing', (ref) => {
    expect(store.resolveVm(ref)).toEqual([]);
    const e = refusal(() => store.findVm(ref));
    expect(e.kind).toBe('not_found');
    expect(e.message).toContain(JSON.stringify(ref));
    expect(e.hint).toContain('banger vm list');
  });

  it('the empty ref matches nothing', () => {
    expect(store.resolveVm('')).toEqual([]);
  });

  it('matches an id prefix literally, also when the id itself holds _ or %', () => {
    addVm('x_y%z00000', 'odd');
    expect(store.findVm('abc').name).toBe('only');
    expect(store.findVm('x_').name).toBe('odd');
    expect(store.findVm('x_y%').name).toBe('odd');
    expect(store.resolveVm('x%')).toEqual([]);
    expect(store.resolveVm('ABC')).toEqual([]);
  });

  it('a prefix that matches several VMs names every candidate with its id', () => {
    addVm('abc9999999', 'other');
    const e = refusal(() => store.findVm('abc'));
    expect(e.kind).toBe('conflict');
    expect(e.message).toContain('only (abc1234567)');
    expect(e.message).toContain('other (abc9999999)');
  });

  it('an exact name or exact id wins over an id prefix', () => {
    addVm('abc9999999', 'other');
    addVm('zzz0000000', 'abc');
    expect(store.findVm('abc').id).toBe('zzz0000000');
    expect(store.findVm('abc1234567').name).toBe('only');
  });

  it('a deleted VM is not found by name, id or prefix', () => {
    markDeleted('abc1234567');
    for (const ref of ['only', 'abc1234567', 'abc']) expect(refusal(() => store.findVm(ref)).kind).toBe('not_found');
  });
});

describe('vm names', () => {
  it('a deleted VM leaves its name free for a new one', () => {
    addVm('aaaaaaaaaa', 'reused');
    markDeleted('aaaaaaaaaa');
    store.assertNameFree('reused');
    addVm('bbbbbbbbbb', 'reused');
    markDeleted('bbbbbbbbbb');
    addVm('cccccccccc', 'reused');
    expect(store.findVm('reused').id).toBe('cccccccccc');
    expect(db.prepare('SELECT COUNT(*) n FROM vms WHERE name = ?').get('reused')).toEqual({ n: 3 });
  });

  it('a name a live VM has is refused with a conflict naming the VM and the fix', () => {
    addVm('aaaaaaaaaa', 'taken');
    const e = refusal(() => store.assertNameFree('taken'));
    expect(e.kind).toBe('conflict');
    expect(e.message).toContain('taken');
    expect(e.message).toContain('aaaaaaaaaa');
    expect(e.hint).toMatch(/--name/);
    expect(e.hint).toContain('banger vm delete taken');
  });

  it('an insert racing past the check gets the same conflict, not the SQLite constraint text', () => {
    addVm('aaaaaaaaaa', 'taken');
    const e = refusal(() => addVm('bbbbbbbbbb', 'taken'));
    expect(e.kind).toBe('conflict');
    expect(e.message).not.toMatch(/UNIQUE constraint/);
    expect(e.message).toContain('a vm named taken already exists');
    expect(db.prepare('SELECT COUNT(*) n FROM vms').get()).toEqual({ n: 1 });
  });

  it('a duplicate id is not mistaken for a name conflict', () => {
    addVm('aaaaaaaaaa', 'one');
    expect(() => addVm('aaaaaaaaaa', 'two')).toThrow(/UNIQUE constraint failed: vms\.id/);
  });
});

describe('migrating a version-2 database', () => {
  it('keeps every row and frees the names of deleted VMs', () => {
    const path = join(dir, 'v2.db');
    const old = new Database(path);
    migrate(old, 2);
    expect(old.pragma('user_version', { simple: true })).toBe(2);
    const insert = old.prepare('INSERT INTO vms (id, name, image, created_at, state, snapshot, deleted) VALUES (?, ?, ?, ?, ?, ?, ?)');
    insert.run('live000000', 'live', 'img', '2026-01-01T00:00:00.000Z', 'running', '{"value":"running"}', 0);
    insert.run('gone000000', 'gone', 'img', '2026-01-02T00:00:00.000Z', 'deleted', '{"value":"deleted"}', 1);
    old.prepare("INSERT INTO vm_events (vm_id, seq, time, actor, type, payload, to_state) VALUES ('live000000', 1, 't', 'vm:live000000', 'START', '{}', 'running')").run();
    old.prepare("INSERT INTO ip_leases (address, vm_id, leased_at) VALUES ('10.0.0.2', 'live000000', 't')").run();
    const before = old.prepare('SELECT * FROM vms ORDER BY id').all();
    old.close();

    const upgraded = openDb(path);
    try {
      expect(upgraded.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
      expect(upgraded.prepare('SELECT * FROM vms ORDER BY id').all()).toEqual(before);
      expect(upgraded.prepare('SELECT COUNT(*) n FROM vm_events').get()).toEqual({ n: 1 });
      expect(upgraded.prepare('SELECT COUNT(*) n FROM ip_leases').get()).toEqual({ n: 1 });
      const s = new Store(upgraded);
      s.insertVm({ id: 'new0000000', name: 'gone', image: 'img', createdAt: 't', state: 'creating' });
      expect(s.findVm('gone').id).toBe('new0000000');
      expect(refusal(() => s.insertVm({ id: 'dup0000000', name: 'live', image: 'img', createdAt: 't', state: 'creating' })).kind).toBe('conflict');
      expect(upgraded.pragma('foreign_key_check')).toEqual([]);
      expect(upgraded.pragma('integrity_check', { simple: true })).toBe('ok');
    } finally {
      upgraded.close();
    }
  });
});

describe('recordTransition', () => {
  it('writes the event row and the snapshot together', () => {
    addVm('aaaaaaaaaa', 'one');
    const seq = store.recordTransition('aaaaaaaaaa', { actor: 'vm:aaaaaaaaaa', type: 'START', payload: {}, from: 'creating', to: 'booting' }, 'booting', { value: 'booting' });
    expect(seq).toBe(1);
    expect(store.events('aaaaaaaaaa').map((e) => e.to)).toEqual(['booting']);
    expect(store.getVm('aaaaaaaaaa')).toMatchObject({ state: 'booting', snapshot: '{"value":"booting"}' });
  });

  it('when the snapshot write fails, the event row does not land either', () => {
    addVm('aaaaaaaaaa', 'one');
    store.recordTransition('aaaaaaaaaa', { actor: 'vm:aaaaaaaaaa', type: 'START', payload: {}, to: 'booting' }, 'booting', { value: 'booting' });
    // The second write of recordTransition (the UPDATE of vms) fails; the first (the event INSERT) succeeded.
    db.exec("CREATE TRIGGER inject_failure BEFORE UPDATE ON vms BEGIN SELECT RAISE(ABORT, 'injected snapshot failure'); END;");
    expect(() =>
      store.recordTransition('aaaaaaaaaa', { actor: 'vm:aaaaaaaaaa', type: 'BOOTED', payload: {}, from: 'booting', to: 'running' }, 'running', { value: 'running' }),
    ).toThrow(/injected snapshot failure/);
    expect(store.events('aaaaaaaaaa').map((e) => e.type)).toEqual(['START']);
    expect(store.getVm('aaaaaaaaaa')).toMatchObject({ state: 'booting', snapshot: '{"value":"booting"}' });
    expect(db.inTransaction).toBe(false);
    // Once the failure is gone the next transition takes the next sequence number: nothing half-written is left.
    db.exec('DROP TRIGGER inject_failure');
    expect(store.recordTransition('aaaaaaaaaa', { actor: 'vm:aaaaaaaaaa', type: 'BOOTED', payload: {}, to: 'running' }, 'running', { value: 'running' })).toBe(2);
  });
});

describe('through the daemon handlers', () => {
  const ctx: CallContext = { requestId: 1, progress: () => {}, stream: () => {}, signal: new AbortController().signal };
  let supervisor: { has: (id: string) => boolean; create: ReturnType<typeof vi.fn>; send: ReturnType<typeof vi.fn>; view: (id: string) => unknown };

  function handlers() {
    supervisor = { has: () => true, create: vi.fn(), send: vi.fn(), view: (id: string) => ({ id }) };
    // Only what vm ref resolution and vm.create's name check touch; the rest would fail loudly if reached.
    const d = { store, supervisor, layout: {}, config: { warmPool: [] } } as unknown as DaemonServices;
    const deps: HandlerDeps = { version: 'test', commit: 'test', drivers: {}, log: () => {} };
    return makeHandlers(d, deps);
  }

  it.each(['_', '%', '__________', 'a%'])('refuses the wildcard ref %j with not_found and sends nothing', async (ref) => {
    addVm('abc1234567', 'only');
    const h = handlers();
    for (const method of ['vm.delete', 'vm.stop', 'vm.show'] as const) {
      await expect(h[method]({ vm: ref }, ctx)).rejects.toMatchObject({ kind: 'not_found', message: expect.stringContaining(JSON.stringify(ref)) });
    }
    expect(supervisor.send).not.toHaveBeenCalled();
  });

  it('vm.create with a live name is refused before anything is created', async () => {
    addVm('abc1234567', 'taken');
    const h = handlers();
    await expect(h['vm.create']({ name: 'taken' }, ctx)).rejects.toMatchObject({ kind: 'conflict', message: expect.stringContaining('taken') });
    expect(supervisor.create).not.toHaveBeenCalled();
    expect(db.prepare('SELECT COUNT(*) n FROM vms').get()).toEqual({ n: 1 });
  });
});
