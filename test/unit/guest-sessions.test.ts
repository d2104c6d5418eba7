import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { endOf, parseListLine, runScript, SESSIONS_DIR, splitLines, validateSessionName } from '../../src/host/guest/sessions.js';
import { execCommand } from '../../src/daemon/handlers/guest.js';
import { SendLock } from '../../src/daemon/handlers/sessions.js';
import { ExecInputs } from '../../src/daemon/handlers/exec-input.js';

describe('session names', () => {
  it.each(['a;b', 'a b', '$(x)', 'A', '-x', '', 'a'.repeat(33), 'a/b', "a'b", 'a\nb'])('refuses %j', (n) => {
    expect(() => validateSessionName(n)).toThrow(/invalid session name/);
  });
  it.each(['a', 'agent-1', 's_2', '0'])('accepts %j', (n) => expect(validateSessionName(n)).toBe(n));
});

describe('runScript', () => {
  it('runs argv, cwd and env with every metacharacter as one word each', () => {
    const root = mkdtempSync(join(tmpdir(), 'banger-run-'));
    const dir = join(root, 's1');
    const cwd = join(root, "it's $here");
    mkdirSync(dir);
    mkdirSync(cwd);
    const script = runScript({ name: 's1', pipe: false, argv: ['sh', '-c', 'pwd; printf "[%s]\\n" "$V" "$@"', 'x', 'a b', '$(id)', "'", '`x`;|&'], cwd, env: { V: 'v $HOME;`x`' }, startedAt: '' });
    execFileSync('sh', ['-c', script.replaceAll(`${SESSIONS_DIR}/s1`, dir)]);
    expect(readFileSync(join(dir, 'stdout'), 'utf8')).toBe(`${cwd}\n[v $HOME;\`x\`]\n[a b]\n[$(id)]\n[']\n[\`x\`;|&]\n`);
  });

  it('pipe mode opens the FIFO read-write (never EOF); plain mode reads /dev/null', () => {
    expect(runScript({ name: 'p', pipe: true, argv: ['cat'], startedAt: '' })).toContain(`<>${SESSIONS_DIR}/p/stdin`);
    expect(runScript({ name: 'p', pipe: false, argv: ['cat'], startedAt: '' })).toContain('</dev/null');
  });
});

describe('what the guest reports', () => {
  it('reads the exit file: status, signal, or still running', () => {
    expect(endOf('exit-code exited 3', 'failed')).toEqual({ reason: 'exited with status 3', code: 3 });
    expect(endOf('success exited 0', 'inactive')).toEqual({ reason: 'exited with status 0', code: 0 });
    expect(endOf('signal killed KILL', 'failed')).toEqual({ reason: 'killed by signal KILL', code: null });
    expect(endOf('', 'active')).toBeUndefined();
    expect(endOf('', 'inactive')?.reason).toContain('left no exit status');
  });

  it('parses a list line', () => {
    const meta = JSON.stringify({ pipe: true, argv: ['cat', 'a\tb'], cwd: null, startedAt: '2026-01-01T00:00:00Z' });
    expect(parseListLine(`echo\tactive\t\t12\t0\t${meta}`)).toMatchObject({ name: 'echo', state: 'running', pipe: true, argv: ['cat', 'a\tb'], stdoutBytes: 12, endReason: null });
  });
});

describe('send payloads', () => {
  it('counts lines, finds the longest and ends the payload with a newline', () => {
    const r = splitLines(Buffer.from('ab\ncdef\ng'));
    expect(r).toMatchObject({ lines: 3, longest: 5 });
    expect(r.normalised.toString()).toBe('ab\ncdef\ng\n');
    expect(splitLines(Buffer.from('x\n')).normalised.toString()).toBe('x\n');
  });

  it('the send lock shares small payloads and gives a long-line payload the session alone', async () => {
    const lock = new SendLock();
    const log: string[] = [];
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const a = lock.run(false, async () => {
      log.push('a+');
      await gate;
      log.push('a-');
    });
    const b = lock.run(false, async () => void log.push('b'));
    const big = lock.run(true, async () => void log.push('big'));
    await b;
    expect(log).toEqual(['a+', 'b']);
    release();
    await Promise.all([a, big]);
    expect(log).toEqual(['a+', 'b', 'a-', 'big']);
  });
});

describe('vm exec command line', () => {
  it('quotes cwd, env and argv so a shell runs exactly them', () => {
    const root = mkdtempSync(join(tmpdir(), "banger-exec- '"));
    const out = execFileSync('sh', ['-c', execCommand(['sh', '-c', 'pwd; echo "$K"; echo "$1"', 'x', '; rm -rf /'], root, { K: '$(id) `x`' })]).toString();
    expect(out).toBe(`${root}\n$(id) \`x\`\n; rm -rf /\n`);
  });

  it('a timeout runs argv under timeout(1): the command is stopped with status 124, a quick one is untouched', () => {
    const run = (argv: string[], ms: number) => spawnSync('sh', ['-c', execCommand(argv, undefined, undefined, ms)]);
    const slow = run(['sleep', '30'], 300);
    expect(slow.status).toBe(124);
    const quick = run(['sh', '-c', 'echo "$1"; exit 3', 'x', '-k'], 10_000);
    expect(quick.stdout.toString()).toBe('-k\n');
    expect(quick.status).toBe(3);
  });
});

describe('vm exec stdin, fed chunk by chunk', () => {
  it('passes chunks and the end to the exec that registered the id, and nothing to an id that is gone', async () => {
    const inputs = new ExecInputs();
    const stdin = inputs.register('abcdefghijklmnop');
    const got: Buffer[] = [];
    stdin.on('data', (c: Buffer) => got.push(c));
    const ended = new Promise((r) => stdin.on('end', r));
    expect(await inputs.feed('abcdefghijklmnop', Buffer.from('one '), false)).toBe(true);
    expect(await inputs.feed('abcdefghijklmnop', Buffer.from('two'), true)).toBe(true);
    await ended;
    expect(Buffer.concat(got).toString()).toBe('one two');
    inputs.release('abcdefghijklmnop');
    expect(await inputs.feed('abcdefghijklmnop', Buffer.from('late'), false)).toBe(false);
    expect(inputs.size).toBe(0);
  });

  it('a chunk is answered only once the stream has room for it (flow control)', async () => {
    const inputs = new ExecInputs();
    const stdin = inputs.register('abcdefghijklmnop');
    let answered = false;
    const big = inputs.feed('abcdefghijklmnop', Buffer.alloc(1024 * 1024), false).then((ok) => (answered = ok));
    await new Promise((r) => setTimeout(r, 50));
    expect(answered).toBe(false);
    stdin.resume();
    await big;
    expect(answered).toBe(true);
  });
});
