/**
 * The KVM probe. Its probe boot needs a bootable kernel: $BANGER_TEST_KERNEL (and $BANGER_TEST_INITRD when that
 * kernel needs one), else the e2e test image's vmlinuz and initrd.img, which test/e2e/global-setup.ts builds or
 * takes from the cache. Without the image the probe boot skips with the reason outside CI and fails under CI
 * (describeE2E); the tests that need no kernel always run.
 */
import { constants } from 'node:fs';
import { access, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { probeKvm } from '../../src/host/qemu.js';
import { which } from '../../src/host/runner.js';
import { describeE2E } from './harness.js';
import { imageHome, TEST_IMAGE } from './image-cache.js';

const qemuBin = process.env.BANGER_QEMU_BIN ?? 'qemu-system-x86_64';
const kernelFromEnv = process.env.BANGER_TEST_KERNEL || undefined;
const imageDir = join(imageHome(), 'images', TEST_IMAGE);
/** The kernel (and initrd) to probe with: the one named in the environment, else the test image's. */
const kernel = kernelFromEnv ?? join(imageDir, 'vmlinuz');
const initrd = kernelFromEnv ? process.env.BANGER_TEST_INITRD || undefined : join(imageDir, 'initrd.img');
const readable = (p: string) => access(p, constants.R_OK).then(
  () => true,
  () => false,
);
/** A kernel named in the environment needs no test image: run whatever the e2e setup found, and fail if it is unusable. */
const describeProbeBoot = kernelFromEnv ? describe : describeE2E;

/** What the probe must conclude here. This project's machines are nested VMs where stock kernels cannot run under KVM. */
const expected = (process.env.BANGER_EXPECT_KVM ?? 'unusable') === 'usable';

let dir: string | undefined;
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('probeKvm', () => {
  it('says no without opening anything when the KVM device is missing', async () => {
    const d = await mkdtemp(join(tmpdir(), 'bkvm-'));
    try {
      const v = await probeKvm({ kernel: '/nonexistent', cacheFile: join(d, 'kvm.json'), kvmDevice: join(d, 'no-kvm') });
      expect(v).toMatchObject({ usable: false, cached: false });
      expect(v.reason).toMatch(/cannot be opened/);
    } finally {
      await rm(d, { recursive: true, force: true });
    }
  });

  it('reads the verdict from the serial console and kills the probe VM (fake QEMU)', { timeout: 30_000 }, async () => {
    const d = await mkdtemp(join(tmpdir(), 'bkvm-'));
    try {
      const { writeFile, chmod } = await import('node:fs/promises');
      // Fake QEMU: writes a kernel line to the -serial file, then hangs like a VM would.
      const ran = join(d, 'qemu-ran');
      await writeFile(
        ran,
        `#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -serial ] && f=\${2#file:}; shift; done\necho $$ > ${d}/ran.pid\necho '[    0.9] Run /init as init process' > "$f"\nexec sleep 600\n`,
      );
      const hang = join(d, 'qemu-hang');
      await writeFile(hang, `#!/bin/sh\necho $$ > ${d}/hang.pid\nexec sleep 600\n`);
      await chmod(ran, 0o755);
      await chmod(hang, 0o755);
      const gone = async (pidFile: string) => {
        const pid = Number((await readFile(pidFile, 'utf8')).trim());
        try {
          process.kill(pid, 0);
          return false;
        } catch {
          return true;
        }
      };

      const ok = await probeKvm({ kernel: ran, cacheFile: join(d, 'a.json'), kvmDevice: '/dev/null', qemuBin: ran, timeoutMs: 10_000 });
      expect(ok).toMatchObject({ usable: true, cached: false });
      expect(ok.reason).toMatch(/Run \/init as init process/);
      expect(await gone(join(d, 'ran.pid'))).toBe(true);

      const t0 = Date.now();
      const no = await probeKvm({ kernel: hang, cacheFile: join(d, 'b.json'), kvmDevice: '/dev/null', qemuBin: hang, timeoutMs: 1000 });
      expect(no).toMatchObject({ usable: false, cached: false });
      expect(no.reason).toMatch(/no sign of the kernel running within 1000 ms/);
      expect(Date.now() - t0).toBeLessThan(8000);
      expect(await gone(join(d, 'hang.pid'))).toBe(true);
      expect((await probeKvm({ kernel: hang, cacheFile: join(d, 'b.json'), kvmDevice: '/dev/null', qemuBin: hang })).cached).toBe(true);
    } finally {
      await rm(d, { recursive: true, force: true });
    }
  });
});

describeProbeBoot('probeKvm with a real kernel', () => {
  it(`decides by a probe boot (expect ${expected ? 'usable' : 'not usable'}) and caches the verdict`, { timeout: 90_000 }, async () => {
    expect(await which(qemuBin), `${qemuBin} is not installed`).toBeTruthy();
    for (const f of [kernel, initrd]) {
      if (f) expect(await readable(f), `${f} is not readable${kernelFromEnv ? '' : ' (the e2e test image is incomplete)'}`).toBe(true);
    }
    dir = await mkdtemp(join(tmpdir(), 'bkvm-'));
    const cacheFile = join(dir, 'cache', 'kvm-probe.json');
    const t0 = Date.now();
    const first = await probeKvm({ kernel, initrd, cacheFile, timeoutMs: 20_000 });
    const firstMs = Date.now() - t0;
    console.log(`KVM probe: ${JSON.stringify(first)} in ${firstMs} ms`);
    expect(first.cached).toBe(false);
    expect(first.usable).toBe(expected);
    expect(first.reason.length).toBeGreaterThan(0);

    const cache = JSON.parse(await readFile(cacheFile, 'utf8'));
    expect(cache).toMatchObject({ usable: first.usable, key: { kernel: expect.any(String), size: expect.any(Number), hostKernel: expect.any(String) } });

    const t1 = Date.now();
    const second = await probeKvm({ kernel, initrd, cacheFile, timeoutMs: 20_000 });
    expect(second).toEqual({ ...first, cached: true });
    expect(Date.now() - t1).toBeLessThan(2000);

    // No probe VM is left behind.
    const { run } = await import('../../src/host/runner.js');
    const ps = await run('ps', ['-eo', 'args'], { timeoutMs: 5000 });
    expect(ps.stdout).not.toMatch(/qemu-system\S* .*-accel kvm -cpu host .*banger-kvmprobe-/);
  });
});
