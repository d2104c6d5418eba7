/**
 * A guest's serial log: the guest writes what it likes there, so it is capped on disk and read from the tail,
 * never whole.
 *
 * The VMM appends to `serial.log` (QEMU `-chardev file,append=on`, Firecracker's stdout opened O_APPEND). The
 * daemon checks its size every few seconds while it boots or watches the VM; past `SERIAL_LOG_MAX` the last
 * `SERIAL_LOG_MAX` bytes are copied to `serial.log.1` and `serial.log` is truncated in place (the VMM keeps its
 * descriptor, and O_APPEND writes land at the new end). On disk: at most two files of SERIAL_LOG_MAX, plus what
 * the guest writes between two checks. A file, not QEMU's in-memory ring: it outlives a VMM that died during
 * boot (the post-mortem), and a restarted daemon finds it where it was.
 */
import { open, rename, stat, truncate, writeFile } from 'node:fs/promises';
import { sleep } from '../exec/wait.js';

/** The most of a serial log that is ever read back (`vm logs --serial`, boot errors). */
export const SERIAL_READ_MAX = 256 * 1024;

/** Size at which serial.log is rotated into serial.log.1. */
export const SERIAL_LOG_MAX = 1024 * 1024;

/** How often the daemon checks a running VM's serial log. */
export const SERIAL_CHECK_MS = 2000;

/** The rotated previous part of a serial log. */
export const rotatedPath = (path: string) => `${path}.1`;

/** The last `maxBytes` of one file (all of it when smaller); a missing file reads as empty. */
async function tailBytes(path: string, maxBytes: number): Promise<{ buf: Buffer; cut: boolean }> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { buf: Buffer.alloc(0), cut: false };
    throw e;
  }
  try {
    const { size } = await fh.stat();
    const start = Math.max(0, size - maxBytes);
    const buf = Buffer.alloc(size - start);
    const { bytesRead } = await fh.read(buf, 0, buf.length, start);
    return { buf: buf.subarray(0, bytesRead), cut: start > 0 };
  } finally {
    await fh.close();
  }
}

/**
 * The last `maxBytes` of a serial log as text, across its rotated part (`.1`) and the current file, starting at
 * a line boundary when it was cut (the first, partial line is dropped). A missing log reads as ''.
 */
export async function readTail(path: string, maxBytes = SERIAL_READ_MAX): Promise<{ text: string; truncated: boolean }> {
  const cur = await tailBytes(path, maxBytes);
  let buf = cur.buf;
  let cut = cur.cut;
  if (!cut && buf.length < maxBytes) {
    const old = await tailBytes(rotatedPath(path), maxBytes - buf.length);
    if (old.buf.length) buf = Buffer.concat([old.buf, buf]);
    cut = old.cut;
  }
  let text = buf.toString('utf8');
  if (cut) {
    const nl = text.indexOf('\n');
    text = nl === -1 ? '' : text.slice(nl + 1);
  }
  return { text, truncated: cut };
}

/**
 * Rotates `path` when it is over `maxBytes`: its last `maxBytes` go to `path.1` (written aside, then renamed),
 * then `path` is truncated to zero. What the guest writes between the copy and the truncation is lost (a few
 * bytes at most: the copy is one read). Returns whether it rotated.
 */
export async function rotateIfOver(path: string, maxBytes = SERIAL_LOG_MAX): Promise<boolean> {
  const size = await stat(path).then((s) => s.size, () => 0);
  if (size <= maxBytes) return false;
  const { buf } = await tailBytes(path, maxBytes);
  const tmp = `${rotatedPath(path)}.tmp`;
  await writeFile(tmp, buf, { mode: 0o600 });
  await rename(tmp, rotatedPath(path));
  await truncate(path, 0);
  return true;
}

/** Keeps `path` under its cap until `signal` aborts (the VM stopped or the daemon is going). Never throws. */
export async function capWhile(path: string, signal: AbortSignal, opts: { maxBytes?: number; everyMs?: number } = {}): Promise<void> {
  while (!signal.aborted) {
    await rotateIfOver(path, opts.maxBytes).catch(() => false);
    await sleep(opts.everyMs ?? SERIAL_CHECK_MS, signal).catch(() => undefined);
  }
}
