/**
 * A running VM's guest, for guest.session.* and vm.exec (guest.ts, sessions.ts) and the warm pool's warm-up: its
 * pooled SSH connection, the daemon's records of its sessions, and who holds each session's exclusive attach.
 */
import { readFile } from 'node:fs/promises';
import { BangerError } from '../../errors.js';
import { sshKey } from '../../actors/vm-steps.js';
import { vmFiles } from '../../actors/vm-files.js';
import { ensureUserKey } from '../../host/guest/keys.js';
import type { SshPool } from '../../host/guest/pool.js';
import type { SshTarget } from '../../host/guest/ssh.js';
import type { GuestRun, GuestSession } from '../../host/guest/sessions.js';
import type { SessionView } from '../../rpc/types.js';
import type { DaemonServices } from '../services.js';
import { vmAccess } from './vm-access.js';
import { SessionRecords } from './session-records.js';

/** A running VM's guest: how to run a command in it, over its pooled connection. */
export interface Guest {
  vmId: string;
  vmName: string;
  run: GuestRun;
  exec: SshPool['exec'] extends (a: string, b: SshTarget, ...rest: infer R) => infer T ? (...rest: R) => T : never;
}

export interface GuestAccess {
  /** The guest of a running VM; a clear error for a VM that is not running. */
  guest(ref: string): Promise<Guest>;
  records: SessionRecords;
  pool: SshPool;
  /** Who holds each session's exclusive attach, by `vmId/name`: it lasts as long as the attaching client. */
  attached: Map<string, { holder: string; since: string }>;
  /** A session as shown, with its attach holder. */
  viewOf(vmId: string, s: GuestSession): SessionView;
  /** The VM's id and state, whatever the state. */
  vm(ref: string): { id: string; name: string; state: string };
}

const pools = new WeakMap<DaemonServices, GuestAccess>();

export function guestAccess(d: DaemonServices): GuestAccess {
  const existing = pools.get(d);
  if (existing) return existing;
  const { resolveVm, view } = vmAccess(d);
  const pool = d.ssh;
  const attached: GuestAccess['attached'] = new Map();
  const access: GuestAccess = {
    pool,
    attached,
    viewOf(vmId, s) {
      const a = attached.get(`${vmId}/${s.name}`);
      return { ...s, attachedBy: a ? `${a.holder} (since ${a.since})` : null };
    },
    records: new SessionRecords((id) => vmFiles(d.layout, id).dir),
    vm(ref) {
      const v = view(resolveVm(ref));
      return { id: v.id, name: v.name, state: v.state };
    },
    async guest(ref) {
      const id = resolveVm(ref);
      const v = view(id);
      const rt = d.supervisor.snapshot(id).context.runtime;
      if (v.state !== 'running' || !rt) {
        pool.drop(id);
        throw new BangerError('invalid_state', `vm ${v.name} is ${v.state}, not running: commands and sessions need a running guest`, `banger vm start ${v.name}`);
      }
      const target = await targetOf(d, id, v.name, rt);
      const key = sshKey(id, rt.pid);
      const exec: Guest['exec'] = (command, opts) => pool.exec(key, target, command, opts);
      const runIt: GuestRun = (command, opts = {}) => exec(command, { stdin: opts.stdin, timeoutMs: opts.timeoutMs ?? 60_000 });
      return { vmId: id, vmName: v.name, run: runIt, exec };
    },
  };
  pools.set(d, access);
  return access;
}

async function targetOf(d: DaemonServices, id: string, name: string, rt: { sshPort?: number; guestIp?: string }): Promise<SshTarget> {
  const key = await ensureUserKey(d.layout.keysDir);
  const hostPublicKey = (await readFile(vmFiles(d.layout, id).hostKeyPub, 'utf8')).trim();
  if (rt.guestIp) return { host: rt.guestIp, port: 22, privateKey: key.privateKey, hostPublicKey, label: name };
  if (!rt.sshPort) throw new BangerError('invalid_state', `vm ${name} has no SSH address`, `banger vm restart ${name}`);
  return { host: '127.0.0.1', port: rt.sshPort, privateKey: key.privateKey, hostPublicKey, label: name };
}

/** Dials a running VM's pooled connection and runs one command over it (the warm pool's warm-up). */
export async function warmGuest(d: DaemonServices, id: string): Promise<void> {
  const g = await guestAccess(d).guest(id);
  const r = await g.run('true', { timeoutMs: 120_000 });
  if (r.exitCode !== 0) throw new BangerError('host', `true exited ${r.exitCode} in vm ${g.vmName}`);
}
