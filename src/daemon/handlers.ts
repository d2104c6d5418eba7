/** The daemon's RPC handlers: thin, each a validated call into the supervisor, the store or the host layer. */
import { existsSync, statSync } from 'node:fs';
import { readFile, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { customAlphabet } from 'nanoid';
import { BangerError, validateName } from '../errors.js';
import type { CallContext, Handlers } from '../rpc/server.js';
import type { ParamsOf } from '../rpc/protocol.js';
import type { VmState } from '../machines/vm.machine.js';
import { viewOf, type VmView } from '../actors/supervisor.js';
import { gitIdentity, vmFiles } from '../actors/vm-steps.js';
import { parseSize } from '../host/disks.js';
import { buildImage, detectMirror, importImage, KNOWN_IMAGES, readManifest, type ImageManifest } from '../host/image.js';
import { probeKvm, type VmmDriver } from '../host/qemu.js';
import { resolveFirecrackerBinary } from '../host/firecracker.js';
import { ensureUserKey } from '../host/keys.js';
import { run, which } from '../host/runner.js';
import { validateGuestPath } from '../host/workspace.js';
import type { DaemonHandle } from './daemon.js';
import { runDoctor } from './doctor.js';

const newId = customAlphabet('0123456789abcdefghijklmnopqrstuvwxyz', 10);

export interface HandlerDeps {
  version: string;
  commit: string;
  drivers: Record<string, VmmDriver | undefined>;
  log: (line: string) => void;
}

export interface ImageView {
  name: string;
  createdAt: string;
  kernel: string;
  vmlinux: string | null;
  initrd: string | null;
  rootfs: string;
  workSeed: string;
  sizeBytes: number;
  packages: number;
  builderVersion: number;
  usedBy: string[];
}

export function makeHandlers(d: DaemonHandle, deps: HandlerDeps): Handlers {
  const { supervisor: sup, store, layout, config } = d;
  const pulls = new Map<string, Promise<ImageManifest>>();

  const resolveVm = (ref: string): string => {
    const row = store.findVm(ref);
    if (!sup.has(row.id)) throw new BangerError('not_found', `vm ${row.name} has no live actor (its snapshot could not be restored)`, 'see the daemon log; banger vm delete is the way out');
    return row.id;
  };

  const imageView = (name: string, m: ImageManifest): ImageView => {
    const dir = layout.imageDir(name);
    return {
      name,
      createdAt: m.createdAt,
      kernel: join(dir, m.kernel),
      vmlinux: m.vmlinux ? join(dir, m.vmlinux) : null,
      initrd: m.initrd ? join(dir, m.initrd) : null,
      rootfs: join(dir, m.rootfs),
      workSeed: join(dir, m.workSeed),
      sizeBytes: m.sizeBytes,
      packages: m.packages,
      builderVersion: m.builderVersion,
      usedBy: store.vmsUsingImage(name),
    };
  };

  const forwardLogs = (vmId: string, ctx: CallContext) =>
    sup.onLog((row) => {
      if (row.vmId === vmId) ctx.progress({ stage: row.stage, status: row.status, ms: row.durationMs ?? undefined, detail: row.message ?? undefined });
    });

  const waitState = async (vmId: string, states: VmState[], ctx: CallContext, timeoutMs: number): Promise<VmView> => {
    const off = forwardLogs(vmId, ctx);
    try {
      return viewOf(await sup.waitFor(vmId, states, timeoutMs, ctx.signal));
    } finally {
      off();
    }
  };

  const bootWait = () => config.bootTimeoutMs + 300_000;

  async function decideAccel(image: ImageManifest, imageName: string): Promise<{ accel: 'kvm' | 'tcg'; why: string }> {
    if (process.env.BANGER_ACCEL === 'tcg') return { accel: 'tcg', why: 'BANGER_ACCEL=tcg' };
    const dir = layout.imageDir(imageName);
    const v = await probeKvm({
      kernel: join(dir, image.kernel),
      initrd: image.initrd ? join(dir, image.initrd) : undefined,
      cacheFile: join(layout.cache, 'kvm-probe.json'),
      timeoutMs: config.kvmProbeTimeoutMs,
    });
    return v.usable ? { accel: 'kvm', why: v.reason } : { accel: 'tcg', why: v.reason };
  }

  return {
    'daemon.status': async () => ({
      pid: process.pid,
      socket: layout.socket,
      version: deps.version,
      commit: deps.commit,
      uptimeSeconds: Math.round((Date.now() - d.startedAt) / 1000),
      vms: sup.ids().length,
      home: layout.home,
      running: sup.ids().filter((id) => sup.view(id).state === 'running').length,
      rootHelper: d.rootHelper ? { socket: d.helperSocket, ...d.rootHelper.state() } : null,
      tapPool: d.tapPool ? d.tapPool.leases() : null,
    }),

    'daemon.stop': async () => {
      setTimeout(() => {
        void d.stop().then(() => process.exit(0));
      }, 50);
      return { stopping: true, pid: process.pid };
    },

    'doctor.run': async () => runDoctor(d, deps),

    'image.pull': async (p: ParamsOf<'image.pull'>, ctx) => {
      validateName('image', p.name);
      const known = (KNOWN_IMAGES as Record<string, { suite: string }>)[p.name];
      if (!known) {
        throw new BangerError('not_found', `unknown image ${JSON.stringify(p.name)}: banger can build ${Object.keys(KNOWN_IMAGES).join(', ')}`, 'or bring your own: banger image import NAME --rootfs F --kernel F');
      }
      const dir = layout.imageDir(p.name);
      if (existsSync(join(dir, 'manifest.json')) && !p.force) {
        const m = await readManifest(dir);
        ctx.progress({ stage: 'image', status: 'info', detail: `${p.name} is already present (use --force to rebuild)` });
        return { ...imageView(p.name, m), pulled: false };
      }
      if (store.vmsUsingImage(p.name).length && p.force) {
        throw new BangerError('conflict', `image ${p.name} is used by ${store.vmsUsingImage(p.name).join(', ')}`, 'delete those VMs before rebuilding the image');
      }
      let job = pulls.get(p.name);
      if (!job) {
        const key = await ensureUserKey(layout.keysDir, { runner: run });
        job = (async () => {
          if (p.force) await rm(dir, { recursive: true, force: true });
          const mirror = p.mirror ?? detectMirror();
          return buildImage({
            name: p.name,
            suite: known.suite,
            imageDir: dir,
            mirror,
            userPubKey: key.publicKey,
            runner: run,
            onStage: (ev) => {
              for (const l of pullListeners.get(p.name) ?? []) l(ev);
            },
          });
        })().finally(() => pulls.delete(p.name));
        pulls.set(p.name, job);
      }
      const listener = (ev: { stage: string; status: 'start' | 'done'; ms?: number; detail?: string }) => ctx.progress({ stage: ev.stage, status: ev.status, ms: ev.ms, detail: ev.detail });
      addListener(p.name, listener);
      try {
        const m = await job;
        store.upsertImage(p.name, m.createdAt, m);
        return { ...imageView(p.name, m), pulled: true };
      } finally {
        removeListener(p.name, listener);
      }
    },

    'image.import': async (p: ParamsOf<'image.import'>, ctx) => {
      validateName('image', p.name);
      const dir = layout.imageDir(p.name);
      if (existsSync(dir)) throw new BangerError('conflict', `image ${p.name} already exists`, `banger image delete ${p.name} first, or pick another name`);
      const key = await ensureUserKey(layout.keysDir, { runner: run });
      ctx.progress({ stage: 'import', status: 'start' });
      const t0 = Date.now();
      const m = await importImage({ name: p.name, imageDir: dir, rootfs: p.rootfs, kernel: p.kernel, initrd: p.initrd, userPubKey: key.publicKey, runner: run });
      ctx.progress({ stage: 'import', status: 'done', ms: Date.now() - t0 });
      store.upsertImage(p.name, m.createdAt, m);
      return imageView(p.name, m);
    },

    'image.list': async () => {
      const out: ImageView[] = [];
      let names: string[] = [];
      try {
        names = (await readdir(layout.imagesDir)).filter((n) => !n.startsWith('.'));
      } catch {
        /* none yet */
      }
      for (const n of names.sort()) {
        try {
          out.push(imageView(n, await readManifest(layout.imageDir(n))));
        } catch {
          /* a partial build directory: not an image */
        }
      }
      return out;
    },

    'image.show': async (p: ParamsOf<'image.show'>) => {
      validateName('image', p.name);
      return imageView(p.name, await readManifest(layout.imageDir(p.name)));
    },

    'image.delete': async (p: ParamsOf<'image.delete'>) => {
      validateName('image', p.name);
      const dir = layout.imageDir(p.name);
      await readManifest(dir);
      const users = store.vmsUsingImage(p.name);
      if (users.length) throw new BangerError('conflict', `image ${p.name} is used by vm(s) ${users.join(', ')}`, 'delete those VMs first');
      if (pulls.has(p.name)) throw new BangerError('conflict', `image ${p.name} is being built`, 'wait for the pull to finish');
      await rm(dir, { recursive: true, force: true });
      store.deleteImage(p.name);
      return { deleted: p.name };
    },

    'vm.create': async (p: ParamsOf<'vm.create'>, ctx) => {
      const id = newId();
      const name = p.name !== undefined ? validateName('vm', p.name) : `vm-${id.slice(0, 6)}`;
      store.assertNameFree(name);
      const imageName = validateName('image', p.image ?? config.defaultImage);
      let manifest: ImageManifest;
      try {
        manifest = await readManifest(layout.imageDir(imageName));
      } catch {
        throw new BangerError('not_found', `image ${imageName} is not here`, `banger image pull ${imageName}`);
      }
      const diskBytes = typeof p.disk === 'number' ? p.disk : parseSize(p.disk ?? config.defaultDisk);
      if (diskBytes < 64 * 1024 * 1024) throw new BangerError('usage', `--disk ${p.disk} is too small`, 'the work disk needs at least 64M');
      const vmmWanted = p.vmm ?? 'auto';
      const netWanted = p.net ?? 'auto';
      const { accel, why } = await decideAccel(manifest, imageName);
      const helperUp = d.rootHelper ? await d.rootHelper.reachable(netWanted === 'tap' ? 15_000 : 2000) : false;
      let net: 'tap' | 'user' = 'user';
      if (netWanted === 'tap') {
        if (!d.network || !helperUp) {
          const st = d.rootHelper?.state();
          throw new BangerError('unsupported', `--net tap needs the root helper, which is not reachable${st?.lastError ? ` (${st.lastError})` : d.rootHelper ? '' : ` (nothing answers on ${d.helperSocket})`}`, 'install and start it (banger system install), run the daemon as root, or use --net user');
        }
        net = 'tap';
      } else if (netWanted === 'auto' && d.network && helperUp && (d.helperIsService || config.defaultNet === 'tap')) {
        net = 'tap';
      }
      let vmm: 'qemu' | 'firecracker' = 'qemu';
      let fcBinary: string | undefined;
      if (vmmWanted === 'firecracker' || vmmWanted === 'auto') {
        try {
          fcBinary = await resolveFirecrackerBinary(config.firecrackerBin);
        } catch (e) {
          if (vmmWanted === 'firecracker') throw e;
        }
      }
      if (vmmWanted === 'firecracker') {
        vmm = 'firecracker';
        if (accel !== 'kvm') ctx.progress({ stage: 'plan', status: 'info', detail: `warning: KVM is not usable here (${why}); starting Firecracker anyway as asked — its own error will say why if it cannot run` });
      } else if (vmmWanted === 'auto' && fcBinary && accel === 'kvm' && net === 'tap') {
        vmm = 'firecracker';
      }
      if (vmm === 'firecracker' && net === 'user') throw new BangerError('unsupported', 'Firecracker has no user-mode networking', 'use --net tap with the root helper, or --vmm qemu');
      ctx.progress({ stage: 'plan', status: 'info', detail: `${vmm} ${accel} (${why}), net ${net}` });
      sup.create({
        id,
        name,
        createdAt: new Date().toISOString(),
        spec: {
          image: imageName,
          vcpus: p.vcpus ?? config.defaultVcpus,
          memoryMiB: p.memoryMiB ?? config.defaultMemoryMiB,
          diskBytes,
          vmm,
          accel,
          net,
          start: p.start !== false,
          bootTimeoutMs: config.bootTimeoutMs,
          stopTimeoutMs: config.stopTimeoutMs,
          gitIdentity: await gitIdentity(run, name),
        },
      });
      if (p.wait === false) return sup.view(id);
      return waitState(id, p.start === false ? ['stopped'] : ['running'], ctx, bootWait());
    },

    'vm.start': async (p: ParamsOf<'vm.start'>, ctx) => {
      const id = resolveVm(p.vm);
      sup.send(id, { type: 'START' });
      return p.wait === false ? sup.view(id) : waitState(id, ['running'], ctx, bootWait());
    },

    'vm.stop': async (p: ParamsOf<'vm.stop'>, ctx) => {
      const id = resolveVm(p.vm);
      sup.send(id, { type: 'STOP' });
      return p.wait === false ? sup.view(id) : waitState(id, ['stopped'], ctx, config.stopTimeoutMs + 30_000);
    },

    'vm.restart': async (p: ParamsOf<'vm.restart'>, ctx) => {
      const id = resolveVm(p.vm);
      sup.send(id, { type: 'RESTART' });
      return p.wait === false ? sup.view(id) : waitState(id, ['running'], ctx, bootWait() + config.stopTimeoutMs);
    },

    'vm.delete': async (p: ParamsOf<'vm.delete'>, ctx) => {
      const id = resolveVm(p.vm);
      const before = sup.view(id);
      sup.send(id, { type: 'DELETE' });
      if (p.wait !== false) await waitState(id, ['deleted'], ctx, 120_000);
      return { ...before, state: 'deleted' };
    },

    'vm.set': async (p: ParamsOf<'vm.set'>, ctx) => {
      const id = resolveVm(p.vm);
      const cur = sup.view(id);
      const diskBytes = p.disk === undefined ? undefined : typeof p.disk === 'number' ? p.disk : parseSize(p.disk);
      if (p.vcpus === undefined && p.memoryMiB === undefined && diskBytes === undefined) {
        throw new BangerError('usage', 'nothing to set', 'give --vcpus, --memory or --disk');
      }
      if (diskBytes !== undefined && diskBytes < cur.diskBytes) {
        throw new BangerError('usage', `disks only grow: ${cur.name}'s work disk is ${cur.diskBytes} bytes, asked for ${diskBytes}`, 'give a size at least as large as the current one');
      }
      sup.send(id, { type: 'SET', vcpus: p.vcpus, memoryMiB: p.memoryMiB, diskBytes });
      const v = await waitState(id, ['stopped'], ctx, 300_000);
      if (v.error?.stage === 'reconfiguring') throw new BangerError('host', `vm set failed: ${v.error.message}`);
      return v;
    },

    'vm.wait': async (p: ParamsOf<'vm.wait'>, ctx) => {
      const id = resolveVm(p.vm);
      return waitState(id, [p.state], ctx, p.timeoutMs ?? bootWait());
    },

    'vm.list': async () => sup.ids().map((id) => sup.view(id)),

    'vm.show': async (p: ParamsOf<'vm.show'>) => {
      const id = resolveVm(p.vm);
      const v = sup.view(id);
      const f = vmFiles(layout, id);
      return { ...v, dir: f.dir, serialLog: f.serialLog, workDiskAllocatedBytes: allocated(f.workDisk), rootDiskAllocatedBytes: allocated(f.rootDisk) };
    },

    'vm.events': async (p: ParamsOf<'vm.events'>) => {
      const id = resolveVm(p.vm);
      return store.events(id);
    },

    'vm.logs': async (p: ParamsOf<'vm.logs'>, ctx) => {
      const rows = store.resolveVm(p.vm);
      if (rows.length !== 1) resolveVm(p.vm);
      const id = rows[0].id;
      if (p.serial) {
        const text = await readFile(vmFiles(layout, id).serialLog, 'utf8').catch(() => '');
        return { serial: text };
      }
      const existing = store.logs(id, p.afterSeq ?? 0);
      if (!p.follow) return existing;
      for (const r of existing) ctx.stream(r);
      await new Promise<void>((resolve) => {
        const off = sup.onLog((row) => {
          if (row.vmId === id) ctx.stream(row);
        });
        ctx.signal.addEventListener('abort', () => {
          off();
          resolve();
        });
      });
      return [];
    },

    'vm.ssh': async (p: ParamsOf<'vm.ssh'>, ctx) => {
      const id = resolveVm(p.vm);
      let v = sup.view(id);
      if (v.state === 'booting' && p.wait !== false) v = await waitState(id, ['running'], ctx, bootWait());
      if (v.state !== 'running') throw new BangerError('invalid_state', `vm ${v.name} is ${v.state}`, `banger vm start ${v.name}`);
      const f = vmFiles(layout, id);
      const key = await ensureUserKey(layout.keysDir, { runner: run });
      return {
        host: v.guestIp ?? '127.0.0.1',
        port: v.guestIp ? 22 : v.sshPort,
        user: 'root',
        identityFile: key.privateKeyPath,
        knownHostsFile: f.knownHosts,
        hostKeyAlias: `banger-${id}`,
      };
    },

    'vm.workspace.prepare': async (p: ParamsOf<'vm.workspace.prepare'>, ctx) => {
      const id = resolveVm(p.vm);
      const guestPath = validateGuestPath(p.guestPath ?? '/root/repo');
      const params = { ...p, guestPath, mode: p.mode ?? 'shallow', readOnly: p.readOnly ?? false };
      return runJob(id, 'prepare', params, ctx);
    },

    'vm.workspace.export': async (p: ParamsOf<'vm.workspace.export'>, ctx) => {
      const id = resolveVm(p.vm);
      const guestPath = validateGuestPath(p.guestPath ?? '/root/repo');
      return runJob(id, 'export', { ...p, guestPath }, ctx);
    },

    'inspect.subscribe': async (p: ParamsOf<'inspect.subscribe'>, ctx) => {
      const only = p.vm ? resolveVm(p.vm) : undefined;
      ctx.stream({ type: 'hello', vms: sup.ids().map((id) => ({ id, name: sup.view(id).name, state: sup.view(id).state })) });
      await new Promise<void>((resolve) => {
        const off = sup.onTransition((t) => {
          if (!only || t.vmId === only) ctx.stream(t);
        });
        ctx.signal.addEventListener('abort', () => {
          off();
          resolve();
        });
      });
      return null;
    },
  };

  async function runJob(vmId: string, kind: 'prepare' | 'export', params: Record<string, unknown>, ctx: CallContext): Promise<unknown> {
    const job = { jobId: `${kind}-${newId()}`, kind, params, enqueuedAt: new Date().toISOString() };
    const done = sup.jobs.register(vmId, job, (pr) => ctx.progress({ stage: pr.stage, status: 'info', bytes: pr.bytes, detail: pr.detail }));
    try {
      sup.enqueueJob(vmId, job);
    } catch (e) {
      sup.jobs.settle(job.jobId, false, e);
      await done.catch(() => {});
      throw e;
    }
    ctx.progress({ stage: kind, status: 'start', detail: sup.view(vmId).workspace?.running ? 'queued behind another job' : undefined });
    return done;
  }
}

const pullListeners = new Map<string, Set<(ev: { stage: string; status: 'start' | 'done'; ms?: number; detail?: string }) => void>>();
function addListener(name: string, l: (ev: { stage: string; status: 'start' | 'done'; ms?: number; detail?: string }) => void) {
  if (!pullListeners.has(name)) pullListeners.set(name, new Set());
  pullListeners.get(name)!.add(l);
}
function removeListener(name: string, l: (ev: { stage: string; status: 'start' | 'done'; ms?: number; detail?: string }) => void) {
  pullListeners.get(name)?.delete(l);
}

function allocated(path: string): number | null {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return null;
  }
}

export { which, stat };
