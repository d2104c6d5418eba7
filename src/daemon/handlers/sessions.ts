/** guest.session.{start,list,show,send,attach,logs,kill}: sessions in the guest, driven over the VM's pooled SSH connection. */
import { constants as osConstants } from 'node:os';
import { customAlphabet } from 'nanoid';
import { BangerError } from '../../errors.js';
import { killSession, listSessions, PIPE_BUF, pollSession, sendToSession, splitLines, startSession, type GuestSession, type Unsendable } from '../../host/guest/sessions.js';
import { SEND_LIMIT_BYTES } from '../../rpc/protocol.js';
import type { CallContext, Handlers } from '../../rpc/server.js';
import type { Guest, GuestAccess } from './guest-access.js';

type SessionHandlers = Pick<
  Handlers,
  'guest.session.start' | 'guest.session.list' | 'guest.session.show' | 'guest.session.send' | 'guest.session.attach' | 'guest.session.logs' | 'guest.session.kill'
>;

const newSessionName = customAlphabet('0123456789abcdefghijklmnopqrstuvwxyz', 8);
/** Far past any file's end: a stream read from here yields nothing. */
const NEVER = 2 ** 50;

export function sessionHandlers(access: GuestAccess): SessionHandlers {
  const look = sessionLookup(access);
  const locks = new Map<string, SendLock>();
  const lockOf = (key: string) => locks.get(key) ?? locks.set(key, new SendLock()).get(key)!;
  const withAttach = access.viewOf;
  return {
    'guest.session.start': async (p) => {
      const g = await access.guest(p.vm);
      const name = p.name ?? `s-${newSessionName()}`;
      await startSession(g.run, { name, pipe: p.pipe ?? false, argv: p.argv, cwd: p.cwd, env: p.env, startedAt: new Date().toISOString() });
      const [s] = await listSessions(g.run, name);
      if (!s) throw new BangerError('host', `session ${name} was started but the guest does not list it`);
      access.records.put(g.vmId, s);
      return withAttach(g.vmId, s);
    },
    'guest.session.list': async (p) => {
      const all = await look.sessionsOf(p.vm);
      return all.list.map((s) => withAttach(all.vmId, s));
    },
    'guest.session.show': async (p) => {
      const f = await look.find(p.vm, p.session);
      return withAttach(f.vmId, f.s);
    },
    'guest.session.send': (p) => send(access, look, lockOf, p),
    'guest.session.attach': (p, ctx) => attach(access, look, p, ctx),
    'guest.session.logs': (p, ctx) => logs(look, p, ctx),
    'guest.session.kill': async (p) => {
      const signal = signalName(p.signal ?? 'TERM');
      const f = await look.running(p.vm, p.session);
      await killSession(f.guest.run, p.session, signal);
      return withAttach(f.vmId, await settled(f.guest, p.session));
    },
  };
}

type Lookup = ReturnType<typeof sessionLookup>;

/** Finds a VM's sessions: the guest's own list while it runs, the daemon's records of ended ones otherwise. */
function sessionLookup(access: GuestAccess) {
  async function sessionsOf(ref: string): Promise<{ vmId: string; vmName: string; list: GuestSession[]; guest?: Guest }> {
    const v = access.vm(ref);
    if (v.state !== 'running') return { vmId: v.id, vmName: v.name, list: access.records.ended(v.id, `the VM is ${v.state}`) };
    const guest = await access.guest(ref);
    return { vmId: v.id, vmName: v.name, list: access.records.merge(v.id, await listSessions(guest.run)), guest };
  }

  async function find(ref: string, name: string) {
    const all = await sessionsOf(ref);
    const s = all.list.find((x) => x.name === name);
    if (!s) throw new BangerError('not_found', `vm ${all.vmName} has no session named ${name}`, `banger vm session list ${all.vmName}`);
    return { ...all, s };
  }

  /** A session that must be running in a running guest. */
  async function running(ref: string, name: string) {
    const f = await find(ref, name);
    if (f.s.state !== 'running' || !f.guest) {
      const hint = f.guest ? `its output is still there: banger vm session logs ${f.vmName} ${name}` : `its output lived in the stopped guest and is gone; banger vm start ${f.vmName} starts the VM again`;
      throw new BangerError('invalid_state', `session ${name} has ended (${f.s.endReason})`, hint);
    }
    return { ...f, guest: f.guest };
  }

  return { sessionsOf, find, running };
}

type Params<M extends keyof SessionHandlers> = Parameters<SessionHandlers[M]>[0];

/** One guest command per send; only a send that finds nothing to write to lists the sessions, to name why. */
async function send(access: GuestAccess, look: Lookup, lockOf: (key: string) => SendLock, p: Params<'guest.session.send'>) {
  const payload = Buffer.from(p.data, p.encoding ?? 'utf8');
  if (payload.length > SEND_LIMIT_BYTES)
    throw new BangerError('usage', `the payload is ${payload.length} bytes, over the send limit of ${SEND_LIMIT_BYTES} bytes (${SEND_LIMIT_BYTES / 1024} KiB)`, 'split it into several sends');
  // A stopped VM's sessions ended with it: the records name that (the guest cannot be asked).
  if (access.vm(p.vm).state !== 'running') await look.running(p.vm, p.session);
  const g = await access.guest(p.vm);
  const { lines, longest, normalised } = splitLines(payload);
  // Lines of at most PIPE_BUF bytes are atomic in the FIFO; a payload with a longer one goes alone.
  const unsendable = await lockOf(`${g.vmId}/${p.session}`).run(longest > PIPE_BUF, () => sendToSession(g.run, p.session, normalised));
  if (unsendable) await refuseSend(look, p.vm, p.session, unsendable);
  return { bytes: normalised.length, lines };
}

