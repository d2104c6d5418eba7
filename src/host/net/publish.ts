/**
 * Published ports on the host. A user-net VM's are passt's forwards (passt.ts); a tap VM's are TCP proxies in the
 * daemon (below), opened while the daemon watches the running VM and closed when it stops, so a restarted daemon
 * opens them again when it adopts the VM.
 */
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { BangerError, errorMessage } from '../../errors.js';
import { formatPublish, type PublishedPort } from '../../rpc/publish.js';

function listen(p: PublishedPort, onConnection: (s: Socket) => void): Promise<Server> {
  return new Promise((resolve, reject) => {
    // Half-open both ways: a client that shuts down its side after the request still gets the whole answer.
    const srv = createServer({ allowHalfOpen: true }, onConnection);
    srv.once('error', (e: NodeJS.ErrnoException) => {
      const taken = e.code === 'EADDRINUSE';
      reject(
        new BangerError(
          'conflict',
          `cannot publish ${formatPublish(p)}: host port ${p.hostAddress}:${p.hostPort} ${taken ? 'is already in use' : `cannot be bound (${e.code ?? errorMessage(e)})`}`,
          taken ? 'stop what listens there, or publish another host port' : 'publish an address this host has, and a port above 1023 unless the daemon runs as root',
        ),
      );
    });
    srv.listen({ host: p.hostAddress, port: p.hostPort, exclusive: true }, () => resolve(srv));
  });
}

const closeServer = (s: Server) => new Promise<void>((r) => s.close(() => r()));

/** Refuses (naming the port) when any host port is taken now. A moment later another process may still take it. */
export async function checkHostPortsFree(ports: readonly PublishedPort[]): Promise<void> {
  for (const p of ports) await closeServer(await listen(p, (s) => s.destroy()));
}

export interface PortProxies {
  close(): Promise<void>;
}

/** Forwards each published host port to `guestIp`:GUESTPORT, one TCP connection to the guest per client. */
export async function startPortProxies(ports: readonly PublishedPort[], guestIp: string): Promise<PortProxies> {
  const servers: Server[] = [];
  const open = new Set<Socket>();
  const close = async () => {
    for (const s of open) s.destroy();
    await Promise.all(servers.map(closeServer));
  };
  try {
    for (const p of ports) {
      servers.push(
        await listen(p, (client) => {
          const guest = createConnection({ host: guestIp, port: p.guestPort, allowHalfOpen: true });
          for (const s of [client, guest]) {
            open.add(s);
            s.once('close', () => open.delete(s));
            s.on('error', () => {
              client.destroy();
              guest.destroy();
            });
          }
          client.pipe(guest);
          guest.pipe(client);
        }),
      );
    }
  } catch (e) {
    await close();
    throw e;
  }
  return { close };
}
