/**
 * The Firecracker side of snapshots (snapshot-steps.ts holds the shared steps and QEMU's).
 *
 * Firecracker records each drive's path in the snapshot and reopens the drives there at PUT /snapshot/load; it has
 * no way to name other files at the load. So a snapshot records links of its own: before the save, each drive is
 * pointed (PATCH /drives) at `drive-<id>` in the snapshot's directory, a link to the VM's own disk (the same file:
 * the guest sees nothing). Each restore points those links at the fork's own disks, loads, and has its drives
 * reopened at their own paths at once (the driver's anchor-drives), so that the links are free for the next one:
 * restores of one snapshot take turns, in this process. The vsock socket gets its own path with vsock_override.
 *
 * Disks are raw (Firecracker takes nothing else): the snapshot keeps copies made while the guest is paused, and
 * every fork gets copies of those, reflinks where the filesystem has them (cloneDisk, as a new VM's root disk).
 * A fork needs nothing of the snapshot after its load, so the snapshot can be deleted while forks of it run.
 */
import { rename, rm, stat, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { BangerError } from '../errors.js';
import type { VmContext } from '../machines/vm.machine.js';
import { drivePaths, type DrivePaths, type FirecrackerDriver, type FirecrackerProcess } from '../host/vmm/firecracker/firecracker.js';
import type { VmmDriver, VmmProcess } from '../host/vmm/driver.js';
import type { SnapshotLayer, SnapshotRecord } from '../store/snapshots.js';
import { launchDisks, launchSpecFor, stage, type StepEnv } from './vm-steps.js';
import { cloneDisk } from '../host/disk/disks.js';
import type { VmFiles } from './vm-files.js';

/** The files a Firecracker snapshot's directory holds, besides its host key. */
export const FC_SNAPSHOT_FILES = { state: 'state.bin', memory: 'memory.bin', root: 'root.img', work: 'work.img' } as const;

/** What a save gives the snapshot's record. */
export interface SavedFirecracker {
  root: SnapshotLayer;
  work: SnapshotLayer;
  stateFile: string;
  memFile: string;
  stateBytes: number;
  timings: Record<string, number>;
}

function firecracker(d: VmmDriver): FirecrackerDriver {
  if (d.kind !== 'firecracker' || !('redirectDrives' in d)) throw new BangerError('internal', `the ${d.kind} driver cannot take Firecracker snapshots`);
  return d as FirecrackerDriver;
}

/** The links a snapshot records for a VM's drives: `drive-<id>` in its directory. */
const driveLinks = (dir: string, own: DrivePaths): DrivePaths => {
  const links = Object.fromEntries(Object.keys(own).map((id) => [id, join(dir, `drive-${id}`)]));
  return links as DrivePaths;
};

/** Points each link at its drive (a new link renamed over the old: a link is always whole). */
async function pointLinks(links: DrivePaths, own: DrivePaths): Promise<void> {
  for (const [id, link] of Object.entries(links) as Array<[keyof DrivePaths, string]>) {
    const target = own[id];
    if (!target) throw new BangerError('internal', `no ${id} drive to point ${link} at`);
    await rm(`${link}.new`, { force: true });
    await symlink(target, `${link}.new`);
    await rename(`${link}.new`, link);
  }
}

/**
 * Saves a running Firecracker VM into `dir`: drives pointed at the snapshot's links, then paused, state and memory
 * written, disks copied while paused. Unless `stop`, the guest resumes and its drives go back to its own paths;
 * a failed save resumes it too, and fails with its own error.
 */
export async function saveFirecracker(env: StepEnv, o: { proc: VmmProcess; f: VmFiles; dir: string; stop?: boolean }, signal: AbortSignal): Promise<SavedFirecracker> {
  const driver = firecracker(env.driver('firecracker'));
  const own = drivePaths(await launchDisks(o.f));
  const links = driveLinks(o.dir, own);
  const files = { snapshotPath: join(o.dir, FC_SNAPSHOT_FILES.state), memFilePath: join(o.dir, FC_SNAPSHOT_FILES.memory) };
  const timings: Record<string, number> = {};
  const timed = async (name: string, fn: () => Promise<unknown>) => {
    const t0 = performance.now();
    await fn();
    timings[name] = Math.round(performance.now() - t0);
  };
  await pointLinks(links, own);
  try {
    await timed('redirect', () => driver.redirectDrives(o.proc, links, { signal }));
    await timed('save', () => driver.createSnapshot(o.proc, files, { signal }));
    const copy = (from: string, name: string) => cloneDisk(from, join(o.dir, name), { runner: env.runner, signal });
    await timed('disks', () => Promise.all([copy(own.rootfs, FC_SNAPSHOT_FILES.root), copy(own.work, FC_SNAPSHOT_FILES.work)]));
  } catch (e) {
    await resumeOnOwnDrives(driver, o.proc, own).catch(() => {}); // the save's own error is the one to report
    throw e;
  }
  if (!o.stop) await timed('resume', () => resumeOnOwnDrives(driver, o.proc, own));
  const bytes = async (p: string) => (await stat(p)).size;
  return {
    root: { file: FC_SNAPSHOT_FILES.root, format: 'raw' },
    work: { file: FC_SNAPSHOT_FILES.work, format: 'raw' },
    stateFile: FC_SNAPSHOT_FILES.state,
    memFile: FC_SNAPSHOT_FILES.memory,
    stateBytes: (await bytes(files.snapshotPath)) + (await bytes(files.memFilePath)),
    timings,
  };
}

async function resumeOnOwnDrives(driver: FirecrackerDriver, proc: VmmProcess, own: DrivePaths): Promise<void> {
  if ((await driver.status(proc)).state === 'paused') await driver.resume(proc);
  await driver.redirectDrives(proc, own);
}

/** A fork's disks: copies of the snapshot's (cloneDisk: a reflink where the filesystem has it, else sparse). */
export async function copyFirecrackerDisks(env: StepEnv, ctx: VmContext, snap: SnapshotRecord, dir: string, f: VmFiles, signal: AbortSignal): Promise<void> {
  const copy = (layer: SnapshotLayer, to: string) => cloneDisk(join(dir, layer.file), to, { runner: env.runner, signal });
  const done = (strategy: string) => `copy of snapshot ${snap.name}, strategy=${strategy}`;
  await Promise.all([stage(env, ctx.id, 'rootDisk', () => copy(snap.meta.root, f.rootDisk), done), stage(env, ctx.id, 'workDisk', () => copy(snap.meta.work, f.workDisk), done)]);
}

/** Restores of one snapshot, one at a time: each points the snapshot's links at its own disks until its load is done. */
const loadTurns = new Map<string, Promise<unknown>>();

async function inTurn<T>(snapshotId: string, fn: () => Promise<T>): Promise<T> {
  const before = loadTurns.get(snapshotId) ?? Promise.resolve();
  const mine = before.catch(() => {}).then(fn);
  loadTurns.set(snapshotId, mine);
  try {
    return await mine;
  } finally {
    if (loadTurns.get(snapshotId) === mine) loadTurns.delete(snapshotId);
  }
}

/** A new Firecracker with the snapshot loaded onto this fork's own disks, TAP and vsock socket, running. */
export async function loadFirecrackerFork(env: StepEnv, ctx: VmContext, f: VmFiles, snap: SnapshotRecord, dir: string, signal: AbortSignal): Promise<FirecrackerProcess> {
  const driver = firecracker(env.driver('firecracker'));
  await rm(f.serialLog, { force: true });
  const spec = await launchSpecFor(env, ctx, undefined);
  const files = { snapshotPath: join(dir, snap.meta.stateFile), memFilePath: join(dir, snap.meta.memFile ?? FC_SNAPSHOT_FILES.memory) };
  const own = drivePaths(spec);
  const load = () =>
    inTurn(snap.id, async () => {
      await pointLinks(driveLinks(dir, own), own);
      return driver.loadSnapshot(spec, files, { signal, resume: true });
    });
  return stage(env, ctx.id, 'snapshot.load', load, (p) => `pid ${p.pid} (firecracker): ${snap.meta.stateBytes} bytes from ${snap.name}, on its own disks`);
}
