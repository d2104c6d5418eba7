/** `banger doctor`: one line per check, ok / warn / fail, and a fix for each that is not ok. */
import { constants, existsSync, statSync, statfsSync } from 'node:fs';
import { access, readdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { run, which } from '../host/runner.js';
import { probeCowStrategies } from '../host/disks.js';
import { probeKvm } from '../host/qemu.js';
import { readManifest } from '../host/image.js';
import type { DaemonHandle } from './daemon.js';
import type { HandlerDeps } from './handlers.js';

export interface Check {
  name: string;
  status: 'ok' | 'warn' | 'fail';
  detail: string;
  fix?: string;
}

export async function runDoctor(d: DaemonHandle, deps: HandlerDeps): Promise<{ checks: Check[]; ok: boolean; vmmAuto: string }> {
  const { layout, config } = d;
  const checks: Check[] = [];
  const add = (c: Check) => checks.push(c);

  // KVM: present, and does it really boot a stock kernel?
  let kvmUsable = false;
  const kvmPresent = existsSync('/dev/kvm');
  let kernel: { kernel: string; initrd?: string } | undefined;
  try {
    for (const n of (await readdir(layout.imagesDir)).sort()) {
      try {
        const m = await readManifest(layout.imageDir(n));
        kernel = { kernel: join(layout.imageDir(n), m.kernel), initrd: m.initrd ? join(layout.imageDir(n), m.initrd) : undefined };
        break;
      } catch {
        /* not an image */
      }
    }
  } catch {
    /* no images dir */
  }
  if (!kvmPresent) {
    add({ name: 'kvm', status: 'warn', detail: '/dev/kvm is absent: VMs run under software emulation (QEMU TCG), ~10x slower to boot', fix: 'enable virtualisation (VT-x/AMD-V) or nested virtualisation, and load kvm_intel/kvm_amd' });
  } else if (!kernel) {
    add({ name: 'kvm', status: 'warn', detail: '/dev/kvm is present, but no image kernel is available to probe it with', fix: 'banger image pull debian-bookworm, then run doctor again' });
  } else {
    const v = await probeKvm({ ...kernel, cacheFile: join(layout.cache, 'kvm-probe.json'), timeoutMs: config.kvmProbeTimeoutMs });
    kvmUsable = v.usable;
    add(
      v.usable
        ? { name: 'kvm', status: 'ok', detail: `/dev/kvm present and usable: ${v.reason}${v.cached ? ' (cached)' : ''}` }
        : { name: 'kvm', status: 'warn', detail: `/dev/kvm is present but not usable for a stock kernel: ${v.reason}${v.cached ? ' (cached verdict)' : ''}; QEMU on TCG will be used`, fix: 'on a nested host, enable nested virtualisation properly; otherwise nothing to do (TCG works, slower)' },
    );
  }

  const qemu = await which('qemu-system-x86_64');
  add(qemu ? { name: 'qemu', status: 'ok', detail: qemu } : { name: 'qemu', status: 'fail', detail: 'qemu-system-x86_64 not found', fix: 'apt-get install qemu-system-x86' });
  const fcBin = config.firecrackerBin ?? process.env.BANGER_FIRECRACKER_BIN ?? (await which('firecracker'));
  const fcOk = !!fcBin && existsSync(fcBin);
  add(
    fcOk
      ? { name: 'firecracker', status: kvmUsable ? 'ok' : 'warn', detail: `${fcBin}${kvmUsable ? '' : ' (needs usable KVM, which this host lacks)'}` }
      : { name: 'firecracker', status: 'warn', detail: `firecracker not found${config.firecrackerBin ? ` at ${config.firecrackerBin}` : ' on PATH'}`, fix: 'install a Firecracker release binary and set BANGER_FIRECRACKER_BIN or "firecrackerBin" in config.json' },
  );
  const wiredFc = !!deps.drivers.firecracker;
  const auto = fcOk && kvmUsable && wiredFc && d.rootHelper ? 'firecracker' : kvmUsable ? 'qemu (kvm)' : 'qemu (tcg)';
  add({ name: 'vmm.auto', status: 'ok', detail: `--vmm auto picks ${auto}` });

  for (const [tool, pkg] of [
    ['mkfs.ext4', 'e2fsprogs'],
    ['debugfs', 'e2fsprogs'],
    ['resize2fs', 'e2fsprogs'],
    ['ssh-keygen', 'openssh-client'],
    ['git', 'git'],
  ] as const) {
    const p = await which(tool);
    add(p ? { name: tool, status: 'ok', detail: p } : { name: tool, status: 'fail', detail: `${tool} not found`, fix: `apt-get install ${pkg}` });
  }
  const mm = await which('mmdebstrap');
  const db = await which('debootstrap');
  add(mm || db ? { name: 'bootstrap', status: 'ok', detail: mm ? `mmdebstrap (${mm})` : `debootstrap (${db})` } : { name: 'bootstrap', status: 'fail', detail: 'neither mmdebstrap nor debootstrap found: images cannot be built', fix: 'apt-get install mmdebstrap' });

  try {
    await access('/dev/net/tun', constants.R_OK | constants.W_OK);
    add({ name: 'tun', status: 'ok', detail: '/dev/net/tun is usable' });
  } catch {
    add({ name: 'tun', status: 'warn', detail: '/dev/net/tun is missing or not accessible: tap networking cannot work', fix: 'modprobe tun' });
  }
  if (!d.rootHelper) {
    const off = process.env.BANGER_ROOT_HELPER === 'off';
    add({
      name: 'root-helper',
      status: 'warn',
      detail: `${off ? 'the root helper is disabled (BANGER_ROOT_HELPER=off)' : `no root helper: nothing answers on ${d.helperSocket} and the daemon is not root`}; --net auto uses QEMU user-mode networking`,
      fix: off ? 'unset BANGER_ROOT_HELPER and restart the daemon' : 'sudo banger system install --enable, or run the daemon as root',
    });
  } else if (await d.rootHelper.reachable(5000)) {
    add({ name: 'root-helper', status: 'ok', detail: `reachable on ${d.helperSocket}${d.helperIsService ? ' (a service); --net auto uses tap' : ' (run by this root daemon); --net tap works, --net auto stays on user networking unless config "defaultNet": "tap"'}` });
    const r = await run('ip', ['-j', 'link', 'show', 'dev', config.bridge], { reject: false });
    add(r.exitCode === 0 ? { name: 'bridge', status: 'ok', detail: `${config.bridge} exists (subnet ${config.subnet}${config.nat ? ', NAT on' : ''})` } : { name: 'bridge', status: 'warn', detail: `${config.bridge} does not exist yet (made on the first tap VM)`, fix: 'banger vm create --net tap' });
    const idle = d.tapPool?.leases().filter((l) => l.vmId === null).length ?? 0;
    add({ name: 'tap-pool', status: 'ok', detail: `${idle} idle TAP device(s) warm of ${config.tapPoolSize}` });
  } else {
    const st = d.rootHelper.state();
    add({ name: 'root-helper', status: 'fail', detail: `not reachable on ${d.helperSocket}: ${st.lastError ?? st.state}`, fix: 'sudo systemctl start banger-roothelper, or check the daemon log' });
  }

  try {
    const s = statfsSync(layout.home);
    const free = s.bavail * s.bsize;
    const gib = free / 2 ** 30;
    add(gib >= 5 ? { name: 'disk', status: 'ok', detail: `${gib.toFixed(1)} GiB free in ${layout.home}` } : { name: 'disk', status: gib >= 2 ? 'warn' : 'fail', detail: `only ${gib.toFixed(1)} GiB free in ${layout.home}`, fix: 'free space or set BANGER_HOME elsewhere' });
  } catch (e) {
    add({ name: 'disk', status: 'fail', detail: `cannot stat ${layout.home}: ${(e as Error).message}` });
  }
  try {
    for (const c of await probeCowStrategies(layout.vmsDir)) {
      add({ name: `cow.${c.strategy}`, status: c.ok ? 'ok' : 'warn', detail: c.why });
    }
  } catch (e) {
    add({ name: 'cow', status: 'warn', detail: `could not probe copy-on-write strategies: ${(e as Error).message}` });
  }
  try {
    const st = statSync(layout.socket);
    const dst = statSync(dirname(layout.socket));
    const mode = st.mode & 0o777;
    const dmode = dst.mode & 0o777;
    add(mode === 0o600 && dmode === 0o700 ? { name: 'socket', status: 'ok', detail: `${layout.socket} mode 0600 in a 0700 directory` } : { name: 'socket', status: 'fail', detail: `${layout.socket} has mode ${mode.toString(8)} (dir ${dmode.toString(8)})`, fix: 'restart the daemon: banger daemon stop; banger daemon start' });
  } catch (e) {
    add({ name: 'socket', status: 'fail', detail: `cannot stat the daemon socket: ${(e as Error).message}` });
  }
  return { checks, ok: !checks.some((c) => c.status === 'fail'), vmmAuto: auto };
}
