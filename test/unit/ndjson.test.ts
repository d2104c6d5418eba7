import { StringDecoder } from 'node:string_decoder';
import { describe, expect, it } from 'vitest';
import { LineDecoder } from '../../src/rpc/ndjson.js';

/** Feed `text` to a decoder in pieces cut at the given offsets; collect every line it completes. */
function feed(decoder: LineDecoder, text: string, cuts: number[]): string[] {
  const out: string[] = [];
  let start = 0;
  for (const cut of [...cuts, text.length]) {
    out.push(...decoder.push(text.slice(start, cut)));
    start = cut;
  }
  return out;
}

/** A small seeded PRNG (mulberry32): the same cuts on every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('LineDecoder', () => {
  it('gives back whole lines whatever the chunk boundaries', () => {
    const lines = ['{"id":1}', '', 'héllo wörld ✓ 🚀', 'x'.repeat(5000), '{"a":[1,2,3]}'];
    const text = `${lines.join('\n')}\n`;
    const rand = prng(42);
    for (let round = 0; round < 200; round++) {
      const cuts = Array.from({ length: Math.floor(rand() * 20) }, () => Math.floor(rand() * text.length)).sort((a, b) => a - b);
      expect(feed(new LineDecoder(), text, cuts), `cuts ${cuts.join(',')}`).toEqual(lines);
    }
    // every single-character chunk
    expect(feed(new LineDecoder(), text, Array.from({ length: text.length }, (_, i) => i))).toEqual(lines);
  });

  it('keeps a partial line until its newline arrives, and never returns it early', () => {
    const d = new LineDecoder();
    expect(d.push('{"id"')).toEqual([]);
    expect(d.push(':1')).toEqual([]);
    expect(d.push('}\n{"id":2')).toEqual(['{"id":1}']);
    expect(d.push('}\n\n')).toEqual(['{"id":2}', '']);
  });

  it('works on strings: a multibyte character split across byte chunks is joined by the string decoder before it', () => {
    const bytes = Buffer.from('a🚀é\nb\n', 'utf8');
    const utf8 = new StringDecoder('utf8');
    const d = new LineDecoder();
    const out: string[] = [];
    // cut inside the 4-byte rocket and inside the 2-byte é
    for (const [s, e] of [[0, 2], [2, 4], [4, 6], [6, bytes.length]]) out.push(...d.push(utf8.write(bytes.subarray(s, e))));
    expect(out).toEqual(['a🚀é', 'b']);
  });

  it('drops a line over maxLine whole, reports it once, and delivers the lines after it', () => {
    const overflows: number[] = [];
    const d = new LineDecoder({ maxLine: 10, onOverflow: (n) => overflows.push(n) });
    // the long line arrives in many chunks: reported once, as soon as it is too long
    expect(d.push('short\n0123456')).toEqual(['short']);
    expect(overflows).toEqual([]);
    expect(d.push('789abcdef')).toEqual([]);
    expect(overflows).toHaveLength(1);
    expect(d.push('more and more of the same line')).toEqual([]);
    expect(d.push('…still')).toEqual([]);
    expect(overflows).toHaveLength(1);
    expect(d.push(' the end\nnext\n')).toEqual(['next']);
    // a long line within one chunk
    expect(d.push(`${'y'.repeat(11)}\nafter\n`)).toEqual(['after']);
    expect(overflows).toHaveLength(2);
    // exactly maxLine is accepted
    expect(d.push(`${'z'.repeat(10)}\n`)).toEqual(['z'.repeat(10)]);
    expect(overflows).toHaveLength(2);
  });

  it('handles an over-long line that ends exactly at a chunk boundary', () => {
    const overflows: number[] = [];
    const d = new LineDecoder({ maxLine: 4, onOverflow: (n) => overflows.push(n) });
    expect(d.push('abcdefgh')).toEqual([]);
    expect(d.push('\n')).toEqual([]);
    expect(d.push('ok\n')).toEqual(['ok']);
    expect(overflows).toEqual([8]);
  });

  // No duration is asserted (that is the benchmark's job); the timeout fails quadratic concatenation, which takes
  // tens of seconds for this much.
  it('is linear: 32 MiB in 64 KiB chunks as one line', { timeout: 10_000 }, () => {
    const chunk = 'a'.repeat(64 * 1024);
    const d = new LineDecoder();
    for (let i = 0; i < 512; i++) expect(d.push(chunk)).toEqual([]);
    const [line] = d.push('\n');
    expect(line!.length).toBe(512 * chunk.length);
  });
});
