/**
 * guest.session.* and vm.exec: commands in a running guest over one pooled SSH connection per VM (vm.health asks
 * the guest agent instead: ./health.ts).
 * Sessions live in the guest (src/host/guest/sessions.ts); the daemon keeps only what must outlive the guest —
 * a record per VM (sessions.json in its directory, so a stopped VM still lists its sessions, ended, with the
 * reason) — and what lives only as long as a client: the exclusive attach and the per-session send lock.
 */
import { Writable, type Readable } from 'node:stream';
import { BangerError } from '../../errors.js';
import { listSessions, type GuestSession } from '../../host/guest/sessions.js';
import { shellQuote, quoteArg } from '../../host/exec/shell.js';
import type { CallContext, Handlers } from '../../rpc/server.js';
import type { ParamsOf, ResultOf } from '../../rpc/protocol.js';
import type { HealthView, OutputChunk, SessionView } from '../../rpc/types.js';
import type { DaemonServices } from '../services.js';
import { vmHealth } from './health.js';
import { sessionHandlers } from './sessions.js';
import { guestAccess, type GuestAccess } from './guest-access.js';
import { ExecInputs } from './exec-input.js';

type GuestHandlers = Pick<Handlers, 'vm.exec' | 'vm.exec.input' | 'vm.health'>;

export function guestHandlers(d: DaemonServices): GuestHandlers & ReturnType<typeof sessionHandlers> {
  const access = guestAccess(d);
  const inputs = new ExecInputs();
  return {
    ...sessionHandlers(access),
    'vm.exec': async (p, ctx) => {
      // Registered before the first await: the client's vm.exec.input calls follow this one at once.
      const input = p.inputId === undefined ? undefined : inputs.register(p.inputId);
      try {
        return await execIn(access, p, ctx, input);
      } finally {
        if (p.inputId !== undefined) inputs.release(p.inputId);
      }
    },
    'vm.exec.input': async (p) => ({ accepted: await inputs.feed(p.inputId, p.data === undefined ? undefined : Buffer.from(p.data, 'base64'), p.end ?? false) }),
    'vm.health': (p) => vmHealth(d, p.vm),
  };
}

async function execIn(access: GuestAccess, p: ParamsOf<'vm.exec'>, ctx: CallContext<'vm.exec'>, input: Readable | undefined): Promise<ResultOf<'vm.exec'>> {
  const g = await access.guest(p.vm);
  const toStream = (stream: OutputChunk['stream']) =>
    new Writable({
      write(chunk: Buffer, _enc, cb) {
        ctx.stream({ stream, data: chunk.toString('base64') });
        cb();
      },
    });
  const started = Date.now();
  const r = await g.exec(execCommand(p.argv, p.cwd, p.env, p.timeoutMs), {
    stdin: input ?? (p.stdin === undefined ? undefined : Buffer.from(p.stdin, 'base64')),
    stdout: toStream('stdout'),
    stderr: toStream('stderr'),
    // The guest's timeout(1) ends the command; this only bounds a guest that stopped answering.
    timeoutMs: p.timeoutMs === undefined ? undefined : p.timeoutMs + 15_000,
    signal: ctx.signal,
  });
  const timedOut = p.timeoutMs !== undefined && r.exitCode === 124 && Date.now() - started >= p.timeoutMs;
  return { exitCode: r.exitCode, signal: r.signal ?? null, timedOut };
}

/**
 * `cd DIR && export K=V && exec ARGV`, every value one quoted word. With a timeout, ARGV runs under the guest's
 * timeout(1): TERM when it expires, KILL 2 s later, exit status 124 (closing the SSH channel would not stop it).
 */
export function execCommand(argv: string[], cwd?: string, env?: Record<string, string>, timeoutMs?: number): string {
  const parts: string[] = [];
  if (cwd) parts.push(`cd -- ${quoteArg(cwd)}`);
  for (const [k, v] of Object.entries(env ?? {})) parts.push(`export ${quoteArg(`${k}=${v}`)}`);
  const bounded = timeoutMs === undefined ? argv : ['timeout', '-k', '2', '--', `${(timeoutMs / 1000).toFixed(3)}s`, ...argv];
  parts.push(`exec ${shellQuote(bounded)}`);
  return parts.join(' && ');
}

/** What `vm show` adds: the VM's sessions (live when it runs, else as last recorded) and its health. */
export async function guestFields(d: DaemonServices, id: string): Promise<{ sessions: SessionView[]; health: HealthView | null }> {
  const access = guestAccess(d);
  const v = access.vm(id);
  const show = (list: GuestSession[]) => list.map((s) => access.viewOf(id, s));
  if (v.state !== 'running') return { sessions: show(access.records.ended(id, `the VM is ${v.state}`)), health: null };
  try {
    // `vm show` must answer even when the guest does not: bounded, then what was last recorded.
    return await withinMs(10_000, async () => {
      const g = await access.guest(id);
      const [listed, health] = await Promise.all([listSessions(g.run), vmHealth(d, id).catch(() => null)]);
      return { sessions: show(access.records.merge(id, listed)), health };
    });
  } catch {
    return { sessions: show(Object.values(access.records.load(id))), health: null };
  }
}

function withinMs<T>(ms: number, fn: () => Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new BangerError('timeout', `the guest did not answer within ${ms} ms`)), ms)));
  return Promise.race([fn(), late]).finally(() => clearTimeout(timer));
}
