/**
 * The daemon's record of each VM's guest sessions (sessions.json in the VM's directory): what was last seen of
 * each, so sessions are still listed — ended, with the reason — once the guest that ran them is gone.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { SessionView } from '../../rpc/types.js';
import type { GuestSession } from '../../host/guest/sessions.js';

type Record = { [name: string]: GuestSession };

export class SessionRecords {
  constructor(private readonly dirOf: (vmId: string) => string) {}

  private file(vmId: string): string {
    return join(this.dirOf(vmId), 'sessions.json');
  }

  load(vmId: string): Record {
    try {
      return JSON.parse(readFileSync(this.file(vmId), 'utf8')) as Record;
    } catch {
      return {};
    }
  }

  private save(vmId: string, rec: Record): void {
    const f = this.file(vmId);
    writeFileSync(`${f}.tmp`, JSON.stringify(rec, null, 1));
    renameSync(`${f}.tmp`, f);
  }

  /** Remember what the guest reports; a recorded session the guest no longer has ended with the guest's restart. */
  merge(vmId: string, live: GuestSession[]): GuestSession[] {
    const rec = this.load(vmId);
    const seen = new Set(live.map((s) => s.name));
    for (const s of live) rec[s.name] = s;
    for (const s of Object.values(rec)) if (!seen.has(s.name) && s.state === 'running') rec[s.name] = endedBy(s, 'the VM stopped or restarted; the session did not survive it');
    this.save(vmId, rec);
    return sorted(rec);
  }

  /** The guest is not there to ask (the VM is not running): every session it had has ended, for `reason`. */
  ended(vmId: string, reason: string): GuestSession[] {
    const rec = this.load(vmId);
    let changed = false;
    for (const s of Object.values(rec))
      if (s.state === 'running') {
        rec[s.name] = endedBy(s, reason);
        changed = true;
      }
    if (changed) this.save(vmId, rec);
    return sorted(rec);
  }

  put(vmId: string, s: GuestSession): void {
    const rec = this.load(vmId);
    rec[s.name] = s;
    this.save(vmId, rec);
  }
}

const endedBy = (s: GuestSession, reason: string): GuestSession => ({ ...s, state: 'ended', endReason: reason, exitCode: null, stdoutBytes: null, stderrBytes: null });
const sorted = (rec: Record) => Object.values(rec).sort((a, b) => a.startedAt.localeCompare(b.startedAt) || a.name.localeCompare(b.name));

export type { SessionView };
