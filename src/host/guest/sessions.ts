/**
 * Sessions that live in the guest: each is a transient systemd unit `banger-session-<name>` whose files sit in
 * /run/banger/sessions/<name>/ (meta.json, run.sh, stdout, stderr, the stdin FIFO in pipe mode, exit). They
 * survive a daemon restart because nothing of them lives in the daemon. Every command here is a fixed script;
 * what a user gives (name, argv, cwd, env) reaches the guest as quoted words (src/host/exec/shell.ts) or as a
 * file's content, never spliced into a script unquoted. Names are checked against SESSION_NAME first.
 */
import { BangerError } from '../../errors.js';
import { SESSION_NAME } from '../../rpc/protocol.js';
import type { SessionView } from '../../rpc/types.js';
import { quoteArg, shellQuote } from '../exec/shell.js';

export const SESSIONS_DIR = '/run/banger/sessions';
/** Linux's PIPE_BUF: a write of at most this many bytes into a FIFO is never interleaved with another. */
export const PIPE_BUF = 4096;

/** What running one command in the guest gives back (src/host/guest/ssh.ts exec). */
export interface GuestResult {
  exitCode: number;
  stdout: Buffer;
  stderr: Buffer;
}
export type GuestRun = (command: string, opts?: { stdin?: Buffer | string; timeoutMs?: number }) => Promise<GuestResult>;

export function validateSessionName(name: string): string {
  if (!SESSION_NAME.test(name))
    throw new BangerError('usage', `invalid session name ${JSON.stringify(name)}: 1-32 characters of a-z 0-9 _ - starting with a letter or digit (no shell metacharacters)`, 'e.g. --name agent-1');
  return name;
}

export const unitOf = (name: string) => `banger-session-${validateSessionName(name)}`;

const sh = (script: string, ...args: string[]) => shellQuote(['sh', '-c', script, 'sh', ...args]);

export interface SessionSpec {
  name: string;
  pipe: boolean;
  argv: string[];
  cwd?: string;
  env?: Record<string, string>;
  startedAt: string;
}

/** The script the unit runs: cd, environment, then exec the program with its stdio on the session's files. */
export function runScript(spec: SessionSpec): string {
  const dir = `${SESSIONS_DIR}/${validateSessionName(spec.name)}`;
  const lines = ['export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'];
  if (spec.cwd) lines.push(`cd -- ${quoteArg(spec.cwd)} || exit 126`);
  for (const [k, v] of Object.entries(spec.env ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) throw new BangerError('usage', `invalid environment name ${JSON.stringify(k)}`, 'names are letters, digits and _');
    lines.push(`export ${quoteArg(`${k}=${v}`)}`);
  }
  // `<>` opens the FIFO read-write: the program itself holds a writer, so it never reads EOF between sends.
  const stdin = spec.pipe ? `<>${dir}/stdin` : '</dev/null';
  lines.push(`exec ${shellQuote(spec.argv)} ${stdin} >>${dir}/stdout 2>>${dir}/stderr`);
  return lines.join('\n') + '\n';
}

// $1 name, $2 meta JSON, $3 pipe|plain, $4 cwd or ''; run.sh arrives on stdin. Exit 17: the name exists.
const START = `set -e
d=${SESSIONS_DIR}/$1
if [ -n "$4" ] && [ ! -d "$4" ]; then echo "no such directory in the guest: $4" >&2; exit 20; fi
mkdir -p ${SESSIONS_DIR}
mkdir "$d" 2>/dev/null || exit 17
trap 'rm -rf "$d"' EXIT
cat > "$d/run.sh"
printf '%s\\n' "$2" > "$d/meta.json"
printf '%s\\n' 'd=$(dirname "$0"); echo "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS" > "$d/exit.tmp"; mv "$d/exit.tmp" "$d/exit"' > "$d/on-exit.sh"
: > "$d/stdout"; : > "$d/stderr"
if [ "$3" = pipe ]; then mkfifo -m 600 "$d/stdin"; fi
systemd-run --quiet --unit="banger-session-$1" --property=ExecStopPost="/bin/sh $d/on-exit.sh" --property=KillMode=control-group /bin/sh "$d/run.sh"
trap - EXIT`;

