/**
 * CLI start-up, side by side with `node -e 0` in one run (alternating, so drift hits both): `banger --version`
 * and `banger vm list` with the daemon up. Wall-clock medians over `runs` pairs, and the ratio to node itself.
 */
import { execa } from 'execa';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

type Line = (k: string, v: string) => void;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function wall(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<number> {
  const t0 = performance.now();
  await execa(file, args, { env, reject: false });
  return performance.now() - t0;
}

export async function benchCli(line: Line, bin: string, runs = 15): Promise<void> {
  console.log(`CLI start-up against node -e 0 (median of ${runs} alternating runs; dist/ must be fresh: npm run build)`);
  const home = mkdtempSync(join(tmpdir(), 'bgb-cli-'));
  const env = { ...process.env, BANGER_HOME: home, BANGER_RUNTIME_DIR: join(home, 'run'), BANGER_ROOT_HELPER: 'off', NO_COLOR: '1' };
  try {
    await execa(process.execPath, [bin, 'daemon', 'start'], { env });
    const cases: Array<[string, string[]]> = [['banger --version', ['--version']], ['banger vm list (daemon up)', ['vm', 'list']]];
    for (const [name, args] of cases) {
      const a: number[] = [];
      const b: number[] = [];
      for (let i = 0; i < runs; i++) {
        a.push(await wall(process.execPath, [bin, ...args], env));
        b.push(await wall(process.execPath, ['-e', '0'], env));
      }
      line(name, `${median(a).toFixed(0)} ms vs node -e 0 ${median(b).toFixed(0)} ms (×${(median(a) / median(b)).toFixed(2)})`);
    }
  } finally {
    await execa(process.execPath, [bin, 'daemon', 'stop'], { env, reject: false });
    rmSync(home, { recursive: true, force: true });
  }
}
