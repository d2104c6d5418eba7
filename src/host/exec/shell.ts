/**
 * POSIX shell quoting for command strings that run in the guest (through SSH, a remote POSIX shell runs them).
 * Every value that reaches a guest command goes through here: a value is wrapped in single quotes, and each
 * single quote inside it becomes '\'' — nothing is special inside single quotes, so the result is one word.
 */

/**
 * Quote one value as a single POSIX shell word. NUL cannot be carried by any shell word: it is refused.
 * Plain words (letters, digits, _ @ % + : , . / -) are left bare; '=' is not among them (a bare first word
 * `a=b` would be an assignment), nor '~' (tilde expansion).
 */
export function quoteArg(value: string): string {
  if (value.includes('\0')) throw new TypeError('a shell argument cannot contain a NUL byte');
  if (value !== '' && /^[A-Za-z0-9_@%+:,./-]+$/.test(value)) return value;
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

/** Quote an argv as a POSIX shell command line: each element becomes exactly one word. */
export function shellQuote(argv: readonly string[]): string {
  return argv.map(quoteArg).join(' ');
}
