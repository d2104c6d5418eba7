import { PassThrough, Duplex } from 'node:stream';
import type { Socket } from 'node:net';
import { describe, expect, it } from 'vitest';
import { NdjsonConnection, type NdjsonAdapter } from '../../src/rpc/connection.js';

/** A socket stand-in: what the connection writes goes to `sent`; `feed` delivers lines to it. */
function pipe() {
  const incoming = new PassThrough();
  const sent: string[] = [];
  const sock = new Duplex({
    read() {},
    write(chunk, _enc, cb) {
      sent.push(String(chunk));
      cb();
    },
  });
  incoming.on('data', (d) => sock.push(d));
  incoming.on('end', () => sock.push(null));
  (sock as unknown as { setEncoding: (e: string) => void }).setEncoding('utf8');
  return { sock: sock as unknown as Socket, sent, feed: (s: string) => incoming.write(s), end: () => sock.destroy() };
}

const adapter: NdjsonAdapter<{ op: string }> = {
  id: (n) => `r${n}`,
  encode: (id, req) => ({ id, op: req.op }),
  decode: (m) => {
    if (typeof m.event === 'string') return { notification: m };
    if (typeof m.id !== 'string') return undefined;
    if (m.fail) return { answers: m.id, error: (label) => new Error(`${label} failed: ${String(m.fail)}`) };
    return { answers: m.id, result: m.value };
  },
  errors: {
    closed: (l) => new Error(`${l}: closed`),
    lost: (l, why) => new Error(`${l}: lost (${why})`),
    timeout: (l, ms) => new Error(`${l}: timeout ${ms}`),
    aborted: (l) => new Error(`${l}: aborted`),
  },
};

describe('NdjsonConnection', () => {
  it('matches answers to requests by id, in any order, and routes other messages to the notification handler', async () => {
    const p = pipe();
    const events: unknown[] = [];
    const c = new NdjsonConnection(p.sock, { adapter, maxLine: 1000, onNotification: (m) => events.push(m) });
    const a = c.request<number>({ op: 'a' }, { label: 'a', context: 'ctx-a' });
    const b = c.request<number>({ op: 'b' }, { label: 'b' });
    expect(p.sent).toEqual(['{"id":"r1","op":"a"}\n', '{"id":"r2","op":"b"}\n']);
    expect(c.contextOf('r1')).toBe('ctx-a');
    p.feed('{"event":"tick"}\n{"id":"r2","fail":"no"}\n{"id":"r9","value":0}\nnot json\n{"id":"r1",');
    p.feed('"value":1}\n');
    await expect(b).rejects.toThrow('b failed: no');
    await expect(a).resolves.toBe(1);
    expect(events).toEqual([{ event: 'tick' }]);
    expect(c.contextOf('r1')).toBeUndefined();
  });

  it('times out one request without touching the others, and honours an abort signal', async () => {
    const p = pipe();
    const c = new NdjsonConnection(p.sock, { adapter, maxLine: 1000 });
    const slow = c.request({ op: 's' }, { label: 'slow', timeoutMs: 20 });
    const ac = new AbortController();
    const aborted = c.request({ op: 'x' }, { label: 'x', signal: ac.signal });
    const other = c.request({ op: 'o' }, { label: 'other' });
    await expect(slow).rejects.toThrow('slow: timeout 20');
    ac.abort();
    await expect(aborted).rejects.toThrow('x: aborted');
    p.feed('{"id":"r3","value":"ok"}\n{"id":"r1","value":"late"}\n');
    await expect(other).resolves.toBe('ok');
  });

  it('rejects every pending request when the connection closes, and refuses new ones', async () => {
    const p = pipe();
    const c = new NdjsonConnection(p.sock, { adapter, maxLine: 1000 });
    let closedCalls = 0;
    c.onClose(() => closedCalls++);
    const reqs = [c.request({ op: '1' }, { label: 'one' }), c.request({ op: '2' }, { label: 'two' })];
    p.end();
    await c.closed;
    await expect(reqs[0]).rejects.toThrow('one: lost (connection closed)');
    await expect(reqs[1]).rejects.toThrow('two: lost (connection closed)');
    expect(c.isOpen).toBe(false);
    await expect(c.request({ op: '3' }, { label: 'three' })).rejects.toThrow('three: closed');
    expect(closedCalls).toBe(1);
  });

  it('ends the connection on a line over maxLine, and when a notification handler throws', async () => {
    const p = pipe();
    const c = new NdjsonConnection(p.sock, { adapter, maxLine: 10 });
    const r = c.request({ op: 'big' }, { label: 'big' });
    p.feed(`${'x'.repeat(20)}\n`);
    await expect(r).rejects.toThrow(/big: lost \(.*more than 10/);

    const q = pipe();
    const d = new NdjsonConnection(q.sock, {
      adapter,
      maxLine: 1000,
      onNotification: () => {
        throw new Error('handler bug');
      },
    });
    const s = d.request({ op: 's' }, { label: 's' });
    q.feed('{"event":"e"}\n');
    await expect(s).rejects.toThrow('s: lost (a message could not be handled: handler bug)');
  });
});
