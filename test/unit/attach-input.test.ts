import { describe, expect, it } from 'vitest';
import { AttachInput } from '../../src/cli/attach-input.js';

const text = (bs: Buffer[]) => bs.map((b) => b.toString('latin1'));

describe('session attach input', () => {
  it('from a pipe: whole lines only, a line split across chunks goes once, the rest at the end', () => {
    const p = new AttachInput(false);
    expect(text(p.feed(Buffer.from('one\ntw')).lines)).toEqual(['one\n']);
    expect(text(p.feed(Buffer.from('o\nthree')).lines)).toEqual(['two\n']);
    expect(p.rest()?.toString()).toBe('three');
    expect(p.rest()).toBeUndefined();
  });

  it('Ctrl-] d detaches after the lines before it; Ctrl-] Ctrl-] is one Ctrl-]; Ctrl-C detaches', () => {
    const p = new AttachInput(false);
    const f = p.feed(Buffer.from('a\n\x1d\x1db\n\x1dd never\n'));
    expect(text(f.lines)).toEqual(['a\n', '\x1db\n']);
    expect(f.detach).toBe(true);
    const q = new AttachInput(false);
    expect(q.feed(Buffer.from('\x1d')).detach).toBe(false);
    expect(q.feed(Buffer.from('d')).detach).toBe(true);
    expect(new AttachInput(false).feed(Buffer.from('x\x03')).detach).toBe(true);
  });

  it('from a terminal: Enter ends a line, Backspace edits it, both echoed', () => {
    const p = new AttachInput(true);
    const f = p.feed(Buffer.from('hx\x7fi\r'));
    expect(text(f.lines)).toEqual(['hi\n']);
    expect(Buffer.from(f.echo).toString('latin1')).toBe('hx\b \bi\r\n');
  });
});
