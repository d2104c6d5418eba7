/** vm.workspace.prepare and vm.workspace.export: jobs queued on the VM's workspace actor, one at a time. */
import { resolve } from 'node:path';
import { validateGuestPath, type WorkspaceMode } from '../../host/guest/workspace.js';
import type { CallContext, Handlers } from '../../rpc/server.js';
import type { DaemonServices } from '../services.js';
import { vmAccess } from './vm-access.js';
import { viewOf } from '../views.js';

export function workspaceHandlers(d: DaemonServices): Pick<Handlers, 'vm.workspace.prepare' | 'vm.workspace.export'> {
  const { resolveVm } = vmAccess(d);
  const runJob = jobRunner(d);
  return {
    'vm.workspace.prepare': async (p, ctx) => {
      const id = resolveVm(p.vm);
      const guestPath = validateGuestPath(p.guestPath ?? '/root/repo');
      const params = { ...p, guestPath, mode: p.mode ?? 'shallow', readOnly: p.readOnly ?? false };
      return runJob(id, 'prepare', params, ctx);
    },

    'vm.workspace.export': async (p, ctx) => {
      const id = resolveVm(p.vm);
      const guestPath = validateGuestPath(p.guestPath ?? '/root/repo');
      return runJob(id, 'export', { ...p, guestPath }, ctx);
    },
  };
}

interface JobResults {
  prepare: Awaited<ReturnType<Handlers['vm.workspace.prepare']>>;
  export: Awaited<ReturnType<Handlers['vm.workspace.export']>>;
}

/** Queue a job on the VM's workspace actor; resolves with what the job runner (src/daemon/jobs.ts) returns. */
function jobRunner(d: DaemonServices) {
  const { supervisor: sup } = d;
  return async function runJob<K extends 'prepare' | 'export'>(vmId: string, kind: K, params: Record<string, unknown>, ctx: CallContext): Promise<JobResults[K]> {
    const queued = viewOf(sup.snapshot(vmId)).workspace?.running;
    const result = sup.runJob(vmId, kind, params, (pr) => ctx.progress({ stage: pr.stage, status: 'info', bytes: pr.bytes, detail: pr.detail }));
    ctx.progress({ stage: kind, status: 'start', detail: queued ? 'queued behind another job' : undefined });
    // The runner's result for this kind: src/daemon/jobs.ts builds exactly these shapes.
    return (await result) as JobResults[K];
  };
}

/** A workspace as vm.create names it, with prepare's defaults (shallow, /root/repo). */
export function workspaceRequest(w: { source: string; mode?: WorkspaceMode; guestPath?: string }) {
  return { source: resolve(w.source), mode: w.mode ?? 'shallow', guestPath: validateGuestPath(w.guestPath ?? '/root/repo') };
}
