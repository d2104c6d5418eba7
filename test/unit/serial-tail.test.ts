import { appendFileSync, closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { capWhile, readTail, rotatedPath, rotateIfOver } from '../../src/host/guest/serial.js';

const dir = mkdtempSync(join(tmpdir(), 'bg-serial-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('readTail', () => {
  it('reads a small log whole', async () => {
    writeFileSync(join(dir, 'small'), 'one\ntwo\n');
    expect(await readTail(join(dir, 'small'), 1024)).toEqual({ text: 'one\ntwo\n', truncated: false });
  });

  it('reads only the last bytes of a big log, from a line start', async () => {
    const lines = Array.from({ length: 10_000 }, (_, i) => `line ${i}`);
    writeFileSync(join(dir, 'big'), `${lines.join('\n')}\n`);
    const { text, truncated } = await readTail(join(dir, 'big'), 100);
    expect(truncated).toBe(true);
    expect(Buffer.byteLength(text)).toBeLessThanOrEqual(100);
    expect(text.endsWith('line 9999\n')).toBe(true);
    expect(text.split('\n')[0]).toMatch(/^line \d+$/);
  });

  it('reads a missing log as empty', async () => {
    expect(await readTail(join(dir, 'nope'))).toEqual({ text: '', truncated: false });
  });
});

describe('serial log cap', () => {
  it('rotates a log over the cap: the tail goes to .1, the log starts empty, and readTail spans both', async () => {
    const log = join(dir, 'rot.log');
    const lines = Array.from({ length: 2000 }, (_, i) => `old ${i}`);
    writeFileSync(log, `${lines.join('\n')}\n`);
    expect(await rotateIfOver(log, 4096)).toBe(true);
    expect(statSync(log).size).toBe(0);
    expect(statSync(rotatedPath(log)).size).toBe(4096);
    appendFileSync(log, 'new 1\nnew 2\n');
    const { text, truncated } = await readTail(log, 1000);
    expect(truncated).toBe(true);
    expect(text.endsWith('old 1999\nnew 1\nnew 2\n')).toBe(true);
    expect(text.split('\n')[0]).toMatch(/^old \d+$/);
    expect(Buffer.byteLength(text)).toBeLessThanOrEqual(1000);
  });

  it('leaves a log under the cap alone', async () => {
    const log = join(dir, 'small.log');
    writeFileSync(log, 'hello\n');
    expect(await rotateIfOver(log, 4096)).toBe(false);
    expect(readFileSync(log, 'utf8')).toBe('hello\n');
    expect(existsSync(rotatedPath(log))).toBe(false);
  });

  it('a writer appending all along never makes the log outgrow the cap by more than one check', async () => {
    const log = join(dir, 'busy.log');
    writeFileSync(log, '');
    const fd = openSync(log, 'a');
    const ac = new AbortController();
    const capper = capWhile(log, ac.signal, { maxBytes: 64 * 1024, everyMs: 5 });
    try {
      for (let i = 0; i < 200; i++) {
        writeSync(fd, `${'x'.repeat(1023)}\n`);
        if (i % 20 === 0) await new Promise((r) => setTimeout(r, 15));
      }
      await new Promise((r) => setTimeout(r, 50));
    } finally {
      ac.abort();
      await capper;
      closeSync(fd);
    }
    // 200 KiB written through one O_APPEND descriptor: the capper rotated it, so neither file holds it all
    expect(statSync(log).size + statSync(rotatedPath(log)).size).toBeLessThan(200 * 1024);
    expect(statSync(rotatedPath(log)).size).toBeLessThanOrEqual(64 * 1024);
    expect((await readTail(log, 4096)).text.endsWith(`${'x'.repeat(1023)}\n`)).toBe(true);
  });
});
