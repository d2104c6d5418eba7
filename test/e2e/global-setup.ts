/**
 * Builds the e2e test image once per run (or takes it from the cache: test/e2e/image-cache.ts). Outside CI a machine that cannot
 * build or boot guests makes the e2e tests skip with the reason; under CI (CI=true) that is a failure.
 */
import { existsSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import type { TestProject } from 'vitest/node';
import { imageHome, TEST_IMAGE, testCacheRoot } from './image-cache.js';

const BIN = join(import.meta.dirname, '..', '..', 'bin', 'banger.js');

async function have(cmd: string): Promise<boolean> {
  const r = await execa('sh', ['-c', `command -v ${cmd} || test -x /usr/sbin/${cmd}`], { reject: false });
  return r.exitCode === 0;
}

export default async function setup(project: TestProject): Promise<void> {
  let reason: string | undefined;
  for (const cmd of ['qemu-system-x86_64', 'mkfs.ext4', 'debugfs', 'ssh', 'git']) {
    if (!(await have(cmd))) reason ??= `${cmd} is not installed (run scripts/bootstrap.sh)`;
  }
  if (!reason && !(await have('mmdebstrap')) && !(await have('debootstrap'))) reason = 'neither mmdebstrap nor debootstrap is installed';
  if (!reason && process.getuid?.() !== 0) reason = 'building the test image needs root (mmdebstrap --mode=root)';
  const home = imageHome();
  mkdirSync(testCacheRoot(), { recursive: true });
  if (!reason && !existsSync(join(home, 'images', TEST_IMAGE, 'manifest.json'))) {
    const run = join('/tmp', `bgt-img-${process.pid}`);
    const t0 = Date.now();
    process.stderr.write(`e2e: building the test image ${TEST_IMAGE} into ${home} (cached for later runs)\n`);
    // Everything banger keeps goes into the test cache, nothing into HOME (CI gives every run a fresh one).
    const env = { ...process.env, BANGER_HOME: home, BANGER_RUNTIME_DIR: run, BANGER_CACHE_DIR: join(testCacheRoot(), 'banger-cache'), NO_COLOR: '1' };
    const r = await execa(process.execPath, [BIN, 'image', 'pull', TEST_IMAGE], {
      env,
      reject: false,
      timeout: 20 * 60_000,
      all: true,
    });
    await execa(process.execPath, [BIN, 'daemon', 'stop'], { env, reject: false, timeout: 30_000 });
    rmSync(run, { recursive: true, force: true });
    if (r.exitCode !== 0) reason = `building the test image failed (exit ${r.exitCode}):\n${String(r.all).slice(-3000)}`;
    else process.stderr.write(`e2e: test image built in ${((Date.now() - t0) / 1000).toFixed(0)} s\n`);
  }
  if (reason && process.env.CI === 'true') throw new Error(`e2e tests cannot run under CI: ${reason}`);
  project.provide('e2eSkipReason', reason ?? '');
  writeFileSync(join(testCacheRoot(), 'last-setup.txt'), reason ?? 'ok');
}

declare module 'vitest' {
  export interface ProvidedContext {
    e2eSkipReason: string;
  }
}
