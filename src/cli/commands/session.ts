/** banger vm session ..., vm exec and vm health: programs in a running guest (issue 11). */
import { hostname, userInfo } from 'node:os';
import type { Argv } from 'yargs';
import { BangerError } from '../../errors.js';
import type { OutputChunk, SessionView, HealthView } from '../../rpc/types.js';
import { connectDaemon } from '../connect.js';
import { call, out, usage, type GlobalArgs } from '../context.js';
import { AttachInput } from '../attach-input.js';
import { execStreaming } from '../exec-stream.js';
import type { BangerClient } from '../../index.js';

interface VmArg extends GlobalArgs {
  vm: string;
  '--'?: Array<string | number>;
}
interface SessionArg extends VmArg {
  session: string;
}
interface StartArgs extends VmArg {
  name?: string;
  pipe?: boolean;
  cwd?: string;
  env?: string[];
}
interface ExecArgs extends VmArg {
  cwd?: string;
  env?: string[];
  timeout?: number;
}

const argvOf = (a: VmArg, what: string) => {
  const argv = (a['--'] ?? []).map(String);
  if (argv.length === 0) usage(`${what} needs a command after --`, `e.g. banger vm ${what} myvm -- cat`);
  return argv;
};

export function envFlag(list: string[] | undefined): Record<string, string> | undefined {
  if (!list?.length) return undefined;
  const env: Record<string, string> = {};
  for (const kv of list) {
    const eq = kv.indexOf('=');
    const k = eq > 0 ? kv.slice(0, eq) : '';
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) usage(`--env ${JSON.stringify(kv)}: expected NAME=VALUE with NAME of letters, digits and _`, 'e.g. --env DEBUG=1');
    env[k] = kv.slice(eq + 1);
  }
  return env;
}

const write = (c: OutputChunk) => (c.stream === 'stdout' ? process.stdout : process.stderr).write(Buffer.from(c.data, 'base64'));

export function sessionLine(s: SessionView): string {
  const state = s.state === 'running' ? 'running' : `ended: ${s.endReason}`;
  const attach = s.attachedBy ? `  attached by ${s.attachedBy}` : '';
  return `${s.name}  ${s.pipe ? 'pipe' : 'plain'}  ${state}  ${JSON.stringify(s.argv)}${attach}`;
}

export function healthText(h: HealthView): string {
  const gib = (n: number) => `${(n / 2 ** 30).toFixed(2)} GiB`;
  return [
    `ok: ${h.ok} (the guest agent, over ${h.transport})`,
    `uptime: ${h.uptimeSeconds.toFixed(0)} s   load: ${h.load.join(' ')}`,
    `memory: ${gib(h.memory.availableKiB * 1024)} available of ${gib(h.memory.totalKiB * 1024)}`,
    ...(['/', '/root'] as const).map((p) => `disk ${p}: ${gib(h.disk[p].freeBytes)} free of ${gib(h.disk[p].totalBytes)}`),
    `sessions running: ${h.sessionsRunning}`,
  ].join('\n');
}

async function readStdin(limit: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of process.stdin) {
    n += (c as Buffer).length;
    if (n > limit) throw new BangerError('usage', `stdin is over ${limit} bytes`, 'send it in parts');
    chunks.push(c as Buffer);
  }
  return Buffer.concat(chunks);
}

async function send(a: SessionArg & { data?: string }): Promise<void> {
  const data = a.data !== undefined ? Buffer.from(`${a.data}\n`) : await readStdin(16 * 1024 * 1024);
  const r = await call('guest.session.send', { vm: a.vm, session: a.session, data: data.toString('base64'), encoding: 'base64' }, { quiet: true });
  out(a, r, () => (a.quiet ? undefined : `sent ${r.lines} line(s), ${r.bytes} bytes`));
}

async function logs(a: SessionArg & { follow?: boolean; stderr?: boolean }): Promise<void> {
  const r = await call('guest.session.logs', { vm: a.vm, session: a.session, follow: a.follow, stderr: a.stderr }, { quiet: true, onStream: write });
  if (!a.follow) (a.stderr ? process.stderr : process.stdout).write(Buffer.from(r.data, 'base64'));
}

