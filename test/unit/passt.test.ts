import { describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { passtArgv, passtNetdev, passtSocketPath } from '../../src/host/net/passt.js';

const ids = { uid: 1000, gid: 1000 };
const values = (argv: string[], flag: string) => argv.flatMap((a, i) => (a === flag ? [argv[i + 1]] : []));

describe('passt', () => {
  it('never maps the gateway to the host and serves one QEMU only', () => {
    const argv = passtArgv('/run/b/x.passt', [], ids);
    expect(argv).toContain('--no-map-gw');
    expect(argv).toContain('--one-off');
    expect(argv).toContain('--foreground');
    expect(values(argv, '--socket')).toEqual(['/run/b/x.passt']);
    expect(values(argv, '--udp-ports')).toEqual(['none']);
    expect(values(argv, '--tcp-ports')).toEqual([]);
    expect(values(argv, '--runas')).toEqual(['1000:1000']);
  });

  it('forwards each port from its own host address', () => {
    const argv = passtArgv('/s', [
      { hostAddress: '127.0.0.1', hostPort: 40022, guestPort: 22 },
      { hostAddress: '0.0.0.0', hostPort: 8080, guestPort: 3000 },
    ], ids);
    expect(values(argv, '--tcp-ports')).toEqual(['127.0.0.1/40022:22', '0.0.0.0/8080:3000']);
  });

  it.each([
    { hostAddress: '127.0.0.1,1', hostPort: 1, guestPort: 2 },
    { hostAddress: 'localhost', hostPort: 1, guestPort: 2 },
    { hostAddress: '127.0.0.1', hostPort: 0, guestPort: 2 },
    { hostAddress: '127.0.0.1', hostPort: 1, guestPort: 65536 },
    { hostAddress: '127.0.0.1', hostPort: 1.5, guestPort: 2 },
  ])('refuses a bad forward %o', (f) => {
    expect(() => passtArgv('/s', [f], ids)).toThrow(BangerError);
  });

  it('names the socket after the VM and escapes commas for QEMU', () => {
    expect(passtSocketPath('/run/b', 'abc')).toBe('/run/b/abc.passt');
    expect(passtNetdev('/r,x/s')).toBe('stream,id=n0,server=off,addr.type=unix,addr.path=/r,,x/s');
    expect(() => passtSocketPath(`/${'d'.repeat(120)}`, 'abc')).toThrow();
  });
});
