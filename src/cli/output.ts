/** Human output: chalk when stdout is a TTY and NO_COLOR is unset; progress lines always go to stderr. */
import chalk, { Chalk } from 'chalk';
import type { ProgressParams } from '../rpc/protocol.js';

const colorOn = !process.env.NO_COLOR && !!process.stdout.isTTY;
export const c = colorOn ? new Chalk({ level: chalk.level || 1 }) : new Chalk({ level: 0 });
const ec = !process.env.NO_COLOR && !!process.stderr.isTTY ? new Chalk({ level: chalk.level || 1 }) : new Chalk({ level: 0 });

export function fmtMs(ms?: number): string {
  if (ms === undefined || ms === null) return '';
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)}s` : `${ms}ms`;
}

export function fmtBytes(n?: number | null): string {
  if (n === undefined || n === null) return '-';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < u.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v % 1 === 0 ? v : v.toFixed(1)}${u[i]}`;
}

/** Prints each stage as it finishes (and errors at once), with its duration, to stderr. */
export function progressPrinter(quiet = false): (p: ProgressParams) => void {
  let lastBytesAt = 0;
  return (p) => {
    if (quiet) return;
    if (p.status === 'start') {
      if (process.stderr.isTTY) process.stderr.write(ec.dim(`  … ${p.stage}${p.detail ? ` ${p.detail}` : ''}\n`));
      return;
    }
    if (p.bytes !== undefined && p.status === 'info') {
      const now = Date.now();
      if (now - lastBytesAt < 500) return;
      lastBytesAt = now;
      process.stderr.write(ec.dim(`  ↑ ${p.stage} ${fmtBytes(p.bytes)}\n`));
      return;
    }
    const mark = p.status === 'done' ? ec.green('✓') : p.status === 'error' ? ec.red('✗') : ec.blue('·');
    const detail = p.detail ? ` ${p.status === 'error' ? ec.red(p.detail.split('\n')[0]) : ec.dim(p.detail.split('\n')[0])}` : '';
    process.stderr.write(`  ${mark} ${p.stage}${p.ms !== undefined ? ` ${ec.bold(fmtMs(p.ms))}` : ''}${detail}\n`);
  };
}

export function stateColor(state: string): string {
  switch (state) {
    case 'running':
      return c.green(state);
    case 'failed':
      return c.red(state);
    case 'stopped':
      return c.yellow(state);
    default:
      return c.cyan(state);
  }
}

export function table(rows: string[][]): string {
  if (!rows.length) return '';
  // eslint-disable-next-line no-control-regex
  const strip = (s: string) => s.replace(/\u001b\[[0-9;]*m/g, '');
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => strip(r[i] ?? '').length)));
  return rows.map((r) => r.map((cell, i) => cell + ' '.repeat(Math.max(0, widths[i] - strip(cell).length))).join('  ').trimEnd()).join('\n');
}

/**
 * Guest text made safe for a terminal: escape sequences (CSI, OSC, DCS/PM/APC strings, two-byte ESC forms) and
 * other C0/C1 control characters are removed; newlines and tabs stay, CRLF becomes LF. A guest must not be able
 * to retitle the window, write to the clipboard (OSC 52), move the cursor over earlier output or hide text.
 */
export function stripControl(text: string): string {
  return (
    text
      // OSC / DCS / SOS / PM / APC strings, up to BEL or ST (or the end when unterminated)
      // eslint-disable-next-line no-control-regex
      .replace(/(?:\u001b[\]PX^_]|[\u0090\u0098\u009d\u009e\u009f])[\s\S]*?(?:\u0007|\u001b\\|\u009c|$)/g, '')
      // CSI sequences (7- and 8-bit)
      // eslint-disable-next-line no-control-regex
      .replace(/(?:\u001b\[|\u009b)[\u0030-\u003f]*[\u0020-\u002f]*[\u0040-\u007e]?/g, '')
      // other ESC sequences: ESC, intermediates, final byte
      // eslint-disable-next-line no-control-regex
      .replace(/\u001b[\u0020-\u002f]*[\u0030-\u007e]?/g, '')
      .replace(/\r\n/g, '\n')
      // remaining C0 controls (but \t and \n), DEL and C1 controls
      // eslint-disable-next-line no-control-regex
      .replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g, '')
  );
}
