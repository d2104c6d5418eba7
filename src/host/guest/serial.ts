/**
 * Reading a guest's serial log: the guest writes what it likes there, so it is read from the tail and never whole.
 */
import { open } from 'node:fs/promises';

/** The most of a serial log that is ever read back (`vm logs --serial`, boot errors). */
export const SERIAL_READ_MAX = 256 * 1024;

/**
 * The last `maxBytes` of a file as text, starting at a line boundary when it was cut (the first, partial line is
 * dropped). A missing file reads as ''.
 */
export async function readTail(path: string, maxBytes = SERIAL_READ_MAX): Promise<{ text: string; truncated: boolean }> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { text: '', truncated: false };
    throw e;
  }
  try {
    const { size } = await fh.stat();
    const start = Math.max(0, size - maxBytes);
    const buf = Buffer.alloc(size - start);
    const { bytesRead } = await fh.read(buf, 0, buf.length, start);
    let text = buf.subarray(0, bytesRead).toString('utf8');
    if (start > 0) {
      const nl = text.indexOf('\n');
      text = nl === -1 ? '' : text.slice(nl + 1);
    }
    return { text, truncated: start > 0 };
  } finally {
    await fh.close();
  }
}
