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
import { probeKvm } from '../../src/host/vmm/qemu/qemu.js';
import { which } from '../../src/host/exec/runner.js';
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

/**
 * The verdict is the host's to decide: no /dev/kvm, a /dev/kvm that cannot run this kernel (nested virtualization),
 * and a working KVM are all fine, as long as the verdict and its reason agree. Where the operator knows what the
 * machine must conclude, BANGER_EXPECT_KVM=usable|unusable pins it.
 */
const KVM_DEVICE = '/dev/kvm';
const pinned = process.env.BANGER_EXPECT_KVM;
if (pinned !== undefined && pinned !== 'usable' && pinned !== 'unusable') throw new Error(`BANGER_EXPECT_KVM must be usable or unusable, not ${JSON.stringify(pinned)}`);
const exists = (p: string) => access(p).then(
  () => true,
  () => false,
);

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

      const no = await probeKvm({ kernel: hang, cacheFile: join(d, 'b.json'), kvmDevice: '/dev/null', qemuBin: hang, timeoutMs: 1000 });
      expect(no).toMatchObject({ usable: false, cached: false });
      expect(no.reason).toMatch(/no sign of the kernel running within 1000 ms/);
      expect(await gone(join(d, 'hang.pid'))).toBe(true);
      expect((await probeKvm({ kernel: hang, cacheFile: join(d, 'b.json'), kvmDevice: '/dev/null', qemuBin: hang })).cached).toBe(true);
    } finally {
      await rm(d, { recursive: true, force: true });
    }
  });
});

describeProbeBoot('probeKvm with a real kernel', () => {
  it('decides from this host (no device, a device that cannot run the kernel, or working KVM) and caches a probe boot\'s verdict', { timeout: 90_000 }, async () => {
    expect(await which(qemuBin), `${qemuBin} is not installed`).toBeTruthy();
    for (const f of [kernel, initrd]) {
      if (f) expect(await readable(f), `${f} is not readable${kernelFromEnv ? '' : ' (the e2e test image is incomplete)'}`).toBe(true);
    }
    dir = await mkdtemp(join(tmpdir(), 'bkvm-'));
    const cacheFile = join(dir, 'cache', 'kvm-probe.json');
    const hasDevice = await exists(KVM_DEVICE);
    const first = await probeKvm({ kernel, initrd, cacheFile, timeoutMs: 20_000 });
    console.log(`KVM probe (${KVM_DEVICE} ${hasDevice ? 'present' : 'absent'}): ${JSON.stringify(first)}`);
    expect(first.cached).toBe(false);
    if (pinned) expect(first.usable, first.reason).toBe(pinned === 'usable');

    if (!hasDevice) {
      // decided without a probe boot: the reason names the device; nothing is cached (the device may appear later)
      expect(first.usable).toBe(false);
      expect(first.reason).toMatch(/^\/dev\/kvm cannot be opened \(ENOENT\)/);
      expect(await exists(cacheFile)).toBe(false);
      expect(await probeKvm({ kernel, initrd, cacheFile, timeoutMs: 20_000 })).toEqual(first);
      return;
    }
    // a probe boot ran: its verdict and its reason agree
    if (first.usable) expect(first.reason).toMatch(/^a probe boot under KVM ran the kernel \(serial: ".+"\)/);
    else expect(first.reason).toMatch(/cannot be opened|^a probe boot under KVM (failed before the kernel ran: .+|showed no sign of the kernel running within 20000 ms)/);

    if (!/cannot be opened/.test(first.reason)) {
      const cache = JSON.parse(await readFile(cacheFile, 'utf8'));
      expect(cache).toMatchObject({ usable: first.usable, key: { kernel: expect.any(String), size: expect.any(Number), hostKernel: expect.any(String) } });
      expect(await probeKvm({ kernel, initrd, cacheFile, timeoutMs: 20_000 })).toEqual({ ...first, cached: true });
    }

    // No probe VM is left behind.
    const { run } = await import('../../src/host/exec/runner.js');
    const ps = await run('ps', ['-eo', 'args'], { timeoutMs: 5000 });
    expect(ps.stdout).not.toMatch(/qemu-system\S* .*-accel kvm -cpu host .*banger-kvmprobe-/);
  });
});
