/**
 * The typed client end to end: connect() from src/index.ts against a real RpcServer with stub handlers on a
 * temp socket. Params and results are typed by the protocol; the compiler checks the shapes, this checks the wire.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, expectTypeOf, it } from 'vitest';
import { BangerError, connect, type BangerClient, type LogRow, type VmView } from '../../src/index.js';
import type { ResultOf } from '../../src/rpc/protocol.js';
import { RpcServer } from '../../src/rpc/server.js';
import { fakeStatus, stubHandlers } from '../support/rpc-stubs.js';

const vm = (name: string): VmView => ({
  id: `id-${name}`, name, state: 'running', image: 'debian-bookworm', vmm: 'qemu', accel: 'tcg', net: 'user', vcpus: 1, memoryMiB: 512,
  diskBytes: 2 ** 30, guestIp: null, sshPort: 2222, pid: 42, createdAt: '2025-01-01T00:00:00.000Z', error: null, stopReason: null, gitIdentity: null, isolation: null, publish: [],
});
const row: LogRow = { vmId: 'id-a', seq: 1, time: '2025-01-01T00:00:00.000Z', stage: 'boot', status: 'done', durationMs: 12, message: null };

let dir: string;
let socket: string;
let server: RpcServer;
const seen: unknown[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'brpct-'));
  socket = join(dir, 'daemon.sock');
  server = new RpcServer(
    stubHandlers({
      'daemon.status': async () => fakeStatus({ vms: 2 }),
      'vm.list': async () => [vm('a'), vm('b')],
      'vm.show': async (p) => {
        seen.push(p);
        if (p.vm === 'nope') throw new BangerError('not_found', 'no vm nope', 'banger vm list');
        return { ...vm(p.vm), dir: `/vms/${p.vm}`, serialLog: `/vms/${p.vm}/serial.log`, workDiskAllocatedBytes: 4096, rootDiskAllocatedBytes: null };
      },
      'vm.create': async (p, ctx) => {
        ctx.progress({ stage: 'plan', status: 'info', detail: `${p.vmm ?? 'auto'}` });
        return vm(p.name ?? 'anon');
      },
      'vm.logs': async (p, ctx) => {
        ctx.stream(row);
        return p.follow ? [] : [row];
      },
    }),
  );
  await server.listen(socket);
});

afterAll(async () => {
  await server?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('connect() from the library entry', () => {
  let client: BangerClient;
  beforeAll(async () => {
    client = await connect({ socket });
  });
  afterAll(() => client?.close());

  it('calls methods with their params and gets their results', async () => {
    const status = await client.status();
    expect(status).toEqual(fakeStatus({ vms: 2 }));
    const vms = await client.vms();
    expect(vms.map((v) => v.name)).toEqual(['a', 'b']);
    const detail = await client.vm('a');
    expectTypeOf(detail).toEqualTypeOf<ResultOf<'vm.show'>>();
    expect(detail).toMatchObject({ name: 'a', dir: '/vms/a', workDiskAllocatedBytes: 4096 });
    expect(seen).toContainEqual({ vm: 'a' });
  });

  it('delivers progress and stream notifications to the call that caused them', async () => {
    const progress: string[] = [];
    const v = await client.call('vm.create', { name: 'made', vmm: 'qemu' }, { onProgress: (p) => progress.push(`${p.stage}:${p.detail}`) });
    expect(v.name).toBe('made');
    expect(progress).toEqual(['plan:qemu']);
    const streamed: LogRow[] = [];
    const r = await client.call('vm.logs', { vm: 'a', follow: true }, { onStream: (d) => streamed.push(d) });
    expect(r).toEqual([]);
    expect(streamed).toEqual([row]);
  });

  it('turns an error answer into a BangerError with its kind and hint', async () => {
    await expect(client.vm('nope')).rejects.toMatchObject({ kind: 'not_found', message: 'no vm nope', hint: 'banger vm list' });
    await expect(client.vm('nope')).rejects.toBeInstanceOf(BangerError);
  });

  it('refuses params its schema does not allow, at the server', async () => {
    // @ts-expect-error: vm.list takes no params; the server refuses unknown fields too
    await expect(client.call('vm.list', { all: true })).rejects.toMatchObject({ kind: 'invalid_params', message: expect.stringContaining('"all"') });
  });

  it('a method without a stub answers an error rather than hanging', async () => {
    await expect(client.call('image.list', {})).rejects.toMatchObject({ kind: 'internal', message: expect.stringContaining('not stubbed') });
  });
});

it('connect() to a socket where nothing listens fails with a host error naming the socket', async () => {
  const nowhere = join(dir, 'absent.sock');
  await expect(connect({ socket: nowhere, timeoutMs: 1000 })).rejects.toMatchObject({ kind: 'host', message: expect.stringContaining(nowhere) });
});
