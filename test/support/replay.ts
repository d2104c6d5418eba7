/** Replays a recorded event log (the JSON lines of `banger vm events`) through the pure machines. */
import { readFileSync } from 'node:fs';
import { initialTransition, transition } from 'xstate';
import { vmMachine, type VmInput, type VmSnapshot } from '../../src/machines/vm.machine.js';
import { workspaceMachine } from '../../src/machines/workspace.machine.js';

export interface LoggedEvent {
  seq: number;
  actor: string;
  type: string;
  payload: Record<string, unknown>;
  from?: string | null;
  to?: string | null;
}

export function readLog(path: string): LoggedEvent[] {
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as LoggedEvent);
}

/** Replays the VM actor's events; checks every recorded `to` state on the way; returns the final snapshot. */
export function replayVm(log: LoggedEvent[]): { snapshot: VmSnapshot; states: string[]; mismatches: string[] } {
  const vmEvents = log.filter((e) => e.actor.startsWith('vm:'));
  const init = vmEvents[0];
  if (!init || init.type !== 'xstate.init') throw new Error('a VM event log starts with xstate.init');
  let [s] = initialTransition(vmMachine, init.payload.input as VmInput);
  const states: string[] = [String(s.value)];
  const mismatches: string[] = [];
  for (const e of vmEvents.slice(1)) {
    // A later xstate.init is the daemon restoring the actor from its snapshot: no transition.
    if (e.type === 'xstate.init') continue;
    const event = { type: e.type, ...e.payload } as never;
    if (e.type.startsWith('xstate.error.actor.')) (event as { error: unknown }).error = new Error(String((e.payload.error as { message?: string })?.message ?? e.payload.error));
    [s] = transition(vmMachine, s, event);
    states.push(String(s.value));
    if (e.to && e.to !== s.value) mismatches.push(`seq ${e.seq} ${e.type}: recorded ${e.to}, replayed ${String(s.value)}`);
  }
  return { snapshot: s as VmSnapshot, states, mismatches };
}

/**
 * Replays the workspace sub-actor's events. Each running period of the VM starts a new workspace actor
 * (an xstate.init with input); a restore (xstate.init without input) and xstate.stop change nothing.
 */
export function replayWorkspace(log: LoggedEvent[]): { instances: Array<{ states: string[]; context: unknown }>; mismatches: string[] } {
  const instances: Array<{ states: string[]; context: unknown }> = [];
  const mismatches: string[] = [];
  let s: ReturnType<typeof initialTransition<typeof workspaceMachine>>[0] | undefined;
  for (const e of log.filter((x) => x.actor.startsWith('workspace:'))) {
    if (e.type === 'xstate.init') {
      if (!e.payload.input) continue;
      [s] = initialTransition(workspaceMachine, e.payload.input as { vmId: string });
      instances.push({ states: [String(s.value)], context: s.context });
      continue;
    }
    if (!s || e.type === 'xstate.stop') continue;
    const event = { type: e.type, ...e.payload } as never;
    if (e.type.startsWith('xstate.error.actor.')) (event as { error: unknown }).error = new Error(String((e.payload.error as { message?: string })?.message ?? e.payload.error));
    [s] = transition(workspaceMachine, s, event);
    const cur = instances[instances.length - 1];
    cur.states.push(String(s.value));
    cur.context = s.context;
    if (e.to && e.to !== s.value) mismatches.push(`seq ${e.seq} ${e.type}: recorded ${e.to}, replayed ${String(s.value)}`);
  }
  return { instances, mismatches };
}
