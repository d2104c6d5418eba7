import { describe, expect, it } from 'vitest';
import { run } from '../../src/host/exec/runner.js';
import { shellQuote, shellQuoteArg } from '../../src/host/guest/ssh.js';

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
  it('single-quotes every argument', () => {
    expect(shellQuoteArg('abc')).toBe("'abc'");
    expect(shellQuoteArg('')).toBe("''");
    expect(shellQuoteArg("it's")).toBe("'it'\\''s'");
    expect(shellQuote(['echo', 'a b', ''])).toBe("'echo' 'a b' ''");
    expect(shellQuote([])).toBe('');
  });

  it('keeps metacharacters inert', () => {
    for (const s of hostile) {
      const q = shellQuoteArg(s);
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
