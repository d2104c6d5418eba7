/** image.pull, image.import, image.list, image.show, image.delete. */
import { existsSync } from 'node:fs';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { BangerError, validateName } from '../../errors.js';
import { buildImage, detectMirror, importImage, KNOWN_IMAGES, readManifest, type ImageManifest } from '../../host/image/image.js';
import { ensureUserKey } from '../../host/guest/keys.js';
import { run } from '../../host/exec/runner.js';
import type { CallContext, Handlers } from '../../rpc/server.js';
import type { ImageView, PulledImage } from '../../rpc/types.js';
import type { DaemonServices } from '../services.js';
import { imageViewOf } from '../views.js';

type BuildStage = { stage: string; status: 'start' | 'done'; ms?: number; detail?: string };
type ImageHandlers = Pick<Handlers, 'image.pull' | 'image.import' | 'image.list' | 'image.show' | 'image.delete'>;

export function imageHandlers(d: DaemonServices): ImageHandlers {
  const { store, layout } = d;
  const imageView = (name: string, m: ImageManifest): ImageView => imageViewOf(name, layout.imageDir(name), m, store.vmsUsingImage(name));
  const pull = imagePuller(d, imageView);
  return {
    'image.pull': (p, ctx) => pull(p.name, { mirror: p.mirror, force: p.force }, ctx),

    'image.import': async (p, ctx) => {
      validateName('image', p.name);
      const dir = layout.imageDir(p.name);
      if (existsSync(dir)) throw new BangerError('conflict', `image ${p.name} already exists`, `banger image delete ${p.name} first, or pick another name`);
      const key = await ensureUserKey(layout.keysDir);
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

    'image.show': async (p) => {
      validateName('image', p.name);
      return imageView(p.name, await readManifest(layout.imageDir(p.name)));
    },

    'image.delete': async (p) => {
      validateName('image', p.name);
      const dir = layout.imageDir(p.name);
      await readManifest(dir);
      const users = store.vmsUsingImage(p.name);
      if (users.length) throw new BangerError('conflict', `image ${p.name} is used by vm(s) ${users.join(', ')}`, 'delete those VMs first');
      if (pull.building(p.name)) throw new BangerError('conflict', `image ${p.name} is being built`, 'wait for the pull to finish');
      await rm(dir, { recursive: true, force: true });
      store.deleteImage(p.name);
      return { deleted: p.name };
    },
  };
}

/** Builds known images, one build per name at a time: a second pull of the same name follows the first one's progress. */
function imagePuller(d: DaemonServices, imageView: (name: string, m: ImageManifest) => ImageView) {
  const { store, layout } = d;
  const builds = new Map<string, Promise<ImageManifest>>();
  const listeners = new Map<string, Set<(ev: BuildStage) => void>>();

  function startBuild(name: string, suite: string, opts: { mirror?: string; force?: boolean }): Promise<ImageManifest> {
    const dir = layout.imageDir(name);
    // Registered before its first await: a pull of the same name arriving meanwhile joins this build.
    const job = (async () => {
      const key = await ensureUserKey(layout.keysDir);
      if (opts.force) await rm(dir, { recursive: true, force: true });
      const mirror = opts.mirror ?? detectMirror();
      return buildImage({ name, suite, imageDir: dir, mirror, userPubKey: key.publicKey, runner: run, onStage: (ev) => listeners.get(name)?.forEach((l) => l(ev)) });
    })().finally(() => builds.delete(name));
    builds.set(name, job);
    return job;
  }

  async function pull(name: string, opts: { mirror?: string; force?: boolean }, ctx: CallContext): Promise<PulledImage> {
    validateName('image', name);
    const known = (KNOWN_IMAGES as Record<string, { suite: string }>)[name];
    if (!known) {
      throw new BangerError('not_found', `unknown image ${JSON.stringify(name)}: banger can build ${Object.keys(KNOWN_IMAGES).join(', ')}`, 'or bring your own: banger image import NAME --rootfs F --kernel F');
    }
    const dir = layout.imageDir(name);
    if (existsSync(join(dir, 'manifest.json')) && !opts.force) {
      const m = await readManifest(dir);
      ctx.progress({ stage: 'image', status: 'info', detail: `${name} is already present (use --force to rebuild)` });
      return { ...imageView(name, m), pulled: false };
    }
    if (store.vmsUsingImage(name).length && opts.force) {
      throw new BangerError('conflict', `image ${name} is used by ${store.vmsUsingImage(name).join(', ')}`, 'delete those VMs before rebuilding the image');
    }
    const job = builds.get(name) ?? startBuild(name, known.suite, opts);
    const listener = (ev: BuildStage) => ctx.progress({ stage: ev.stage, status: ev.status, ms: ev.ms, detail: ev.detail });
    if (!listeners.has(name)) listeners.set(name, new Set());
    listeners.get(name)!.add(listener);
    try {
      const m = await job;
      store.upsertImage(name, m.createdAt, m);
      return { ...imageView(name, m), pulled: true };
    } finally {
      listeners.get(name)?.delete(listener);
    }
  }
  return Object.assign(pull, { building: (name: string) => builds.has(name) });
}