/** The error for a send that found no pipe session to write to: the listing names the session's state. */
async function refuseSend(look: Lookup, ref: string, name: string, why: Unsendable): Promise<never> {
  if (why === 'not-pipe') throw new BangerError('invalid_state', `session ${name} is not in pipe mode: it has no stdin to send to`, 'start it with --pipe to send it input');
  await look.running(ref, name);
  throw new BangerError('invalid_state', `session ${name} has ended: nothing reads its stdin`, `its output is still there: banger vm session logs ${ref} ${name}`);
}

/** Exclusive: a second attach is refused naming the holder; output streams until the client goes or the session ends. */
async function attach(access: GuestAccess, look: Lookup, p: Params<'guest.session.attach'>, ctx: CallContext<'guest.session.attach'>) {
  const f = await look.running(p.vm, p.session);
  const key = `${f.vmId}/${p.session}`;
  const held = access.attached.get(key);
  if (held) throw new BangerError('conflict', `session ${p.session} is already attached by ${held.holder} (since ${held.since}); attach is exclusive`, 'detach there first (Ctrl-] then d), or use `banger vm session send` and `logs --follow`, which need no attach');
  access.attached.set(key, { holder: p.holder, since: new Date().toISOString() });
  // An empty first chunk tells the client the attach is its own (before any output, which may never come).
  ctx.stream({ stream: 'stdout', data: '', offset: f.s.stdoutBytes ?? 0 });
  try {
    const { ended } = await follow(f.guest, p.session, f.s.stdoutBytes ?? 0, f.s.stderrBytes ?? 0, ctx);
    return { ended };
  } finally {
    access.attached.delete(key);
  }
}

async function logs(look: Lookup, p: Params<'guest.session.logs'>, ctx: CallContext<'guest.session.logs'>) {
  const f = await look.find(p.vm, p.session);
  if (!f.guest) throw new BangerError('invalid_state', `vm ${f.vmName} is not running: session ${p.session}'s output lived in the guest and is gone`, `banger vm start ${f.vmName} starts the VM again (its sessions do not come back)`);
  const offset = p.offset ?? 0;
  const offsets: [number, number] = p.stderr ? [NEVER, offset] : [offset, NEVER];
  if (p.follow) {
    const end = await follow(f.guest, p.session, offsets[0], offsets[1], ctx);
    return { data: '', offset: p.stderr ? end.err : end.out };
  }
  const r = await pollSession(f.guest.run, p.session, offsets[0], offsets[1], 64 * 1024 * 1024);
  const data = (p.stderr ? r?.stderr : r?.stdout) ?? Buffer.alloc(0);
  return { data: data.toString('base64'), offset: offset + data.length };
}

function signalName(s: string): string {
  const name = s.startsWith('SIG') ? s.slice(3) : s;
  if (!(`SIG${name}` in osConstants.signals)) throw new BangerError('usage', `unknown signal ${JSON.stringify(s)}`, 'give a signal name such as TERM, INT, KILL or HUP');
  return name;
}

/** The session after a kill: waits (bounded, 10 s) for the guest to report it ended. */
async function settled(g: Guest, name: string): Promise<GuestSession> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const [s] = await listSessions(g.run, name);
    if (!s) throw new BangerError('not_found', `session ${name} vanished from the guest`);
    if (s.state === 'ended' || Date.now() > deadline) return s;
    await pause(200);
  }
}

/**
 * Streams a session's output from the given offsets until the client goes away (false) or the session has ended
 * and all its output was sent (true), with the offsets reached.
 */
async function follow(g: Guest, name: string, outAt: number, errAt: number, ctx: CallContext<'guest.session.attach' | 'guest.session.logs'>): Promise<{ ended: boolean; out: number; err: number }> {
  let out = outAt;
  let err = errAt;
  while (!ctx.signal.aborted) {
    const p = await pollSession(g.run, name, out, err);
    if (!p) throw new BangerError('not_found', `session ${name} is gone from the guest`);
    if (p.stdout.length) ctx.stream({ stream: 'stdout', data: p.stdout.toString('base64'), offset: (out += p.stdout.length) });
    if (p.stderr.length) ctx.stream({ stream: 'stderr', data: p.stderr.toString('base64'), offset: (err += p.stderr.length) });
    const quiet = !p.stdout.length && !p.stderr.length;
    if (p.ended && quiet) return { ended: true, out, err };
    if (quiet) await pause(250, ctx.signal);
  }
  return { ended: false, out, err };
}

function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

/**
 * Per-session send lock: payloads whose lines all fit PIPE_BUF share it (the FIFO keeps each of their lines
 * whole); a payload with a longer line holds it alone, so its partial writes interleave with nothing.
 */
export class SendLock {
  private shared = 0;
  private exclusive = false;
  private waiters: Array<() => void> = [];

  async run<T>(alone: boolean, fn: () => Promise<T>): Promise<T> {
    while (alone ? this.exclusive || this.shared > 0 : this.exclusive) await new Promise<void>((r) => this.waiters.push(r));
    if (alone) this.exclusive = true;
    else this.shared++;
    try {
      return await fn();
    } finally {
      if (alone) this.exclusive = false;
      else this.shared--;
      const w = this.waiters;
      this.waiters = [];
      for (const wake of w) wake();
    }
  }
}
