/**
 * `banger daemon start --inspect [PORT]`: the actor system served live to Stately's inspector.
 *
 * The XState inspection events of every actor (daemon root, rootHelper, tapPool, each vm:<id> and its
 * workspace) are converted by @statelyai/inspect's own `createInspector` — so the messages are exactly what its
 * `createWebSocketInspector` sends and its `createWebSocketReceiver` reads — and broadcast to every WebSocket
 * client connected to 127.0.0.1:PORT. A client that connects late first receives every live actor's
 * registration with its latest snapshot, so it sees the whole system, not only what happens next.
 *
 * Loopback only: the stream carries every actor's context (VM specs, paths), never keys or secrets.
 */
import { createInspector, type StatelyInspectionEvent } from '@statelyai/inspect';
import type { InspectionEvent, Observer } from 'xstate';
import { WebSocketServer, WebSocket } from 'ws';
import { BangerError } from '../errors.js';

type StatelyEvent = StatelyInspectionEvent;
type Adapter = Parameters<typeof createInspector>[0];

export interface InspectorServer {
  /** Hand this to `createActor(..., { inspect })` of the system's root. */
  inspect: Observer<InspectionEvent>;
  port: number;
  /** How many clients are connected now. */
  clients(): number;
  close(): Promise<void>;
}

/** Live actors by session: their registration, updated with each snapshot, replayed to late clients. */
class ActorRegistry {
  private actors = new Map<string, StatelyEvent>();

  record(ev: StatelyEvent): void {
    if (ev.type === '@xstate.actor') this.actors.set(ev.sessionId, ev);
    else if (ev.type === '@xstate.snapshot') {
      const actor = this.actors.get(ev.sessionId);
      if (!actor) return;
      const status = (ev.snapshot as { status?: string }).status;
      if (status === 'done' || status === 'stopped' || status === 'error') this.actors.delete(ev.sessionId);
      else this.actors.set(ev.sessionId, { ...actor, snapshot: ev.snapshot } as StatelyEvent);
    }
  }

  replay(): StatelyEvent[] {
    return [...this.actors.values()];
  }
}

const MAX_CLIENT_BACKLOG = 8 * 1024 * 1024;

export async function serveInspector(port: number, host = '127.0.0.1'): Promise<InspectorServer> {
  const wss = new WebSocketServer({ host, port });
  await new Promise<void>((resolve, reject) => {
    wss.once('listening', resolve);
    wss.once('error', (e) => reject(new BangerError('conflict', `the inspector could not listen on ${host}:${port}: ${e.message}`, 'pick another port: banger daemon start --inspect PORT')));
  });
  const registry = new ActorRegistry();
  const send = (client: WebSocket, ev: StatelyEvent) => {
    // A client that stops reading is dropped rather than buffered without bound.
    if (client.bufferedAmount > MAX_CLIENT_BACKLOG) client.terminate();
    else if (client.readyState === WebSocket.OPEN) client.send(JSON.stringify(ev));
  };
  wss.on('connection', (client) => {
    client.on('error', () => client.terminate());
    for (const ev of registry.replay()) send(client, ev);
  });
  const adapter: Adapter = {
    send(ev) {
      registry.record(ev);
      for (const client of wss.clients) send(client, ev);
    },
  };
  const inspector = createInspector(adapter, { autoStart: true });
  const address = wss.address();
  return {
    inspect: inspector.inspect as Observer<InspectionEvent>,
    port: typeof address === 'object' && address ? address.port : port,
    clients: () => wss.clients.size,
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of wss.clients) c.terminate();
        wss.close(() => resolve());
      }),
  };
}
