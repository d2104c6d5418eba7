import { describe, expect, it } from 'vitest';
import { BangerError, NAME_RE, validateName } from '../../src/errors.js';

const accepted = ['a', 'Z', '7', 'vm-1', 'my_vm.2', 'debian-bookworm', 'A.b_c-d', 'x'.repeat(63), `a${'-'.repeat(62)}`];

// Each of these passes the character class somewhere inside: only the anchors (or the length bound) refuse it.
const refusedOnlyByAnchors = ['!abc', 'abc!', 'abc\n', '\nabc', 'ab\ncd', ' abc', 'abc ', '/abc', 'abc/', `${'x'.repeat(63)}!`];

const refused = [
  '',
  '-abc',
  '.abc',
  '_abc',
  'a..b',
  '..',
  'a b',
  'a/b',
  '../x',
  'x'.repeat(64),
  'é',
  'abc\u0000',
  'abc;rm -rf',
  '$(id)',
  ...refusedOnlyByAnchors,
];

describe.each(['vm', 'image'])('%s names', (what) => {
  it.each(accepted)('accepts %j', (name) => {
    expect(validateName(what, name)).toBe(name);
  });

  it.each(refused)('refuses %j with a usage error that names it and the rule', (name) => {
    let err: unknown;
    try {
      validateName(what, name);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(BangerError);
    const e = err as BangerError;
    expect(e.kind).toBe('usage');
    expect(e.exitCode).toBe(2);
    expect(e.message).toBe(`invalid ${what} name ${JSON.stringify(name)}`);
    expect(e.hint).toMatch(/1-63 characters/);
  });

  it('refuses a non-string', () => {
    expect(() => validateName(what, 42 as unknown as string)).toThrow(BangerError);
  });
});

describe('the name pattern itself', () => {
  it.each(refusedOnlyByAnchors)('does not match %j anywhere-but-whole', (name) => {
    expect(NAME_RE.test(name)).toBe(false);
  });
});
