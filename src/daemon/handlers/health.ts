/**
 * vm.health and vm.wait's `healthy`: the guest agent's GET /healthz (src/host/guest/agent.ts), over the channel
 * the VM's VMM gives it — QEMU's virtio-serial port (a Unix socket next to the QMP socket), or Firecracker's vsock
 * (its Unix socket, `CONNECT <port>`). Calls to one VM go one at a time: QEMU serves one client per chardev.
 */
import { BangerError, errorMessage } from '../../errors.js';
import { agentHealth } from '../../host/guest/agent.js';
import { agentChannelOf } from '../../host/vmm/agent-channel.js';
import { sleep } from '../../host/exec/wait.js';
import type { HealthView } from '../../rpc/types.js';
import type { DaemonServices } from '../services.js';
import { vmAccess } from './vm-access.js';

/** How long one agent call may take, connecting included. */
export const AGENT_CALL_MS = 10_000;

const queues = new WeakMap<DaemonServices, Map<string, Promise<unknown>>>();

/** The health of a running VM, from its guest agent; a clear error for a VM that is not running. */
export async function vmHealth(d: DaemonServices, ref: string, timeoutMs = AGENT_CALL_MS): Promise<HealthView> {
  const { resolveVm, view } = vmAccess(d);
  const id = resolveVm(ref);
  const snap = d.supervisor.snapshot(id);
  const rt = snap.context.runtime;
  const v = view(id);
  if (v.state !== 'running' || !rt) {
    const hint = v.state === 'stopped' ? `banger vm start ${v.name}` : v.state === 'booting' ? 'wait for the boot to finish (banger vm show shows the state)' : undefined;
    throw new BangerError('invalid_state', `vm ${v.name} is ${v.state}, not running: its guest agent answers only while it runs`, hint);
  }
  const { channel, transport } = agentChannelOf(snap.context.spec.vmm, id, rt.control);
  const h = await oneAtATime(d, id, () => agentHealth(channel, timeoutMs));
  return { ...h, via: 'agent', transport, checkedAt: new Date().toISOString() };
}

function oneAtATime<T>(d: DaemonServices, id: string, fn: () => Promise<T>): Promise<T> {
  let byVm = queues.get(d);
  if (!byVm) queues.set(d, (byVm = new Map()));
  const before = byVm.get(id) ?? Promise.resolve();
  const mine = before.then(fn, fn);
  const tail = mine.catch(() => undefined);
  byVm.set(id, tail);
  void tail.then(() => {
    if (byVm.get(id) === tail) byVm.delete(id);
  });
  return mine;
}

/**
 * Polls the agent until it answers, within `timeoutMs` (the VM must be running already). The last failure is in
 * the error: a guest whose agent never answers says why.
 */
export async function waitHealthy(d: DaemonServices, id: string, timeoutMs: number, signal: AbortSignal): Promise<HealthView> {
  const deadline = Date.now() + timeoutMs;
  let last = 'it was not asked yet';
  for (;;) {
    if (signal.aborted) throw new BangerError('aborted', 'waiting for the guest agent: aborted');
    const left = deadline - Date.now();
    if (left <= 0) break;
    try {
      return await vmHealth(d, id, Math.min(AGENT_CALL_MS, left));
    } catch (e) {
      if (e instanceof BangerError && e.kind === 'invalid_state') throw e;
      last = errorMessage(e);
    }
    await sleep(Math.min(1000, Math.max(0, deadline - Date.now())), signal).catch(() => undefined);
  }
  throw new BangerError('timeout', `the guest agent did not answer within ${timeoutMs} ms: ${last}`, 'see the serial log (banger vm logs --serial) for banger-agent');
}
