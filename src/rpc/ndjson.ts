/**
 * Newline-delimited framing, linear in what it reads: each chunk is scanned once for newlines and a partial
 * line is kept as a list of pieces joined only when its newline arrives (never `buf += chunk; buf.slice()`,
 * which copies the whole buffer per chunk and turns a 32 MB answer into a minute of CPU).
 *
 * Used by every reader of JSON lines: the daemon's RPC server and client, the root helper's server and
 * client, and QEMU's QMP client.
 */

export interface LineDecoderOptions {
  /** The longest line accepted, in characters. A longer line is dropped whole and reported to onOverflow. */
  maxLine?: number;
  /** Called once per dropped line, as soon as it exceeds maxLine (its rest is then skipped up to its newline). */
  onOverflow?: (length: number) => void;
}

export class LineDecoder {
  private parts: string[] = [];
  private size = 0;
  private discarding = false;
  private readonly maxLine: number;

  constructor(private readonly opts: LineDecoderOptions = {}) {
    this.maxLine = opts.maxLine ?? Number.POSITIVE_INFINITY;
  }

  /** Feed a chunk (already decoded, e.g. by `socket.setEncoding('utf8')`); returns the lines it completed. */
  push(chunk: string): string[] {
    const lines: string[] = [];
    let start = 0;
    for (let nl = chunk.indexOf('\n'); nl >= 0; nl = chunk.indexOf('\n', start)) {
      const line = this.take(chunk.slice(start, nl));
      if (line !== undefined) lines.push(line);
      start = nl + 1;
    }
    if (start < chunk.length) this.keep(chunk.slice(start));
    return lines;
  }

  /** The end of a line: the whole line, or undefined when it was too long (already reported). */
  private take(piece: string): string | undefined {
    if (this.discarding) {
      this.discarding = false;
      return undefined;
    }
    const length = this.size + piece.length;
    const parts = this.parts;
    this.parts = [];
    this.size = 0;
    if (length > this.maxLine) {
      this.opts.onOverflow?.(length);
      return undefined;
    }
    if (!parts.length) return piece;
    parts.push(piece);
    return parts.join('');
  }

  private keep(piece: string): void {
    if (this.discarding) return;
    this.parts.push(piece);
    this.size += piece.length;
    if (this.size > this.maxLine) {
      this.opts.onOverflow?.(this.size);
      this.parts = [];
      this.size = 0;
      this.discarding = true;
    }
  }
}