/**
 * Attach: the session's output from now on, and (pipe mode) input forwarded line by line with send, in order, on
 * the attach's own connection. Ctrl-] then d, or Ctrl-C, detaches and leaves the session running. The end of
 * input only ends forwarding: the attach lasts until a detach or the session's end. A refused attach (another
 * holder) is reported as such, whatever the input did meanwhile.
 */
async function attach(a: SessionArg): Promise<void> {
  const s = await call('guest.session.show', { vm: a.vm, session: a.session }, { quiet: true });
  const client = await connectDaemon();
  const holder = `${userInfo().username}@${hostname()} pid ${process.pid}`;
  const tty = Boolean(process.stdin.isTTY);
  let granted = false;
  let detached = false;
  let startInput = () => {};
  const onStream = (c: OutputChunk) => {
    if (!granted) {
      granted = true; // the daemon's first chunk (empty) says the attach is ours
      process.stderr.write(`attached to ${s.name}; Ctrl-] then d (or Ctrl-C) detaches${s.pipe ? '' : ' (not a pipe session: input is not forwarded)'}\n`);
      startInput();
    }
    write(c);
  };
  const detach = () => {
    detached = true;
    client.close();
  };
  const result = client.call('guest.session.attach', { vm: a.vm, session: a.session, holder }, { onStream });
  let input: { stop(): void } | undefined;
  startInput = () => (input = forwardInput(client, a, s.pipe, tty, detach));
  try {
    const r = await result;
    process.stderr.write(r.ended ? `session ${s.name} ended\n` : 'detached\n');
  } catch (e) {
    if (!detached) throw e;
    process.stderr.write(`detached; session ${s.name} keeps running\n`);
  } finally {
    input?.stop();
    client.close();
  }
}

function forwardInput(client: Pick<BangerClient, 'call'>, a: SessionArg, pipe: boolean, tty: boolean, detach: () => void): { stop(): void } {
  const parser = new AttachInput(tty);
  let queue = Promise.resolve();
  const sendLine = (line: Buffer) => {
    if (!pipe) return;
    queue = queue
      .then(() => client.call('guest.session.send', { vm: a.vm, session: a.session, data: line.toString('base64'), encoding: 'base64' }))
      .then(
        () => {},
        (e) => void process.stderr.write(`send failed: ${(e as Error).message}\r\n`),
      );
  };
  const onData = (chunk: Buffer) => {
    const fed = parser.feed(chunk);
    if (fed.echo.length) process.stderr.write(Buffer.from(fed.echo));
    fed.lines.forEach(sendLine);
    if (fed.detach) detach();
  };
  const onEnd = () => {
    const rest = parser.rest();
    if (rest) sendLine(rest);
  };
  const onSignal = () => detach();
  if (tty) process.stdin.setRawMode(true);
  process.stdin.on('data', onData);
  process.stdin.on('end', onEnd);
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.stdin.resume();
  return {
    stop() {
      process.stdin.off('data', onData);
      process.stdin.off('end', onEnd);
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      if (tty) process.stdin.setRawMode(false);
      process.stdin.destroy();
    },
  };
}

/**
 * Runs CMD over the VM's pooled connection: stdout and stderr stream to ours, stdin is forwarded as it comes, and
 * the command's exit status becomes ours. It ends when the command does, whether or not our stdin has ended.
 */
async function execIn(a: ExecArgs): Promise<void> {
  const argv = argvOf(a, 'exec');
  const timeoutMs = a.timeout === undefined ? undefined : Math.round(a.timeout * 1000);
  if (timeoutMs !== undefined && !(timeoutMs > 0)) usage(`--timeout ${a.timeout}: give a positive number of seconds`);
  const client = await connectDaemon();
  try {
    const r = await execStreaming(client, { vm: a.vm, argv, cwd: a.cwd, env: envFlag(a.env), timeoutMs });
    if (r.timedOut) process.stderr.write(`banger: ${argv[0]} did not finish within ${a.timeout} s and was stopped (exit status ${r.exitCode})\n`);
    process.exitCode = r.exitCode;
  } finally {
    client.close();
  }
}

const sessionRef = <T>(y: Argv<T>) => y.positional('vm', { type: 'string', demandOption: true }).positional('session', { type: 'string', demandOption: true });

