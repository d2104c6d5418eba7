/**
 * `vm exec`'s stdin, forwarded as it comes (vm.exec.input on the exec's own connection), never read whole first:
 * a command that does not read stdin finishes at once even when this process's stdin stays open with nothing in
 * it (an open pipe, as under CI; a terminal). One chunk at a time: the next is read once the daemon took the last.
 */
import { randomBytes } from 'node:crypto';
import type { Readable } from 'node:stream';
import type { BangerClient } from '../index.js';

export const newInputId = () => randomBytes(16).toString('base64url');

export interface Forwarding {
  /** Stop reading (the exec finished): stdin is released so this process can exit. */
  stop(): void;
  /** Settles when all of stdin was forwarded, or forwarding stopped or failed (then with the error). */
  done: Promise<void>;
}

export function forwardStdin(client: Pick<BangerClient, 'call'>, inputId: string, input: Readable = process.stdin): Forwarding {
  let stopped = false;
  const done = (async () => {
    for await (const chunk of input) {
      if (stopped) break;
      const r = await client.call('vm.exec.input', { inputId, data: (chunk as Buffer).toString('base64') });
      if (!r.accepted || stopped) break;
    }
    if (!stopped) await client.call('vm.exec.input', { inputId, end: true });
  })();
  return {
    stop() {
      stopped = true;
      input.destroy();
    },
    // The exec's own answer says how it ended; a forwarding error after it stopped matters to no one.
    done: done.catch((e) => {
      if (!stopped) throw e;
    }),
  };
}
