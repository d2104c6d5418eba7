/**
 * Fast start, side by side in one run (QEMU, user networking, 1 vCPU, 1 GiB): cold boot → SSH (vm create), restore
 * → SSH (vm restore of a snapshot of that VM), fork × 4 (wall time), and a warm-pool `vm run --rm -- true` end to
 * end (a second home whose config keeps one VM of that kind booted). Nothing is asserted.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';

type Line = (k: string, v: string) => void;
interface Home {
  h: string;
  env: Record<string, string>;
  cli: (a: string[]) => Promise<any>;
  cleanup: () => Promise<void>;
}

const ms = (n: number) => (n >= 1000 ? `${(n / 1000).toFixed(2)} s` : `${n.toFixed(1)} ms`);
const KIND = ['--vcpus', '1', '--memory', '1024', '--disk', '2G'];

async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const r = await fn();
  return [r, performance.now() - t0];
}

export async function benchSnapshots(line: Line, home: (extra?: Record<string, string>) => Promise<Home>, bin: string): Promise<void> {
  console.log('fast start: cold boot → SSH vs restore → SSH vs warm pool vm run --rm -- true; fork × 4 (QEMU, user net, 1 vCPU, 1 GiB)');
  // Boots on a loaded machine can take minutes: the bench measures them, it does not time them out.
  const slow = { bootTimeoutMs: 1_800_000 };
  const a = await home();
  writeFileSync(join(a.h, 'config.json'), JSON.stringify(slow));
  let cold = NaN;
  let restore = NaN;
  try {
    // Each figure is printed as soon as it is measured: a later step that fails does not lose the earlier ones.
    [, cold] = await timed(() => a.cli(['vm', 'create', '--name', 'cold', ...KIND]));
    line('cold boot → SSH (vm create)', ms(cold));
    // --stop: the restore is timed with nothing else running, as the cold boot was (a source VM resumed just before
    // spends seconds of CPU catching up on its timers, on the same 2 cores).
    const [snap, save] = await timed(() => a.cli(['vm', 'snapshot', 'cold', '--name', 'snap', '--stop']));
    line(`snapshot --stop (vm snapshot; ${Math.round(snap.stateBytes / 2 ** 20)} MiB of state)`, ms(save));
    [, restore] = await timed(() => a.cli(['vm', 'restore', 'snap', '--name', 'restored']));
    line('restore → SSH (vm restore)', ms(restore));
    const logs = (await a.cli(['vm', 'logs', 'restored'])) as Array<{ stage: string; status: string; durationMs: number | null }>;
    const stages = logs.filter((r) => r.status === 'done' && r.durationMs !== null).map((r) => `${r.stage} ${ms(r.durationMs!)}`);
    line('  its stages', stages.join(', '));
    line('ratio cold boot / restore (goal ≥ 10)', (cold / restore).toFixed(1));
    await a.cli(['vm', 'delete', 'cold', 'restored']);
    const [, fork4] = await timed(() => a.cli(['vm', 'fork', 'snap', '--count', '4', '--name-prefix', 'k']));
    line('fork × 4 of a snapshot, wall time', ms(fork4));
  } finally {
    await a.cleanup();
  }
  const b = await home();
  try {
    writeFileSync(join(b.h, 'config.json'), JSON.stringify({ ...slow, warmPool: [{ image: 'debian-bookworm', size: 1, vcpus: 1, memoryMiB: 1024 }], defaultDisk: '2G' }));
    const deadline = Date.now() + 30 * 60_000;
    for (;;) {
      const st = await b.cli(['daemon', 'status']);
      if (st.warmPool?.[0]?.ready >= 1) break;
      if (Date.now() > deadline) throw new Error('the warm pool had no VM ready within 30 minutes');
      await new Promise((r) => setTimeout(r, 2000));
    }
    const [r, run] = await timed(() => execa(process.execPath, [bin, 'vm', 'run', '--rm', '--vcpus', '1', '--memory', '1024', '--', 'true'], { env: b.env, reject: false }));
    if (r.exitCode !== 0) throw new Error(`vm run from the pool failed: ${r.stderr}`);
    line('warm pool: vm run --rm -- true, end to end (goal ≤ 2 s)', ms(run));
    line('ratio cold boot / warm-pool vm run', (cold / run).toFixed(1));
  } finally {
    await b.cleanup();
  }
}
