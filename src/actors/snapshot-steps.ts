/**
 * The VM machine's snapshot steps: takeSnapshot (state `snapshotting`), the disks of a restore or fork (part of
 * `creating`) and restore (state `restoring`). QEMU's side is here and in src/host/vmm/qemu/snapshot.ts;
 * Firecracker's, whose disks are copies rather than layers, in snapshot-steps-firecracker.ts.
 *
 * A QEMU snapshot's directory holds its frozen disk layers as hard links of the files the VM wrote until the
 * snapshot (no copy: the VM keeps them as read-only backing files and goes on in new overlays), the saved state,
 * and the VM's SSH host key. Every fork runs on qcow2 overlays of those layers. Every fork, on either VMM, keeps
 * the snapshot's host key (pinned, as the source's was): a fork is the same machine, so it has the same key.
 * Deleting the source VM leaves the snapshot, and so its forks, whole.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { copyFile, link, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fromPromise } from 'xstate';
import { BangerError, errorMessage } from '../errors.js';
import type { BootOutput, PrepareDisksOutput, StepInput, VmContext } from '../machines/vm.machine.js';
import { waitForSsh } from '../host/guest/ssh.js';
import { loadQemuState, saveQemuState, type DiskLayers } from '../host/vmm/qemu/snapshot.js';
import { SnapshotRepo, snapshotDir, type SnapshotLayer, type SnapshotRecord } from '../store/snapshots.js';
import { Cleanups } from '../host/exec/cleanups.js';
import { checkTapLease, findVmm, launchSpecFor, leaseNetwork, sshKey, sshTargetFor, stage, type StepEnv } from './vm-steps.js';
import { readLayers, vmFiles, writeLayers, type VmFiles } from './vm-files.js';
import { agentRefreshIdentity } from '../host/guest/agent.js';
import { findFreePort, liveBulkSocket, type VmmProcess } from '../host/vmm/qemu/qemu.js';
import { agentChannelOf } from '../host/vmm/agent-channel.js';
import { copyFirecrackerDisks, loadFirecrackerFork, saveFirecracker } from './snapshot-steps-firecracker.js';
import { macForVm } from '../host/net/net.js';
import { writeIdentityDisk } from '../host/disk/identity-disk.js';
import { CACHED_BASE_NAME } from '../host/disk/disks.js';
import { IDENTITY_MARKER_BUILDER, readManifest } from '../host/image/image.js';

/** A hard link (same filesystem: instant, no space); a copy where the filesystem refuses one. */
async function linkOrCopy(from: string, to: string): Promise<void> {
  await rm(to, { force: true });
  try {
    await link(from, to);
  } catch {
    await copyFile(from, to);
  }
}

function snapshotOf(env: StepEnv, id: string): SnapshotRecord {
  const s = new SnapshotRepo(env.store.db).get(id);
  if (!s) throw new BangerError('not_found', `snapshot ${id} is gone`, 'banger snapshot list shows the snapshots');
  return s;
}

export function makeSnapshotSteps(env: StepEnv) {
  return {
    takeSnapshot: fromPromise<void, StepInput>(({ input: { ctx }, signal }) => takeSnapshot(env, ctx, signal)),
    restore: fromPromise<BootOutput, StepInput>(({ input: { ctx }, signal }) => restore(env, ctx, signal)),
    prepareRestoreDisks: (ctx: VmContext, signal: AbortSignal) => prepareRestoreDisks(env, ctx, signal),
  };
}

