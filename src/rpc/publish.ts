/**
 * Published ports: `--publish [HOSTADDR:]HOSTPORT:GUESTPORT`, a TCP port on the host that reaches a port in the
 * guest. Pure (no imports): the CLI checks the flag before it reaches the daemon, the daemon checks it again.
 */

export interface PublishedPort {
  /** An IPv4 address of the host to listen on; 127.0.0.1 unless given. */
  hostAddress: string;
  hostPort: number;
  guestPort: number;
}

export class PublishError extends Error {
  constructor(
    message: string,
    readonly hint: string,
  ) {
    super(message);
  }
}

const FORM = 'the form is [HOSTADDR:]HOSTPORT:GUESTPORT, e.g. 8080:8080 or 127.0.0.1:3000:3000';
const IPV4_RE = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

function port(what: string, raw: string, spec: string): number {
  if (!/^\d{1,5}$/.test(raw)) throw new PublishError(`--publish ${JSON.stringify(spec)}: ${what} ${JSON.stringify(raw)} is not a port number`, `ports are 1-65535; ${FORM}`);
  const n = Number(raw);
  if (n < 1 || n > 65535) throw new PublishError(`--publish ${JSON.stringify(spec)}: ${what} ${n} is out of range`, `ports are 1-65535; ${FORM}`);
  return n;
}

/** Parses one `--publish` value. Throws PublishError naming what is wrong. */
export function parsePublish(spec: string): PublishedPort {
  const parts = spec.trim().split(':');
  if (parts.length < 2 || parts.length > 3) throw new PublishError(`--publish ${JSON.stringify(spec)} is not a port mapping`, FORM);
  const hostAddress = parts.length === 3 ? parts[0] : '127.0.0.1';
  if (!IPV4_RE.test(hostAddress)) {
    throw new PublishError(`--publish ${JSON.stringify(spec)}: ${JSON.stringify(hostAddress)} is not an IPv4 address`, `give a host IPv4 address such as 127.0.0.1 or 0.0.0.0; ${FORM}`);
  }
  return { hostAddress, hostPort: port('host port', parts[parts.length - 2], spec), guestPort: port('guest port', parts[parts.length - 1], spec) };
}

/** `127.0.0.1:8080:80` */
export function formatPublish(p: PublishedPort): string {
  return `${p.hostAddress}:${p.hostPort}:${p.guestPort}`;
}

/** Parses every value and refuses two that claim the same host port (0.0.0.0 overlaps every address). */
export function parsePublishList(specs: readonly string[]): PublishedPort[] {
  const out = specs.map(parsePublish);
  for (let i = 0; i < out.length; i++) {
    for (let j = 0; j < i; j++) {
      const a = out[i];
      const b = out[j];
      const overlap = a.hostAddress === b.hostAddress || a.hostAddress === '0.0.0.0' || b.hostAddress === '0.0.0.0';
      if (a.hostPort === b.hostPort && overlap) {
        throw new PublishError(`--publish ${formatPublish(b)} and ${formatPublish(a)} both claim host port ${a.hostPort}`, 'give each published port its own host port');
      }
    }
  }
  return out;
}
