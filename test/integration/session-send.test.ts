/**
 * The guest's send writer (WRITE_LINES, run by perl-base in the guest) against a real FIFO on this host: four
 * writers at once, 1,000 lines of 200-4,000 bytes, every line whole in what the reader got; and a FIFO nobody
 * reads fails at once instead of hanging.
 */
import { execa } from 'execa';
import { mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { WRITE_LINES } from '../../src/host/guest/sessions.js';
import { waitUntil } from '../support/wait.js';

const lineOf = (s: number, i: number) => {
  const len = 200 + ((s * 7919 + i * 104729) % 3801);
  const head = JSON.stringify({ s, i, pad: '' });
  return head.slice(0, -2) + 'x'.repeat(len - head.length) + '"}';
};

it('four concurrent writers: exactly 1,000 whole lines', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'banger-send-'));
  const fifo = join(dir, 'stdin');
  const out = join(dir, 'stdout');
  await execa('mkfifo', [fifo]);
  // The session's side: the program holds its stdin FIFO read-write, as run.sh arranges.
  const reader = execa('sh', ['-c', 'exec cat <>"$1" >"$2"', 'sh', fifo, out]);
  try {
    const payloads = [0, 1, 2, 3].map((s) => {
      const f = join(dir, `payload-${s}`);
      writeFileSync(f, Array.from({ length: 250 }, (_, i) => lineOf(s, i) + '\n').join(''));
      return f;
    });
    const total = payloads.reduce((n, f) => n + statSync(f).size, 0);
    await Promise.all(payloads.map((f) => execa('perl', ['-e', WRITE_LINES, dir, String(statSync(f).size)], { inputFile: f })));
    await waitUntil('the reader got every byte', () => statSync(out).size >= total, 20_000);
    const lines = readFileSync(out, 'utf8').split('\n');
    expect(lines.pop()).toBe('');
    expect(lines).toHaveLength(1000);
    const seen = new Set(lines.map((l) => {
      const o = JSON.parse(l) as { s: number; i: number };
      expect(l).toBe(lineOf(o.s, o.i));
      return `${o.s}/${o.i}`;
    }));
    expect(seen.size).toBe(1000);
  } finally {
    reader.kill();
    await reader.catch(() => {});
  }
});

it('a FIFO with no reader (an ended session) fails at once with the ended status', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'banger-send-'));
  await execa('mkfifo', [join(dir, 'stdin')]);
  const r = await execa('perl', ['-e', WRITE_LINES, dir, '2'], { input: 'x\n', reject: false, timeout: 10_000 });
  expect(r.exitCode).toBe(22);
});

it('names what it cannot send to: no such session (20), not a pipe session (21), an exit file (22)', async () => {
  const root = mkdtempSync(join(tmpdir(), 'banger-send-'));
  const send = (dir: string) => execa('perl', ['-e', WRITE_LINES, dir, '2'], { input: 'x\n', reject: false, timeout: 10_000 });
  expect((await send(join(root, 'absent'))).exitCode).toBe(20);
  writeFileSync(join(root, 'stdin'), '');
  expect((await send(root)).exitCode).toBe(21);
  const ended = mkdtempSync(join(tmpdir(), 'banger-send-'));
  await execa('mkfifo', [join(ended, 'stdin')]);
  writeFileSync(join(ended, 'exit'), 'x exited 0\n');
  expect((await send(ended)).exitCode).toBe(22);
});

it('an upload cut short writes nothing, naming how much arrived', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'banger-send-'));
  const fifo = join(dir, 'stdin');
  const out = join(dir, 'stdout');
  await execa('mkfifo', [fifo]);
  const reader = execa('sh', ['-c', 'exec cat <>"$1" >"$2"', 'sh', fifo, out]);
  try {
    const r = await execa('perl', ['-e', WRITE_LINES, dir, '100'], { input: 'only this\n', reject: false, timeout: 10_000 });
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr).toContain('arrived incomplete (10 of 100 bytes); nothing was written');
    const ok = await execa('perl', ['-e', WRITE_LINES, dir, '5'], { input: 'next\n', reject: false, timeout: 10_000 });
    expect(ok.exitCode).toBe(0);
    await waitUntil('the reader got the complete send', () => statSync(out).size >= 5, 10_000);
    expect(readFileSync(out, 'utf8')).toBe('next\n');
  } finally {
    reader.kill();
    await reader.catch(() => {});
  }
});
