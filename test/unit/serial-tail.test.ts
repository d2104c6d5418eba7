import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { readTail } from '../../src/host/guest/serial.js';

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
