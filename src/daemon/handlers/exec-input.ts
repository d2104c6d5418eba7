/**
 * The stdin of running `vm exec`s, fed chunk by chunk by vm.exec.input calls. The client streams its stdin as it
 * comes instead of reading it all first, so a command that never reads stdin (or exits before its end) finishes
 * at once even when the client's stdin stays open — an open pipe with nothing in it, as under CI. Each chunk is
 * answered once the stream has taken it, so a fast client waits on a slow guest (flow control).
 */
import { PassThrough, type Readable } from 'node:stream';

export class ExecInputs {
  private readonly open = new Map<string, PassThrough>();

  /** The stdin stream of the exec that registered `id`. Register before the first await: the chunks follow at once. */
  register(id: string): Readable {
    this.open.get(id)?.destroy();
    const s = new PassThrough({ highWaterMark: 256 * 1024 });
    this.open.set(id, s);
    return s;
  }

  /** Forget `id` (its exec finished): later chunks are answered not accepted. */
  release(id: string): void {
    const s = this.open.get(id);
    this.open.delete(id);
    s?.destroy();
  }

  /** Adds a chunk and/or the end; false when no exec is waiting for input under `id`. */
  async feed(id: string, data: Buffer | undefined, end: boolean): Promise<boolean> {
    const s = this.open.get(id);
    if (!s || s.destroyed) return false;
    if (data?.length && !s.write(data)) await drained(s);
    if (end) s.end();
    return this.open.get(id) === s;
  }

  get size(): number {
    return this.open.size;
  }
}

function drained(s: PassThrough): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      s.off('drain', done);
      s.off('close', done);
      resolve();
    };
    s.on('drain', done);
    s.on('close', done);
  });
}
