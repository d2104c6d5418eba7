/**
 * What `session attach` does with the bytes it reads: whole lines to send to the session (a pipe session reads
 * lines; a partial line sent alone would get a newline of its own), the detach sequence (Ctrl-] then d; Ctrl-]
 * twice sends one Ctrl-]), Ctrl-C, which detaches too, and, from a terminal in raw mode, a local echo with Enter
 * and Backspace (the terminal echoes nothing itself then). Pure: no I/O, so it is tested byte by byte.
 */
export const DETACH_KEY = 0x1d;
const CTRL_C = 0x03;
const BACKSPACE = [0x7f, 0x08];

export interface Fed {
  /** Complete lines, each with its newline, in order. */
  lines: Buffer[];
  /** Bytes to echo to the terminal (terminal mode only). */
  echo: number[];
  detach: boolean;
}

export class AttachInput {
  private pending: number[] = [];
  private armed = false;

  constructor(private readonly terminal: boolean) {}

  feed(chunk: Uint8Array): Fed {
    const fed: Fed = { lines: [], echo: [], detach: false };
    for (const byte of chunk) {
      if (this.armed) {
        this.armed = false;
        if (byte === 0x64 /* d */) return { ...fed, detach: true };
        this.add(DETACH_KEY, fed);
        if (byte === DETACH_KEY) continue;
      } else if (byte === DETACH_KEY) {
        this.armed = true;
        continue;
      }
      if (byte === CTRL_C) return { ...fed, detach: true };
      this.add(byte, fed);
    }
    return fed;
  }

  /** The partial line left at the end of input, if any (sent as a last line). */
  rest(): Buffer | undefined {
    if (!this.pending.length) return undefined;
    const b = Buffer.from(this.pending);
    this.pending = [];
    return b;
  }

  private add(byte: number, fed: Fed): void {
    if (this.terminal && BACKSPACE.includes(byte)) {
      if (this.pending.length) {
        this.pending.pop();
        fed.echo.push(0x08, 0x20, 0x08);
      }
      return;
    }
    const b = this.terminal && byte === 0x0d ? 0x0a : byte;
    this.pending.push(b);
    if (this.terminal) fed.echo.push(...(b === 0x0a ? [0x0d, 0x0a] : b >= 0x20 ? [b] : []));
    if (b === 0x0a) {
      fed.lines.push(Buffer.from(this.pending));
      this.pending = [];
    }
  }
}
