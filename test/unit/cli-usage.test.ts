/**
 * Usage errors exit 2 from the real CLI at once: no daemon is started, nothing is created.
 * Each case runs `node bin/banger.js` with its own empty BANGER_HOME, runtime dir and HOME.
 */
import { execa } from 'execa';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

const BIN = fileURLToPath(new URL('../../bin/banger.js', import.meta.url));

let root: string;
let dirs: { home: string; run: string; userHome: string; cache: string };

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'banger-usage-'));
  dirs = { home: join(root, 'h'), run: join(root, 'r'), userHome: join(root, 'u'), cache: join(root, 'c') };
  for (const d of Object.values(dirs)) await mkdir(d);
});

afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

async function banger(args: string[]) {
  return execa(process.execPath, [BIN, ...args], {
    reject: false,
    timeout: 20_000,
    extendEnv: false,
    env: {
      PATH: process.env.PATH,
      HOME: dirs.userHome,
      BANGER_HOME: dirs.home,
      BANGER_RUNTIME_DIR: dirs.run,
      BANGER_CACHE_DIR: dirs.cache,
      BANGER_ROOT_HELPER: 'off',
      NO_COLOR: '1',
    },
  });
}

async function expectNothingStarted(): Promise<void> {
  // A daemon would leave daemon.sock / daemon.pid / daemon.lock in the runtime dir and banger.db in BANGER_HOME.
  for (const d of Object.values(dirs)) expect(await readdir(d), `${d} stays empty`).toEqual([]);
}

const cases: Array<[string, string[], RegExp]> = [
  ['a vcpus count that is not a number', ['vm', 'create', '--vcpus', 'abc'], /--vcpus "abc" is not a whole number/],
  ['too many vcpus', ['vm', 'create', '--vcpus', '65'], /--vcpus 65 is out of range/],
  ['too little memory', ['vm', 'create', '--memory', '64'], /--memory 64 is out of range/],
  ['a zero disk', ['vm', 'create', '--disk', '0'], /--disk 0 is too small/],
  ['a disk size that is not a size', ['vm', 'create', '--disk', 'lots'], /--disk "lots" is not a size/],
  ['an unknown vmm', ['vm', 'create', '--vmm', 'bogus'], /vmm.*"bogus".*auto.*firecracker.*qemu/],
  ['an unknown net mode', ['vm', 'create', '--net', 'bogus'], /net.*"bogus".*auto.*tap.*user/],
  ['an unknown command', ['bogus'], /Unknown argument: bogus/],
  ['a vm name only the ^ anchor refuses', ['vm', 'create', '--name', '!abc'], /invalid vm name "!abc"/],
  ['an invalid image name', ['vm', 'create', '--image', '../etc'], /invalid image name "..\/etc"/],
  ['vm run with a zero disk', ['vm', 'run', '--disk', '0', '--', 'true'], /--disk 0 is too small/],
  ['a published port out of range', ['vm', 'create', '--publish', '8080:70000'], /--publish "8080:70000": guest port 70000 is out of range/],
  ['vm run publishing one host port twice', ['vm', 'run', '--publish', '8080:80', '--publish', '127.0.0.1:8080:81', '--', 'true'], /both claim host port 8080/],
  ['vm set with memory that is not a number', ['vm', 'set', 'x', '--memory', '1.5'], /--memory "1.5" is not a whole number/],
];

describe('usage errors exit 2 without starting a daemon', () => {
  it.each(cases)('%s', async (_what, args, problem) => {
    const r = await banger(args);
    expect(r.exitCode, r.stderr).toBe(2);
    expect(r.stdout).toBe('');
    const lines = r.stderr.split('\n').filter(Boolean);
    expect(lines[0]).toMatch(problem);
    expect(lines[0]).toMatch(/^(usage error|error):/);
    // One line for the problem and at most one for the fix; never a stack.
    expect(lines.length).toBeLessThanOrEqual(2);
    if (lines[1]) expect(lines[1]).toMatch(/^hint: /);
    expect(r.stderr).not.toMatch(/unexpected error|\n\s+at /);
    await expectNothingStarted();
  });
});
