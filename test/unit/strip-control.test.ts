import { describe, expect, it } from 'vitest';
import { stripControl } from '../../src/cli/output.js';

describe('stripControl', () => {
  it('keeps plain text, newlines and tabs', () => {
    expect(stripControl('a\tb\nc ü ✓\n')).toBe('a\tb\nc ü ✓\n');
  });

  it.each([
    ['colour (CSI SGR)', 'x\u001b[31mred\u001b[0my', 'xredy'],
    ['cursor movement and erase', 'ok\u001b[2J\u001b[1;1Hfake', 'okfake'],
    ['window title (OSC, BEL)', '\u001b]0;pwned\u0007after', 'after'],
    ['clipboard write (OSC 52, ST)', 'a\u001b]52;c;ZXZpbA==\u001b\\b', 'ab'],
    ['an unterminated OSC', 'a\u001b]0;forever', 'a'],
    ['DCS string', 'a\u001bP1$r0m\u001b\\b', 'ab'],
    ['8-bit CSI', 'a\u009b31mb', 'ab'],
    ['two-byte ESC (reset terminal)', 'a\u001bcb', 'ab'],
    ['charset switch', 'a\u001b(0b', 'ab'],
    ['bell, backspace, carriage return overwrite', 'safe\rEVIL\u0008\u0007', 'safeEVIL'],
    ['CRLF line ends', 'a\r\nb\r\n', 'a\nb\n'],
  ])('removes %s', (_what, input, want) => {
    expect(stripControl(input)).toBe(want);
  });

  it('leaves no ESC or C1 byte in anything', () => {
    let s = '';
    for (let i = 0; i < 0xa0; i++) s += `${String.fromCharCode(i)}[${String.fromCharCode(i)}]x`;
    // eslint-disable-next-line no-control-regex
    expect(stripControl(s)).not.toMatch(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/);
  });
});
