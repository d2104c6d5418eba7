/**
 * node --import tsx bench/sessions.ts [--runs N]
 * Issue 11's figures against one real guest: `vm.exec true` on a cold connection (the first after a daemon
 * start) against a warm one (the pooled connection), and guest.session.send latency per line (p50, p99) and
 * throughput in lines per second, alone and with four concurrent senders. Prints; asserts nothing.
 */
import { execa } from 'execa';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { imageHome, TEST_IMAGE } from '../test/e2e/image-cache.js';

const args = process.argv.slice(2);
const runs = Number(args.includes('--runs') ? args[args.indexOf('--runs') + 1] : 3);


const src = join(imageHome(), 'images', TEST_IMAGE);
if (!existsSync(src)) throw new Error(`no cached test image at ${src}: run an e2e test once to build it (or set BANGER_TEST_CACHE)`);
const home = mkdtempSync(join(tmpdir(), 'bgb-sess-'));
const runDir = mkdtempSync('/tmp/bgbr-');
mkdirSync(join(home, 'images'), { recursive: true });
await execa('cp', ['-al', src, join(home, 'images', TEST_IMAGE)]);
Object.assign(process.env, { BANGER_HOME: home, BANGER_RUNTIME_DIR: runDir, BANGER_CACHE_DIR: join(home, 'cache'), BANGER_ROOT_HELPER: 'off', NO_COLOR: '1' });
delete process.env.XDG_RUNTIME_DIR;
const { connectDaemon } = await import('../src/cli/connect.js');

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];
const median = (xs: number[]) => pct(xs, 50);
const ms = (n: number) => `${n.toFixed(1)} ms`;
const line = (k: string, v: string) => console.log(`  ${k.padEnd(52)} ${v}`);
const timed = async (fn: () => Promise<unknown>) => {
  const t = performance.now();
  await fn();
  return performance.now() - t;
};

async function restartDaemon(): Promise<void> {
  const c = await connectDaemon();
  await c.call('daemon.stop', {}).catch(() => {});
  c.close();
  await new Promise((r) => setTimeout(r, 1000));
}

try {
  let c = await connectDaemon();
  await c.call('vm.create', { name: 'bench', start: true, wait: true });
  const cold: number[] = [];
  for (let i = 0; i < runs; i++) {
    c.close();
    await restartDaemon();
    c = await connectDaemon();
    await c.call('vm.list', {});
    cold.push(await timed(() => c.call('vm.exec', { vm: 'bench', argv: ['true'] })));
  }
  const warm: number[] = [];
  for (let i = 0; i < 20; i++) warm.push(await timed(() => c.call('vm.exec', { vm: 'bench', argv: ['true'] })));
  console.log('vm.exec true (RPC round trip through the daemon)');
  line(`cold: first after a daemon start (median of ${runs})`, ms(median(cold)));
  line('warm: pooled connection (median of 20)', ms(median(warm)));
  line('cold / warm', `${(median(cold) / median(warm)).toFixed(1)}x`);

  await c.call('guest.session.start', { vm: 'bench', name: 'echo', pipe: true, argv: ['cat'] });
  const row = `${JSON.stringify({ hello: 'x'.repeat(180) })}\n`;
  const per: number[] = [];
  for (let i = 0; i < 100; i++) per.push(await timed(() => c.call('guest.session.send', { vm: 'bench', session: 'echo', data: row })));
  console.log('guest.session.send, one 200-byte line per call');
  line('latency p50 / p99 (100 sends)', `${ms(pct(per, 50))} / ${ms(pct(per, 99))}`);
  line('lines per second, one sender', (1000 / median(per)).toFixed(0));
  const batch = row.repeat(500);
  const one = await timed(() => c.call('guest.session.send', { vm: 'bench', session: 'echo', data: batch }));
  line('lines per second, 500 lines in one send', ((500 * 1000) / one).toFixed(0));
  const four = await timed(() => Promise.all([0, 1, 2, 3].map(() => c.call('guest.session.send', { vm: 'bench', session: 'echo', data: batch }))));
  line('lines per second, four concurrent senders × 500', ((2000 * 1000) / four).toFixed(0));
  await c.call('vm.delete', { vm: 'bench', wait: true });
  await c.call('daemon.stop', {}).catch(() => {});
  c.close();
} finally {
  // Whatever happened above: no guest or daemon of this bench outlives it.
  const c = await connectDaemon(false).catch(() => undefined);
  await c?.call('vm.delete', { vm: 'bench', wait: true }).catch(() => {});
  await c?.call('daemon.stop', {}).catch(() => {});
  c?.close();
  rmSync(home, { recursive: true, force: true });
  rmSync(runDir, { recursive: true, force: true });
}