export function sessionCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y
    .command(
      'start <vm>',
      'start a program as a session in the guest (a systemd unit that outlives the daemon)',
      (a) =>
        a
          .positional('vm', { type: 'string', demandOption: true })
          .option('name', { type: 'string', describe: 'session name: a-z 0-9 _ -, up to 32' })
          .option('pipe', { type: 'boolean', describe: 'stdin is a FIFO fed by `session send` (never EOF between sends)' })
          .option('cwd', { type: 'string', describe: 'working directory in the guest' })
          .option('env', { type: 'string', array: true, describe: 'NAME=VALUE (repeatable)' })
          .usage('banger vm session start <vm> [--name N] [--pipe] [--cwd P] [--env K=V]... -- CMD...'),
      async (args) => {
        const a = args as unknown as StartArgs;
        const argv = argvOf(a, 'session start');
        const s = await call('guest.session.start', { vm: a.vm, name: a.name, pipe: a.pipe, cwd: a.cwd, env: envFlag(a.env), argv }, { quiet: true });
        out(a, s, () => s.name);
      },
    )
    .command('list <vm>', "list the VM's sessions", (a) => a.positional('vm', { type: 'string', demandOption: true }), async (args) => {
      const a = args as unknown as VmArg;
      const r = await call('guest.session.list', { vm: a.vm }, { quiet: true });
      out(a, r, () => r.map(sessionLine).join('\n'));
    })
    .command('show <vm> <session>', 'show one session', sessionRef, async (args) => {
      const a = args as unknown as SessionArg;
      const s = await call('guest.session.show', { vm: a.vm, session: a.session }, { quiet: true });
      out(a, s, () => sessionLine(s));
    })
    .command('send <vm> <session> [data]', "write DATA (and a newline), or all of stdin, to a pipe session's stdin; each line up to 4096 bytes lands whole", (a) => sessionRef(a).positional('data', { type: 'string' }), (a) => send(a as unknown as SessionArg & { data?: string }))
    .command('attach <vm> <session>', 'follow output and forward input (exclusive; Ctrl-] then d detaches)', sessionRef, (a) => attach(a as unknown as SessionArg))
    .command('logs <vm> <session>', "print a session's stdout (or --stderr); --follow until it ends", (a) => sessionRef(a).option('follow', { alias: 'f', type: 'boolean' }).option('stderr', { type: 'boolean' }), (a) => logs(a as unknown as SessionArg & { follow?: boolean; stderr?: boolean }))
    .command('kill <vm> <session>', 'signal a session (default TERM)', (a) => sessionRef(a).option('signal', { type: 'string', describe: 'TERM, INT, KILL, HUP...' }), async (args) => {
      const a = args as unknown as SessionArg & { signal?: string };
      const s = await call('guest.session.kill', { vm: a.vm, session: a.session, signal: a.signal?.toUpperCase() }, { quiet: true });
      out(a, s, () => sessionLine(s));
    })
    .demandCommand(1, 'name a session command');
}

/** `vm exec`, `vm health` and `vm session`, added to the vm command group. */
export function guestCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y
    .command('session', 'programs that live in the guest: start, list, show, send, attach, logs, kill', (s) => sessionCommands(s))
    .command(
      'exec <vm>',
      "run CMD in the guest over the VM's pooled SSH connection; its stdout, stderr and exit status become this command's",
      (a) =>
        a
          .positional('vm', { type: 'string', demandOption: true })
          .option('cwd', { type: 'string' })
          .option('env', { type: 'string', array: true, describe: 'NAME=VALUE (repeatable)' })
          .option('timeout', { type: 'number', describe: 'seconds' })
          .usage('banger vm exec <vm> [--cwd P] [--env K=V]... [--timeout S] -- CMD...'),
      (a) => execIn(a as ExecArgs),
    )
    .command('health <vm>', "the guest agent's report: uptime, load, memory, free disk and running sessions", (a) => a.positional('vm', { type: 'string', demandOption: true }), async (args) => {
      const a = args as unknown as VmArg;
      const h = await call('vm.health', { vm: a.vm }, { quiet: true });
      out(a, h, () => healthText(h));
    });
}
