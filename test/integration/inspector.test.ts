import { afterEach, describe, expect, it } from 'vitest';
import { createActor, createMachine, fromPromise, setup } from 'xstate';
import { createWebSocketReceiver } from '@statelyai/inspect';
import { serveInspector, type InspectorServer } from '../../src/daemon/inspector.js';

interface Received {
  type: string;
  sessionId: string;
  name?: string;
  parentId?: string;
  snapshot?: { value?: unknown };
  event?: { type: string };
}

const child = createMachine({ id: 'worker', initial: 'idle', states: { idle: { on: { GO: 'busy' } }, busy: {} } });
const root = setup({ actors: { worker: child, job: fromPromise(async () => 1) } }).createMachine({
  id: 'root',
  initial: 'a',
  invoke: { id: 'worker', src: 'worker', systemId: 'worker' },
  states: { a: { on: { NEXT: 'b' } }, b: {} },
});

/** Collect messages until `until` holds for them (bounded), the way any inspector client would see them. */
function collect(url: string, until: (msgs: Received[]) => boolean): Promise<Received[]> {
  const msgs: Received[] = [];
  const receiver = createWebSocketReceiver({ server: url });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out; got ${JSON.stringify(msgs.map((m) => m.type))}`)), 10_000);
    const sub = receiver.subscribe((m: unknown) => {
      msgs.push(m as Received);
      if (until(msgs)) {
        clearTimeout(timer);
        sub.unsubscribe();
        resolve(msgs);
      }
    });
  });
}

async function until(cond: () => boolean, what: string): Promise<void> {
  for (const t0 = Date.now(); !cond(); await new Promise((r) => setTimeout(r, 10))) {
    if (Date.now() - t0 > 5000) throw new Error(`timed out waiting for ${what}`);
  }
}

describe('the live inspector', () => {
  let server: InspectorServer | undefined;
  afterEach(async () => {
    await server?.close();
    server = undefined;
  });

  it("streams every actor's registration and transitions in Stately's format to a WebSocket client", async () => {
    server = await serveInspector(0);
    const url = `ws://127.0.0.1:${server.port}`;
    const seen = collect(url, (m) => m.some((x) => x.type === '@xstate.snapshot' && x.snapshot?.value === 'busy'));
    await until(() => server!.clients() === 1, 'the receiver to connect');
    const actor = createActor(root, { inspect: server.inspect });
    actor.start();
    actor.send({ type: 'NEXT' });
    actor.system.get('worker')!.send({ type: 'GO' });
    const msgs = await seen;
    const actors = msgs.filter((m) => m.type === '@xstate.actor');
    expect(actors.map((a) => a.name)).toEqual(expect.arrayContaining(['root', 'worker']));
    const rootSession = actors.find((a) => a.name === 'root')!.sessionId;
    expect(actors.find((a) => a.name === 'worker')!.parentId).toBe(rootSession);
    expect(msgs.some((m) => m.type === '@xstate.event' && m.event?.type === 'NEXT')).toBe(true);
    expect(msgs.some((m) => m.type === '@xstate.snapshot' && m.sessionId === rootSession && m.snapshot?.value === 'b')).toBe(true);
    actor.stop();
  });

  it('a client that connects late first receives every live actor with its latest snapshot', async () => {
    server = await serveInspector(0);
    const actor = createActor(root, { inspect: server.inspect });
    actor.start();
    actor.send({ type: 'NEXT' });
    const msgs = await collect(`ws://127.0.0.1:${server.port}`, (m) => m.filter((x) => x.type === '@xstate.actor').length >= 2);
    const rootActor = msgs.find((m) => m.type === '@xstate.actor' && m.name === 'root');
    expect(rootActor?.snapshot?.value).toBe('b');
    actor.stop();
  });

  it('refuses a port in use with the fix', async () => {
    server = await serveInspector(0);
    const err = await serveInspector(server.port).catch((e: unknown) => e);
    expect(err).toMatchObject({ message: expect.stringMatching(/EADDRINUSE/), hint: expect.stringMatching(/--inspect PORT/) });
  });
});
