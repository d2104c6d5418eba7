import { describe, expect, it } from 'vitest';
import { run } from '../../src/host/exec/runner.js';
import { quoteArg, shellQuote } from '../../src/host/exec/shell.js';

const hostile = [
  '',
  'plain',
  'two words',
  'a;rm -rf /',
  '$(touch /tmp/pwned)',
  '`id`',
  "it's",
  "''",
  '"double"',
  'back\\slash',
  'new\nline',
  '\t tab',
  '*',
  '~',
  '$HOME',
  '!event',
  '-n',
  'a\'b"c$d`e\\f',
  'ünïcödé ✓',
  '--',
  '&& echo hi || true | cat > x < y',
];

describe('shellQuote', () => {
  it('leaves plain words bare and single-quotes everything else', () => {
    expect(quoteArg('abc')).toBe('abc');
    expect(quoteArg('/a/b-c_d.e:f,g@h%i+j')).toBe('/a/b-c_d.e:f,g@h%i+j');
    expect(quoteArg('')).toBe("''");
    expect(quoteArg("it's")).toBe("'it'\\''s'");
    expect(quoteArg('a=b')).toBe("'a=b'");
    expect(quoteArg('~')).toBe("'~'");
    expect(shellQuote(['echo', 'a b', ''])).toBe("echo 'a b' ''");
    expect(shellQuote([])).toBe('');
  });

  it('refuses a NUL byte, which no shell word can carry', () => {
    expect(() => quoteArg('a\0b')).toThrow(/NUL/);
    expect(() => shellQuote(['ok', 'a\0b'])).toThrow(/NUL/);
  });

  it('keeps metacharacters inert', () => {
    for (const s of hostile) {
      const q = quoteArg(s);
      if (/^[A-Za-z0-9_@%+:,./-]+$/.test(s)) {
        expect(q).toBe(s);
        continue;
      }
      expect(q.startsWith("'") && q.endsWith("'")).toBe(true);
      // Outside of the '\'' escapes there is no unquoted character at all.
      expect(q.replace(/'\\''/g, '').slice(1, -1)).not.toContain("'");
    }
  });

  it('round-trips through a real POSIX shell, word for word', async () => {
    // printf repeats its format for each argument: each word comes back NUL-terminated.
    const script = `printf '%s\\0' ${shellQuote(hostile)}`;
    const r = await run('/bin/sh', ['-c', script], { timeoutMs: 10_000 });
    const words = r.stdout.split('\0');
    expect(words.pop()).toBe('');
    expect(words).toEqual(hostile);
  });

  it('never runs a command substitution', async () => {
    const r = await run('/bin/sh', ['-c', `echo ${shellQuote(['$(echo INJECTED)', '`echo INJECTED`', ';echo INJECTED'])}`], {
      timeoutMs: 10_000,
    });
    expect(r.stdout).toBe('$(echo INJECTED) `echo INJECTED` ;echo INJECTED\n');
  });
});
