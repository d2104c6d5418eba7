/** The snapshots table: lookup by name or id prefix, and who still needs a snapshot's files. */
import { beforeEach, describe, expect, it } from 'vitest';
import { openDb, type DB } from '../../src/store/db.js';
import { SnapshotRepo, type SnapshotMeta } from '../../src/store/snapshots.js';

const meta = (chain: string[] = []): SnapshotMeta => ({
  image: 'debian-bookworm', vcpus: 1, memoryMiB: 1024, diskBytes: 2 ** 31, accel: 'tcg', chain,
  root: { file: 'root.qcow2', format: 'qcow2' }, work: { file: 'work.raw', format: 'raw' }, stateFile: 'state.bin', stateBytes: 1, timings: {},
});

describe('SnapshotRepo', () => {
  let db: DB;
  let repo: SnapshotRepo;
  beforeEach(() => {
    db = openDb(':memory:');
    repo = new SnapshotRepo(db);
    repo.insert({ id: 'aaaa111111', name: 'base', vmId: 'v1', vmName: 'src', createdAt: '2026-01-01T00:00:00Z', meta: meta() });
    repo.insert({ id: 'bbbb222222', name: 'later', vmId: 'v2', vmName: 'f-1', createdAt: '2026-01-01T00:01:00Z', meta: meta(['aaaa111111']) });
  });

  const addVm = (id: string, name: string, chain: string[] | undefined, deleted = 0) =>
    db.prepare('INSERT INTO vms (id, name, image, created_at, state, snapshot, deleted) VALUES (?, ?, ?, ?, ?, ?, ?)').run(
      id, name, 'debian-bookworm', '2026-01-01', 'running', JSON.stringify({ context: { spec: chain ? { restore: { snapshotId: chain[0], chain } } : {} } }), deleted,
    );

  it('finds by name, id and unique id prefix; refuses a taken name', () => {
    expect(repo.find('base').id).toBe('aaaa111111');
    expect(repo.find('bbbb').name).toBe('later');
    expect(() => repo.find('zzz')).toThrow(/no snapshot named/);
    expect(() => repo.assertNameFree('base')).toThrow(/already exists/);
  });

  it('users: live forks backed by it (directly or through a later snapshot) and snapshots built on it', () => {
    addVm('v2', 'f-1', ['aaaa111111']);
    addVm('v3', 'g-1', ['bbbb222222', 'aaaa111111']);
    addVm('v4', 'gone', ['aaaa111111'], 1);
    addVm('v5', 'plain', undefined);
    expect(repo.users('aaaa111111')).toEqual({ vms: ['f-1', 'g-1'], snapshots: ['later'] });
    expect(repo.users('bbbb222222')).toEqual({ vms: ['g-1'], snapshots: [] });
  });
});