/** Step of state `snapshotting`: saves the VM as ctx.pendingSnapshot asks, then records the snapshot. */
async function takeSnapshot(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<void> {
  const p = ctx.pendingSnapshot;
  if (!p) throw new BangerError('internal', 'no snapshot was asked for');
  const repo = new SnapshotRepo(env.store.db);
  if (repo.get(p.snapshotId)) return; // taken before a daemon restart: nothing left to do
  if (!ctx.runtime) throw new BangerError('invalid_state', `vm ${ctx.name} has no VMM running`);
  const proc = { pid: ctx.runtime.pid, qmpSocket: ctx.runtime.control };
  const f = vmFiles(env.layout, ctx.id);
  const dir = snapshotDir(env.layout.home, p.snapshotId);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const saved = ctx.spec.vmm === 'firecracker' ? await saveFirecrackerVm(env, ctx, { proc, f, dir, stop: p.stop }, signal) : await saveQemuVm(env, ctx, { proc, f, dir, snapshotId: p.snapshotId, stop: p.stop }, signal);
  await copyFile(f.hostKey, join(dir, 'host_key'));
  await copyFile(f.hostKeyPub, join(dir, 'host_key.pub'));
  repo.insert({
    id: p.snapshotId,
    name: p.name,
    vmId: ctx.id,
    vmName: ctx.name,
    createdAt: new Date().toISOString(),
    meta: {
      image: ctx.spec.image,
      vcpus: ctx.spec.vcpus,
      memoryMiB: ctx.spec.memoryMiB,
      diskBytes: ctx.spec.diskBytes,
      accel: ctx.spec.accel,
      gitIdentity: ctx.spec.gitIdentity,
      ...saved,
      vmm: ctx.spec.vmm,
      identityDisk: existsSync(f.identityDisk),
      builderVersion: (await readManifest(env.layout.imageDir(ctx.spec.image))).builderVersion,
      net: ctx.spec.net,
      isolation: ctx.spec.isolation,
    },
  });
  if (p.stop) {
    await env.driver(ctx.spec.vmm).kill(proc); // QEMU quit; this waits until it is gone (Firecracker: ends it)
    await rm(f.vmmState, { force: true });
  }
}

type SaveInput = { proc: VmmProcess; f: VmFiles; dir: string; stop?: boolean };

/** QEMU: the state by migration, the disks frozen as layers; chained onto the VM's last snapshot (or its source's). */
async function saveQemuVm(env: StepEnv, ctx: VmContext, o: SaveInput & { snapshotId: string }, signal: AbortSignal) {
  const base = (await readLayers(o.f))?.base;
  const bulkPort = liveBulkSocket(o.proc.qmpSocket) !== undefined; // before the save: a VM saved with --stop quits in it
  const { kept, saved } = await saveWithLayers(env, ctx, { proc: { pid: o.proc.pid, qmpSocket: o.proc.qmpSocket }, f: o.f, dir: o.dir, base, snapshotId: o.snapshotId, stop: o.stop }, signal);
  const chain = base ? [base, ...snapshotOf(env, base).meta.chain] : (ctx.spec.restore?.chain ?? []);
  return { ...kept, chain, stateFile: 'state.bin', stateBytes: saved.stateBytes, timings: saved.timings, bulkPort };
}

/** Firecracker: copies, so no chain: nothing of this snapshot depends on another. */
async function saveFirecrackerVm(env: StepEnv, ctx: VmContext, o: SaveInput, signal: AbortSignal) {
  const save = () => saveFirecracker(env, o, signal);
  const saved = await stage(env, ctx.id, 'snapshot.save', save, (r) => `${r.stateBytes} bytes of state; ${Object.entries(r.timings).map(([k, v]) => `${k} ${v} ms`).join(', ')}`);
  return { ...saved, chain: [] as string[] };
}

/**
 * Saves the state and freezes the disks into the snapshot's directory. A VM snapshotted before (`base`) sits on
 * layers in its own directory: this snapshot's layers are then copies (of what changed since, only) rebased onto
 * the earlier snapshot's, so that no snapshot depends on a VM's directory.
 */
async function saveWithLayers(
  env: StepEnv,
  ctx: VmContext,
  o: { proc: { pid: number; qmpSocket: string }; f: VmFiles; dir: string; base?: string; snapshotId: string; stop?: boolean },
  signal: AbortSignal,
) {
  const newLayers = { root: join(o.f.dir, `root-${o.snapshotId}.qcow2`), work: join(o.f.dir, `work-${o.snapshotId}.qcow2`) };
  const baseMeta = o.base ? snapshotOf(env, o.base).meta : undefined;
  const keep = async (frozen: DiskLayers['root'], name: string, below: SnapshotLayer | undefined) => {
    const dst = join(o.dir, name);
    if (!below) return linkOrCopy(frozen.file, dst);
    await env.runner('cp', ['--sparse=always', '--reflink=auto', frozen.file, dst], { signal });
    await env.runner('qemu-img', ['rebase', '-u', '-F', below.format, '-b', join(snapshotDir(env.layout.home, o.base!), below.file), dst], { signal });
  };
  let kept: { root: SnapshotLayer; work: SnapshotLayer } | undefined;
  const onFrozen = async (frozen: DiskLayers) => {
    // From here on the VM writes into the new overlays: record them before anything else can fail.
    await writeLayers(o.f, { root: { file: newLayers.root, format: 'qcow2' }, work: { file: newLayers.work, format: 'qcow2' }, base: o.snapshotId });
    kept = { root: { file: `root.${frozen.root.format}`, format: frozen.root.format }, work: { file: `work.${frozen.work.format}`, format: frozen.work.format } };
    await keep(frozen.root, kept.root.file, baseMeta?.root);
    await keep(frozen.work, kept.work.file, baseMeta?.work);
    // a work overlay on a cached disk names that disk's link relative: it goes with the overlay
    const cachedBase = join(o.f.dir, CACHED_BASE_NAME);
    if (!baseMeta && frozen.work.file === o.f.workOverlay && existsSync(cachedBase)) await linkOrCopy(cachedBase, join(o.dir, CACHED_BASE_NAME));
  };
  const save = () =>
    saveQemuState(o.proc, { stateFile: join(o.dir, 'state.bin'), migSocket: join(env.layout.run, `${ctx.id}.mig`), newLayers, after: o.stop ? 'quit' : 'resume', signal, onFrozen });
  const saved = await stage(env, ctx.id, 'snapshot.save', save, (r) => `${r.stateBytes} bytes of state; ${Object.entries(r.timings).map(([k, v]) => `${k} ${v} ms`).join(', ')}`);
  return { kept: kept!, saved };
}

/** The disks of a restore or fork (QEMU: qcow2 overlays on the snapshot's layers; Firecracker: copies), and the snapshot's host key. */
async function prepareRestoreDisks(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<PrepareDisksOutput> {
  const snap = snapshotOf(env, ctx.spec.restore!.snapshotId);
  const dir = snapshotDir(env.layout.home, snap.id);
  const f = vmFiles(env.layout, ctx.id);
  await mkdir(f.dir, { recursive: true, mode: 0o700 });
  if (ctx.spec.vmm === 'firecracker') await copyFirecrackerDisks(env, ctx, snap, dir, f, signal);
  else await overlaysOnSnapshot(env, ctx, snap, dir, f, signal);
  await copyFile(join(dir, 'host_key'), f.hostKey);
  await copyFile(join(dir, 'host_key.pub'), f.hostKeyPub);
  const pub = (await readFile(f.hostKeyPub, 'utf8')).trim();
  await writeFile(f.knownHosts, `banger-${ctx.id} ${pub}\n`, { mode: 0o600 });
  const { net, network } = await leaseNetwork(env, ctx, signal);
  if (snap.meta.identityDisk) {
    // The guest reads it when it boots again (a stop and start), and on a tap restore when asked to (POST /identity).
    const hostKey = { privateKey: await readFile(f.hostKey, 'utf8'), publicKey: pub };
    await writeIdentityDisk(f.identityDisk, { hostname: ctx.name, hostKey, network, gitIdentity: snap.meta.gitIdentity });
  }
  return { net };
}

async function overlaysOnSnapshot(env: StepEnv, ctx: VmContext, snap: SnapshotRecord, dir: string, f: VmFiles, signal: AbortSignal): Promise<void> {
  const overlay = async (backing: SnapshotLayer, dst: string) => {
    if (existsSync(dst)) return;
    const partial = `${dst}.partial`;
    await env.runner('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', backing.format, '-b', join(dir, backing.file), partial], { signal });
    await rename(partial, dst);
  };
  await Promise.all([
    stage(env, ctx.id, 'rootDisk', () => overlay(snap.meta.root, f.rootOverlay), () => `qcow2 overlay on snapshot ${snap.name}`),
    stage(env, ctx.id, 'workDisk', () => overlay(snap.meta.work, f.workOverlay), () => `qcow2 overlay on snapshot ${snap.name}`),
  ]);
  await writeLayers(f, { root: { file: f.rootOverlay, format: 'qcow2' }, work: { file: f.workOverlay, format: 'qcow2' } });
}

/**
 * Step of state `restoring`: the VMM from the snapshot's state (restoreVmm), up once SSH answers with the fork's
 * identity set. A tap fork runs on its own TAP: the guest agent first has the guest apply its identity disk's MAC
 * and address.
 */
async function restore(env: StepEnv, ctx: VmContext, signal: AbortSignal): Promise<BootOutput> {
  const f = vmFiles(env.layout, ctx.id);
  const driver = env.driver(ctx.spec.vmm);
  // A restore the daemon's restart cut short starts over: a half-loaded VMM cannot be finished.
  const left = await findVmm(env, ctx, driver);
  if (left) await stage(env, ctx.id, 'vmm.kill', () => driver.kill(left), () => `pid ${left.pid}: left by a restore that did not finish`);
  const cleanups = new Cleanups();
  let proc: VmmProcess | undefined;
  cleanups.add('kill VMM', async () => {
    if (proc) await driver.kill(proc);
    await rm(f.vmmState, { force: true });
  });
  try {
    const sshPort = ctx.spec.net === 'user' ? await findFreePort() : undefined;
    await checkTapLease(env, ctx, signal);
    const where = { sshPort, guestIp: ctx.net?.guestIp, tap: ctx.net?.tap };
    const launched = async (p: VmmProcess) => {
      proc = p;
      await writeFile(f.vmmState, JSON.stringify({ pid: p.pid, control: p.qmpSocket, ...where }));
    };
    const p = await restoreVmm(env, ctx, f, sshPort, launched, signal);
    const timeoutMs = () => Math.max(1000, (ctx.bootDeadline ?? Date.now() + ctx.spec.bootTimeoutMs) - Date.now());
    if (ctx.spec.net === 'tap') await stage(env, ctx.id, 'network.identity', () => refreshGuestNetwork(ctx, p, timeoutMs(), signal), () => `MAC ${macForVm(ctx.id)}, ${ctx.net?.guestIp} on ${ctx.net?.tap}`);
    const target = await sshTargetFor(env, ctx, where);
    // The first command over SSH is the identity: one connection, where a `true` first would cost another.
    const check = forkIdentityCheck(ctx.name);
    await stage(env, ctx.id, 'ssh.identity', () => waitForSsh(target, { timeoutMs: timeoutMs(), signal, check, keep: (c) => env.ssh.adopt(sshKey(ctx.id, p.pid), target, c) }), () => `SSH up; hostname ${ctx.name}, clock, RNG set`);
    cleanups.release();
    return { runtime: { pid: p.pid, control: p.qmpSocket, ...where, bootedAt: new Date().toISOString() } };
  } catch (e) {
    await cleanups.run().catch((ce) => env.log(ctx.id, 'restore.cleanup', 'error', undefined, errorMessage(ce)));
    throw e;
  }
}

/**
 * The VMM of a restore, running the snapshot's guest: QEMU launched waiting for its state, then the state loaded;
 * Firecracker with the snapshot loaded at its start. `launched` hears of the process as soon as there is one.
 */
async function restoreVmm(env: StepEnv, ctx: VmContext, f: VmFiles, sshPort: number | undefined, launched: (p: VmmProcess) => Promise<void>, signal: AbortSignal): Promise<VmmProcess> {
  const snap = snapshotOf(env, ctx.spec.restore!.snapshotId);
  const dir = snapshotDir(env.layout.home, snap.id);
  if (ctx.spec.vmm === 'firecracker') {
    const p = await loadFirecrackerFork(env, ctx, f, snap, dir, signal);
    await launched(p);
    return p;
  }
  const p = await launchForRestore(env, ctx, f, sshPort, signal);
  await launched(p);
  const load = () => loadQemuState(p, { stateFile: join(dir, snap.meta.stateFile), migSocket: join(env.layout.run, `${ctx.id}.mig`), signal });
  await stage(env, ctx.id, 'snapshot.load', load, () => `${snap.meta.stateBytes} bytes from ${snap.name}`);
  return p;
}

/** The guest agent (QEMU: its virtio-serial port; Firecracker: vsock) has the restored guest apply its identity disk's network. */
async function refreshGuestNetwork(ctx: VmContext, p: VmmProcess, timeoutMs: number, signal: AbortSignal): Promise<void> {
  await agentRefreshIdentity(agentChannelOf(ctx.spec.vmm, ctx.id, p.qmpSocket).channel, Math.min(60_000, timeoutMs), signal);
}

/** The image builder from which a fork of a tap VM can take its own address, by VMM (see assertForkable). */
const FORKABLE_TAP_BUILDER = { qemu: 5, firecracker: IDENTITY_MARKER_BUILDER } as const;

/**
 * A fork of a tap VM takes its own lease, MAC and address from its identity disk when the guest agent is asked to
 * apply it again: that needs the identity disk and an image from builder 5 on (Firecracker: 6, whose guest finds
 * the disk without a serial). Checked before anything is made.
 */
export function assertForkable(s: { name: string; net?: VmContext['spec']['net']; vmm?: VmContext['spec']['vmm']; image: string; builderVersion?: number; identityDisk?: boolean }): void {
  const needs = FORKABLE_TAP_BUILDER[s.vmm ?? 'qemu'];
  if (s.net !== 'tap' || (s.identityDisk && (s.builderVersion ?? 0) >= needs)) return;
  throw new BangerError(
    'unsupported',
    `${s.name} is a tap VM on image ${s.image} from builder ${s.builderVersion ?? 'before 5'}${s.identityDisk ? '' : ', without an identity disk'}: its forks could not take their own MAC and address (${s.vmm ?? 'qemu'} needs builder ${needs} and an identity disk)`,
    `fork a VM created on a rebuilt image (delete the VMs on ${s.image}, then banger image pull ${s.image} --force)${s.vmm === 'firecracker' ? '' : ', or a --net user VM'}`,
  );
}

/** QEMU with the VM's devices and disks, waiting for the saved state (`-incoming defer`). */
async function launchForRestore(env: StepEnv, ctx: VmContext, f: VmFiles, sshPort: number | undefined, signal: AbortSignal) {
  await rm(f.serialLog, { force: true });
  const spec = { ...(await launchSpecFor(env, ctx, sshPort)), bulkPort: snapshotOf(env, ctx.spec.restore!.snapshotId).meta.bulkPort === true, incoming: true };
  return stage(env, ctx.id, 'vmm.launch', () => env.driver('qemu').launch(spec, { signal, runner: env.runner }), (p) => `pid ${p.pid} (qemu, ${ctx.spec.accel}, waiting for the saved state)`);
}

/**
 * A constant script; its data comes on stdin, one value a line: the hostname, the host's time (epoch seconds with
 * milliseconds), and 64 bytes of fresh host randomness in hex. A fork keeps its own name across a stop and start
 * through its identity disk, or, for a snapshot of a VM from an image built by banger 2 or 3, the identity
 * directory on its work disk, which this updates.
 */
const IDENTITY_SCRIPT = [
  'set -e',
  'read -r name; read -r now; read -r seed',
  'printf %s "$name" > /proc/sys/kernel/hostname',
  'printf "%s\\n" "$name" > /etc/hostname',
  'if [ -d /root/.banger/identity ]; then printf "%s\\n" "$name" > /root/.banger/identity/hostname; fi',
  'date -s "@$now" > /dev/null',
  'printf %s "$seed" > /dev/urandom',
].join('\n');

/**
 * A restored guest's own identity, set by its first SSH command: hostname, the clock (it stood still since the
 * snapshot), fresh entropy. Its data goes on stdin, never into the command line.
 */
function forkIdentityCheck(hostname: string): { command: string; stdin: () => string } {
  const name = hostname.replace(/[^A-Za-z0-9.-]/g, '-');
  const stdin = () => {
    const now = Date.now();
    return `${name}\n${Math.floor(now / 1000)}.${String(now % 1000).padStart(3, '0')}\n${randomBytes(64).toString('hex')}\n`;
  };
  return { command: `sh -c '${IDENTITY_SCRIPT.replace(/'/g, `'"'"'`)}'`, stdin };
}