export async function startSession(run: GuestRun, spec: SessionSpec): Promise<void> {
  const meta = JSON.stringify({ pipe: spec.pipe, argv: spec.argv, cwd: spec.cwd ?? null, startedAt: spec.startedAt });
  const r = await run(sh(START, validateSessionName(spec.name), meta, spec.pipe ? 'pipe' : 'plain', spec.cwd ?? ''), { stdin: runScript(spec) });
  if (r.exitCode === 17) throw new BangerError('conflict', `a session named ${spec.name} already exists in this VM`, 'pick another --name, or omit it for a generated one');
  if (r.exitCode === 20) throw new BangerError('usage', `--cwd ${spec.cwd}: no such directory in the guest`, 'give a directory that exists in the VM');
  if (r.exitCode !== 0) throw new BangerError('host', `starting session ${spec.name} failed (status ${r.exitCode}): ${r.stderr.toString().trim()}`);
}

// One line per session: name, ActiveState, exit file, stdout size, stderr size, meta.json. $1: one name or ''.
const LIST = `cd ${SESSIONS_DIR} 2>/dev/null || exit 0
for n in \${1:-*}; do
  [ -f "$n/meta.json" ] || continue
  s=$(systemctl show -p ActiveState --value "banger-session-$n" 2>/dev/null)
  printf '%s\\t%s\\t%s\\t%s\\t%s\\t' "$n" "\${s:-unknown}" "$(cat "$n/exit" 2>/dev/null)" "$(stat -c %s "$n/stdout")" "$(stat -c %s "$n/stderr")"
  tr -d '\\n' < "$n/meta.json"; echo
done`;

export type GuestSession = Omit<SessionView, 'attachedBy'>;

export async function listSessions(run: GuestRun, name?: string): Promise<GuestSession[]> {
  const r = await run(sh(LIST, name === undefined ? '' : validateSessionName(name)));
  if (r.exitCode !== 0) throw new BangerError('host', `listing the guest's sessions failed (status ${r.exitCode}): ${r.stderr.toString().trim()}`);
  return r.stdout.toString('utf8').split('\n').filter(Boolean).map(parseListLine);
}

export function parseListLine(line: string): GuestSession {
  const [name, active, exit, out, err, ...metaParts] = line.split('\t');
  const meta = JSON.parse(metaParts.join('\t')) as { pipe: boolean; argv: string[]; cwd: string | null; startedAt: string };
  const ended = endOf(exit, active);
  return {
    name,
    unit: `banger-session-${name}`,
    pipe: meta.pipe,
    argv: meta.argv,
    cwd: meta.cwd,
    startedAt: meta.startedAt,
    state: ended ? 'ended' : 'running',
    endReason: ended?.reason ?? null,
    exitCode: ended?.code ?? null,
    stdoutBytes: Number(out),
    stderrBytes: Number(err),
  };
}

/** The exit file (`$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS`) or the unit's state, as an end; undefined while it runs. */
export function endOf(exitLine: string, activeState: string): { reason: string; code: number | null } | undefined {
  const [, how, status] = exitLine.trim().split(/\s+/);
  if (how === 'exited') return { reason: `exited with status ${status}`, code: Number(status) };
  if (how === 'killed' || how === 'dumped') return { reason: `killed by signal ${status}${how === 'dumped' ? ' (core dumped)' : ''}`, code: null };
  if (exitLine.trim()) return { reason: `ended (${exitLine.trim()})`, code: null };
  if (activeState === 'active' || activeState === 'activating' || activeState === 'deactivating') return undefined;
  return { reason: `its unit is ${activeState} and left no exit status`, code: null };
}

export async function killSession(run: GuestRun, name: string, signal: string): Promise<void> {
  const r = await run(shellQuote(['systemctl', 'kill', `--signal=${signal}`, unitOf(name)]));
  if (r.exitCode !== 0) throw new BangerError('host', `signalling session ${name} failed: ${r.stderr.toString().trim()}`);
}

// One perl process does the whole send: it checks the session ($1, its directory), reads the payload off stdin
// and writes nothing unless all $2 bytes arrived (a broken upload writes nothing), then writes each line with one
// write(2): a line of at most PIPE_BUF bytes lands whole in the FIFO whatever other writers do. The FIFO is opened
// non-blocking so an ended session (no reader) fails at once instead of hanging; writes then block.
// Exit 20: no such session; 21: not in pipe mode; 22: ended (its exit file, or nobody reads its stdin).
export const WRITE_LINES = `use Fcntl; my ($d, $n) = @ARGV;
-d $d or exit 20; -e "$d/exit" and exit 22; -p "$d/stdin" or exit 21;
my $b = ''; while (sysread(STDIN, $b, 65536, length $b)) {}
length($b) == $n or die "the payload arrived incomplete (" . length($b) . " of $n bytes); nothing was written\n";
sysopen(my $f, "$d/stdin", O_WRONLY | O_NONBLOCK) or exit 22;
fcntl($f, F_SETFL, fcntl($f, F_GETFL, 0) & ~O_NONBLOCK) or die "fcntl: $!\n";
for my $l (split /(?<=\n)/, $b) { my $o = 0; while ($o < length $l) { my $w = syswrite($f, $l, length($l) - $o, $o); die "write: $!\n" unless defined $w; $o += $w } }`;

