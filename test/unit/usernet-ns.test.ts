import { describe, expect, it } from 'vitest';
import { BLOCKED_RANGES } from '../../src/host/net/firewall-rules.js';
import { nsForwards, prohibitRoutes, userNsFiles, wrapInNamespace } from '../../src/host/net/usernet-ns.js';

describe('isolated user net', () => {
  const files = userNsFiles('/run/b', '/var/b/vms/abc', 'abc');

  it('runs QEMU under unshare (user, net, mount namespaces) with its argv passed through untouched', () => {
    const { file, args } = wrapInNamespace(files, 'qemu-system-x86_64', ['-name', 'x; rm -rf /', '-qmp', 'unix:/run/b/abc.qmp']);
    expect(file).toBe('unshare');
    expect(args.slice(0, 5)).toEqual(['--user', '--map-root-user', '--net', '--mount', '--']);
    // the script is constant; every path and QEMU argument is a separate argv entry
    expect(args.slice(9)).toEqual([files.fifo, files.routes, files.resolvConf, 'qemu-system-x86_64', '-name', 'x; rm -rf /', '-qmp', 'unix:/run/b/abc.qmp']);
    expect(args[7]).not.toContain('abc');
  });

  it('prohibits every blocked range and each host address inside the namespace', () => {
    const lines = prohibitRoutes(['10.77.0.2', '203.0.113.5']).trim().split('\n');
    expect(lines[0]).toBe('link set lo up');
    for (const r of BLOCKED_RANGES) expect(lines).toContain(`route add prohibit ${r}`);
    expect(lines).toContain('route add prohibit 203.0.113.5/32');
    expect(lines).toContain('route add prohibit 10.77.0.2/32');
  });

  it('gives each forward its own namespace port, SSH first', () => {
    const f = nsForwards([
      { hostAddress: '127.0.0.1', hostPort: 2222, guestPort: 22 },
      { hostAddress: '0.0.0.0', hostPort: 8080, guestPort: 80 },
    ]);
    expect(f.map((x) => x.nsPort)).toEqual([10000, 10001]);
  });
});
