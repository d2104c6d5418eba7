import { PassThrough } from 'node:stream';
import { expect, it } from 'vitest';
import { forwardStdin } from '../../src/cli/stdin-forward.js';
import { ExecInputs } from '../../src/daemon/handlers/exec-input.js';

/** The CLI's forwarding against the daemon's registry, joined by a fake client that calls it directly. */
function wired() {
  const inputs = new ExecInputs();
  const calls: string[] = [];
  const client = {
    call: async (method: string, p: { inputId: string; data?: string; end?: boolean }) => {
      calls.push(method);
      return { accepted: await inputs.feed(p.inputId, p.data === undefined ? undefined : Buffer.from(p.data, 'base64'), p.end ?? false) };
    },
  } as unknown as Parameters<typeof forwardStdin>[0];
  return { inputs, calls, client };
}

it('forwards every chunk in order, then the end', async () => {
  const { inputs, client } = wired();
  const remote = inputs.register('0123456789abcdef');
  const got: Buffer[] = [];
  remote.on('data', (c: Buffer) => got.push(c));
  const ended = new Promise((r) => remote.on('end', r));
  const stdin = new PassThrough();
  const f = forwardStdin(client, '0123456789abcdef', stdin);
  stdin.write('one ');
  stdin.end('two');
  await f.done;
  await ended;
  expect(Buffer.concat(got).toString()).toBe('one two');
});

it('stop() while stdin stays open and empty: done settles, nothing hangs (the CI case)', async () => {
  const { inputs, client, calls } = wired();
  inputs.register('0123456789abcdef');
  const stdin = new PassThrough();
  const f = forwardStdin(client, '0123456789abcdef', stdin);
  f.stop();
  await f.done;
  expect(stdin.destroyed).toBe(true);
  expect(calls).toEqual([]);
});