/** Why a send found nothing to write to; the caller turns it into the error that names the session's state. */
export type Unsendable = 'unknown' | 'not-pipe' | 'ended';
const UNSENDABLE: Record<number, Unsendable> = { 20: 'unknown', 21: 'not-pipe', 22: 'ended' };

/** One guest command per send: no listing first (the checks run in the same process that writes). */
export async function sendToSession(run: GuestRun, name: string, payload: Buffer): Promise<Unsendable | undefined> {
  const dir = `${SESSIONS_DIR}/${validateSessionName(name)}`;
  const r = await run(shellQuote(['perl', '-e', WRITE_LINES, dir, String(payload.length)]), { stdin: payload });
  if (r.exitCode in UNSENDABLE) return UNSENDABLE[r.exitCode];
  if (r.exitCode !== 0) throw new BangerError('host', `sending to session ${name} failed: ${r.stderr.toString().trim() || `status ${r.exitCode}`}`);
  return undefined;
}

/** Up to `max` bytes of a session's stdout or stderr from `offset`. */
export async function readSessionFile(run: GuestRun, name: string, which: 'stdout' | 'stderr', offset: number, max = 4 * 1024 * 1024): Promise<Buffer> {
  const file = `${SESSIONS_DIR}/${validateSessionName(name)}/${which}`;
  const r = await run(sh('tail -c +"$(($2 + 1))" "$1" | head -c "$3"', file, String(offset), String(max)));
  if (r.exitCode !== 0) throw new BangerError('host', `reading the ${which} of session ${name} failed: ${r.stderr.toString().trim()}`);
  return r.stdout;
}

/** Lines (each with its newline) of a payload, and the longest. A payload without a final newline gets one. */
export function splitLines(payload: Buffer): { lines: number; longest: number; normalised: Buffer } {
  const normalised = payload.length && payload[payload.length - 1] !== 0x0a ? Buffer.concat([payload, Buffer.from('\n')]) : payload;
  let lines = 0;
  let longest = 0;
  let start = 0;
  for (let i = normalised.indexOf(0x0a); i >= 0; i = normalised.indexOf(0x0a, i + 1)) {
    lines++;
    longest = Math.max(longest, i + 1 - start);
    start = i + 1;
  }
  return { lines, longest, normalised };
}

// $1 dir, $2 stdout offset, $3 stderr offset, $4 max bytes per stream. Header `ENDED OUTLEN ERRLEN`, then exactly
// OUTLEN bytes of stdout and ERRLEN of stderr. The end is checked before the sizes: once ended, nothing follows.
const POLL = `cd "$1" 2>/dev/null || exit 22
e=0; [ -f exit ] && e=1
chunk() { s=$(stat -c %s "$1"); n=$((s - $2)); [ $n -lt 0 ] && n=0; [ $n -gt $3 ] && n=$3; echo $n; }
o=$(chunk stdout "$2" "$4"); r=$(chunk stderr "$3" "$4")
echo "$e $o $r"
tail -c +"$(($2 + 1))" stdout | head -c "$o"
tail -c +"$(($3 + 1))" stderr | head -c "$r"`;

export interface Polled {
  ended: boolean;
  stdout: Buffer;
  stderr: Buffer;
}

/** New output of a session since the given offsets, and whether it has ended (all its output is then in). */
export async function pollSession(run: GuestRun, name: string, outOffset: number, errOffset: number, max = 1024 * 1024): Promise<Polled | undefined> {
  const dir = `${SESSIONS_DIR}/${validateSessionName(name)}`;
  const r = await run(sh(POLL, dir, String(outOffset), String(errOffset), String(max)));
  if (r.exitCode === 22) return undefined;
  if (r.exitCode !== 0) throw new BangerError('host', `reading session ${name} failed: ${r.stderr.toString().trim()}`);
  const nl = r.stdout.indexOf(0x0a);
  const [e, o, x] = r.stdout.subarray(0, nl).toString().split(' ').map(Number);
  const body = r.stdout.subarray(nl + 1);
  return { ended: e === 1, stdout: body.subarray(0, o), stderr: body.subarray(o, o + x) };
}
