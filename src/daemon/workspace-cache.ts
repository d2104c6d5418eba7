/**
 * The workspace cache in the daemon: the key of a VM's workspace (the same at `vm create --workspace` and at the
 * prepare that follows), the lookup at create, and what a prepare into such a VM reports and stores.
 */
import { join } from 'node:path';
import type { Config } from '../config.js';
import type { VmSpec } from '../machines/vm.machine.js';
import type { Layout } from '../paths.js';
import { readManifest } from '../host/image/image.js';
import { ensureUserKey } from '../host/guest/keys.js';
import { run, type Runner } from '../host/exec/runner.js';
import { cowRecordPath } from '../host/disk/disks.js';
import { readFile } from 'node:fs/promises';
import { snapshotWorkDisk, WorkspaceCache, workspaceCacheKey, type CacheKey } from '../host/guest/workspace-cache.js';
import type { GuestExec, ResumePoint, WorkspaceMode, WorkspacePrepareResult } from '../host/guest/workspace.js';
import { BangerError, errorMessage } from '../errors.js';

export function workspaceCacheOf(layout: Layout, config: Pick<Config, 'workspaceCacheBytes'>, runner: Runner = run): WorkspaceCache {
  return new WorkspaceCache(join(layout.home, 'workspace-cache'), () => config.workspaceCacheBytes, runner);
}

export interface WorkspaceRequest {
  source: string;
  mode: WorkspaceMode;
  guestPath: string;
}

/** The cache key of `w` in a VM of `spec` (what the VM's work disk would hold after preparing it). */
export async function vmWorkspaceKey(
  env: { layout: Layout; config: Config; runner?: Runner },
  spec: Pick<VmSpec, 'image' | 'diskBytes' | 'net' | 'gitIdentity'>,
  w: WorkspaceRequest,
  signal?: AbortSignal,
): Promise<CacheKey> {
  const dir = env.layout.imageDir(spec.image);
  const manifest = await readManifest(dir).catch(() => undefined);
  if (!manifest) return { key: null, why: `image ${spec.image} is not here` };
  const key = await ensureUserKey(env.layout.keysDir);
  return workspaceCacheKey(
    {
      source: w.source,
      mode: w.mode,
      guestPath: w.guestPath,
      image: { name: spec.image, dir, workSeed: manifest.workSeed },
      diskBytes: spec.diskBytes,
      net: spec.net,
      userPublicKey: key.publicKey,
      // not the git identity: a default one names the VM, and a hit writes the VM's own (cloneWorkDisk)
      gitIdentity: null,
      fileSync: env.config.fileSync ?? [],
    },
    { runner: env.runner, signal },
  );
}

/** At create: the VM's workspace key and, on a hit, the cached disk its work disk is cloned from. */
export async function workspaceForCreate(
  env: { layout: Layout; config: Config },
  spec: Pick<VmSpec, 'image' | 'diskBytes' | 'net' | 'gitIdentity'>,
  w: WorkspaceRequest,
): Promise<VmSpec['workspace']> {
  const cache = workspaceCacheOf(env.layout, env.config);
  if (!cache.enabled) return undefined;
  const k = await vmWorkspaceKey(env, spec, w);
  if (k.key === null) return undefined;
  const hit = await cache.lookup(k.key);
  return hit ? { key: k.key, cachedDisk: hit.disk } : { key: k.key };
}

/** The warning for a work disk cloned from the cache by a full copy (no reflink where the disks live). */
export async function fullCopyWarning(workDisk: string): Promise<string | undefined> {
  const how = (await readFile(cowRecordPath(workDisk), 'utf8').catch(() => '')).trim();
  if (how !== 'sparse-copy') return undefined;
  return 'the cached work disk was copied in full (the filesystem under BANGER_HOME has no reflink): a hit costs a copy of the disk\'s data; see banger doctor (cow.*)';
}

/**
 * A prepare into a VM made with `--workspace` for this very workspace (same key), the first one only: reports
 * "hit" when the VM's work disk came from the cache and the guest's workspace checked out (the prepare resumed
 * from the entry's resume point, or re-prepared incrementally from the key's HEAD: only the delta crossed);
 * otherwise "miss", and the freshly prepared work disk is stored with its resume point. Every other prepare is
 * "off". `prepare(how)` runs the prepare itself. On a cached disk the resume starts while the key is checked
 * again (the repository may have moved since the create) and goes ahead only when it still matches.
 */
export async function prepareThroughCache(
  env: { layout: Layout; config: Config; runner: Runner },
  vm: { id: string; spec: VmSpec; workDisk: string },
  w: WorkspaceRequest & { plain: boolean; replace?: boolean },
  io: { guest: GuestExec; signal: AbortSignal; progress: (stage: string, detail?: string) => void },
  prepare: (how: { replace?: boolean; resume?: ResumePoint; resumeWhen?: Promise<boolean> }) => Promise<WorkspacePrepareResult>,
): Promise<WorkspacePrepareResult> {
  const ws = vm.spec.workspace;
  if (!ws || !w.plain || cacheConsumed.has(vm.id)) return { ...(await prepare({ replace: w.replace })), cache: 'off' };
  const cache = workspaceCacheOf(env.layout, env.config, env.runner);
  const keyed = vmWorkspaceKey(env, vm.spec, w, io.signal);
  const matches = keyed.then((k) => k.key === ws.key, () => false);
  const resume = ws.cachedDisk ? (await cache.peek(ws.key))?.resume : undefined;
  let r: WorkspacePrepareResult;
  try {
    r = await prepare({ replace: w.replace, resume, resumeWhen: matches });
  } catch (e) {
    // A cached disk whose workspace does not check out (the path holds something else): start over, as a miss.
    const taken = e instanceof BangerError && e.kind === 'conflict' && /^guest path /.test(e.message);
    if (!(ws.cachedDisk && taken && (await matches))) {
      if (await matches) cacheConsumed.add(vm.id); // the one cache-participating prepare ran, and failed
      throw e;
    }
    r = await prepare({ replace: true });
  }
  const k = await keyed;
  if (k.key !== ws.key) return { ...r, cache: 'off' };
  cacheConsumed.add(vm.id);
  const hit = !!ws.cachedDisk && r.incremental && r.previousHead === k.parts.headCommit;
  const warnings = [...(r.warnings ?? [])];
  if (hit) {
    const warn = await fullCopyWarning(vm.workDisk);
    if (warn) warnings.push(warn);
    return { ...r, cache: 'hit', ...(warnings.length ? { warnings } : {}) };
  }
  io.progress('cache', 'storing the prepared work disk');
  try {
    await cache.store(k.key, k.parts, (dst) => snapshotWorkDisk(io.guest, vm.workDisk, dst, { runner: env.runner, signal: io.signal }), { signal: io.signal, resume: r.resumePoint });
  } catch (e) {
    warnings.push(`the workspace cache could not store this work disk: ${errorMessage(e)}`);
  }
  return { ...r, cache: 'miss', ...(warnings.length ? { warnings } : {}) };
}

/** VMs whose one cache-participating prepare has run (later prepares into them are "off"). */
const cacheConsumed = new Set<string>();

/** A deleted VM leaves cacheConsumed. */
export function forgetCacheUse(vmId: string): void {
  cacheConsumed.delete(vmId);
}
