/**
 * The actor system, watched live: `daemon start --inspect` serves every actor's inspection events over WebSocket
 * in @statelyai/inspect's format (read here with its own createWebSocketReceiver), and `banger inspect` streams the
 * same transitions to a terminal. No guest boots: `vm create --no-start` runs creating → applyingWorkSeed → stopped.
 */
import { execa } from 'execa';
import { createWebSocketReceiver } from '@statelyai/inspect';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { waitUntil } from '../support/wait.js';
import { BIN, Banger, describeE2E } from './harness.js';

interface Message {
  type: string;
  name?: string;
  sessionId: string;
  snapshot?: { value?: unknown };
}

describeE2E('watching the actor system live', () => {
  let b: Banger;
  beforeAll(async () => {
    b = await Banger.create();
  });
  afterAll(async () => {
    await b?.cleanup();
  });

  it("daemon start --inspect: a WebSocket client sees the root, its children and a VM's transitions as they happen", async () => {
    await b.ok(['daemon', 'start', '--inspect', '0']);
    const status = await b.json<{ inspector: string | null }>(['daemon', 'status']);
    expect(status.inspector).toMatch(/^ws:\/\/127\.0\.0\.1:\d+$/);
    const msgs: Message[] = [];
    createWebSocketReceiver({ server: status.inspector! }).subscribe((m: unknown) => msgs.push(m as Message));
    // A late client first gets every live actor: the daemon's root is there before any VM exists.
    await waitUntil('the root actor', () => msgs.some((m) => m.type === '@xstate.actor' && m.name === 'daemon'), 20_000);
    const vm = await b.json<{ id: string }>(['vm', 'create', '--name', 'watched', '--no-start']);
    // Each VM is the root's child `vm:<id>`, registered under that name.
    const session = () => msgs.find((m) => m.type === '@xstate.actor' && m.name === `vm:${vm.id}`)?.sessionId;
    const valuesOfVm = () => msgs.filter((m) => m.type === '@xstate.snapshot' && m.sessionId === session()).map((m) => m.snapshot?.value);
    await waitUntil("the VM's transitions", () => valuesOfVm().includes('stopped'), 60_000);
    expect(valuesOfVm()).toEqual(expect.arrayContaining(['applyingWorkSeed', 'stopped']));
    await b.ok(['vm', 'delete', 'watched']);
    await b.ok(['daemon', 'stop']);
  });

  it('banger inspect prints each transition (actor, event, from → to) as it happens', async () => {
    const lines: string[] = [];
    const watcher = execa(process.execPath, [BIN, 'inspect'], { env: b.env, reject: false, timeout: 120_000 });
    watcher.stdout!.on('data', (d: Buffer) => lines.push(...d.toString().split('\n')));
    await waitUntil('banger inspect to connect', () => lines.length > 0, 30_000);
    await b.ok(['vm', 'create', '--name', 'streamed', '--no-start']);
    await waitUntil('the stopped transition', () => lines.some((l) => /vm:\S+.*applyingWorkSeed.*→.*stopped/.test(l)), 60_000);
    expect(lines.some((l) => /creating.*→.*applyingWorkSeed/.test(l))).toBe(true);
    watcher.kill('SIGINT');
    await watcher;
    await b.ok(['vm', 'delete', 'streamed']);
  });
});
