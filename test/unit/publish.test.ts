import { connect, createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { formatPublish, parsePublish, parsePublishList, PublishError } from '../../src/rpc/publish.js';
import { checkHostPortsFree, startPortProxies } from '../../src/host/net/publish.js';
import { passtArgv } from '../../src/host/net/passt.js';

const err = (f: () => unknown) => {
  try {
    f();
  } catch (e) {
    return e as PublishError;
  }
  throw new Error('expected an error');
};

describe('--publish parsing', () => {
  it('binds to 127.0.0.1 unless an address is given', () => {
    expect(parsePublish('8080:80')).toEqual({ hostAddress: '127.0.0.1', hostPort: 8080, guestPort: 80 });
    expect(parsePublish('0.0.0.0:3000:3000')).toEqual({ hostAddress: '0.0.0.0', hostPort: 3000, guestPort: 3000 });
    expect(parsePublish(' 192.168.1.5:1:65535 ')).toEqual({ hostAddress: '192.168.1.5', hostPort: 1, guestPort: 65535 });
    expect(formatPublish(parsePublish('8080:80'))).toBe('127.0.0.1:8080:80');
  });

  it.each([
    ['8080', /is not a port mapping/],
    ['1:2:3:4', /is not a port mapping/],
    ['0:80', /host port 0 is out of range/],
    ['80:65536', /guest port 65536 is out of range/],
    ['abc:80', /host port "abc" is not a port number/],
    ['80:', /guest port "" is not a port number/],
    ['-1:80', /host port "-1" is not a port number/],
    ['localhost:80:80', /"localhost" is not an IPv4 address/],
    ['256.1.1.1:80:80', /"256.1.1.1" is not an IPv4 address/],
    ['[::1]:80:80', /is not a port mapping/],
  ])('refuses %s, naming the problem', (spec, re) => {
    const e = err(() => parsePublish(spec));
    expect(e).toBeInstanceOf(PublishError);
    expect(e.message).toMatch(re);
    expect(e.message).toContain(JSON.stringify(spec));
    expect(e.hint).toMatch(/HOSTPORT:GUESTPORT|1-65535/);
  });

  it('refuses two values that claim the same host port', () => {
    expect(err(() => parsePublishList(['8080:80', '127.0.0.1:8080:81'])).message).toMatch(/both claim host port 8080/);
    expect(err(() => parsePublishList(['0.0.0.0:8080:80', '10.0.0.1:8080:81'])).message).toMatch(/both claim host port 8080/);
    expect(parsePublishList(['127.0.0.1:8080:80', '127.0.0.2:8080:80', '8081:80'])).toHaveLength(3);
  });
});

describe('published ports on the host', () => {
  it('a host port already bound is a conflict naming it', async () => {
    const srv = createServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
    const port = (srv.address() as { port: number }).port;
    try {
      await expect(checkHostPortsFree([{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 80 }])).rejects.toThrow(
        new RegExp(`host port 127.0.0.1:${port} is already in use`),
      );
    } finally {
      srv.close();
    }
    await expect(checkHostPortsFree([{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 80 }])).resolves.toBeUndefined();
  });

  it("a tap VM's proxy carries a connection to the guest's port both ways, and closing it frees the host port", async () => {
    // the "guest": an echo server on another loopback port
    const guest = createServer((c) => c.pipe(c));
    await new Promise<void>((r) => guest.listen(0, '127.0.0.1', () => r()));
    const guestPort = (guest.address() as { port: number }).port;
    const free = createServer();
    await new Promise<void>((r) => free.listen(0, '127.0.0.1', () => r()));
    const hostPort = (free.address() as { port: number }).port;
    await new Promise<void>((r) => free.close(() => r()));
    const proxies = await startPortProxies([{ hostAddress: '127.0.0.1', hostPort, guestPort }], '127.0.0.1');
    try {
      const echoed = await new Promise<string>((resolve, reject) => {
        const c = connect(hostPort, '127.0.0.1', () => c.end('ping through the proxy'));
        let d = '';
        c.on('data', (x) => (d += x));
        c.on('end', () => resolve(d));
        c.on('error', reject);
      });
      expect(echoed).toBe('ping through the proxy');
      await expect(startPortProxies([{ hostAddress: '127.0.0.1', hostPort, guestPort }], '127.0.0.1')).rejects.toThrow(/is already in use/);
    } finally {
      await proxies.close();
      guest.close();
    }
    await expect(checkHostPortsFree([{ hostAddress: '127.0.0.1', hostPort, guestPort }])).resolves.toBeUndefined();
  });

  it("passt gets the host's gateway unmapped, IPv4 only, and one --tcp-ports per forward", () => {
    const argv = passtArgv('/run/b/x.passt', [{ hostAddress: '127.0.0.1', hostPort: 40022, guestPort: 22 }, { hostAddress: '0.0.0.0', hostPort: 8080, guestPort: 80 }], { uid: 1000, gid: 1000 });
    expect(argv).toContain('--no-map-gw');
    expect(argv).toContain('--one-off');
    expect(argv).toContain('--ipv4-only');
    expect(argv.filter((a, i) => argv[i - 1] === '--tcp-ports')).toEqual(['127.0.0.1/40022:22', '0.0.0.0/8080:80']);
    expect(argv[argv.indexOf('--socket') + 1]).toBe('/run/b/x.passt');
    expect(argv[argv.indexOf('--runas') + 1]).toBe('1000:1000');
  });
});
