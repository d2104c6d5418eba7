#!/usr/bin/env node
// A stand-in `firecracker` executable for tests: `node fake-firecracker-bin.mjs --api-sock PATH --id ID`.
// It serves the fake API (test/support/fake-firecracker.ts) on that socket, writes boot lines to stdout (the
// guest's serial console) on InstanceStart, and exits on SendCtrlAltDel (or dies on SIGTERM/SIGKILL), so a
// driver's process handling is exercised for real. SIGUSR2 makes the guest power off (exit 0), at a moment of the
// test's choosing.
//
// Environment knobs:
//   FAKE_FC_RECORD=FILE             append every request as a JSON line
//   FAKE_FC_IGNORE_CTRL_ALT_DEL=1   accept SendCtrlAltDel but keep running (the guest ignores it)
//   FAKE_FC_CHROOT=DIR              resolve paths in bodies inside DIR (as the jailer's chroot would)
//   FAKE_FC_VERSION=X.Y.Z           the version it reports and behaves as (default 1.7.0-fake)
//   FAKE_FC_FAIL_AT_START=MSG       print MSG to stderr and exit 1 before serving (e.g. no /dev/kvm)
//   FAKE_FC_GUEST_AGENT=PORT:FILE   once started, the guest listens on vsock PORT: each connection runs `bash FILE`
//                                   with the connection as its stdin and stdout (the guest agent, as systemd runs it)
import { spawn } from 'node:child_process';
import { appendFileSync, existsSync } from 'node:fs';

const takesValue = new Set([
  '--api-sock', '--id', '--log-path', '--level', '--start-time-us', '--start-time-cpu-us', '--parent-cpu-time-us',
  '--seccomp-filter', '--config-file', '--metadata', '--mmds-size-limit', '--http-api-max-payload-size', '--module',
  '--metrics-path',
]);
const flags = new Set(['--show-level', '--show-log-origin', '--boot-timer', '--no-seccomp', '--no-api']);

const argv = process.argv.slice(2);
const opts = {};
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (takesValue.has(a)) {
    if (i + 1 >= argv.length) {
      process.stderr.write(`error: The argument '${a}' requires a value but none was supplied\n`);
      process.exit(1);
    }
    opts[a] = argv[++i];
  } else if (flags.has(a)) {
    opts[a] = true;
  } else {
    process.stderr.write(`error: Found argument '${a}' which wasn't expected, or isn't valid in this context\n`);
    process.exit(1);
  }
}

if (process.env.FAKE_FC_FAIL_AT_START) {
  process.stderr.write(`${process.env.FAKE_FC_FAIL_AT_START}\n`);
  process.exit(1);
}

const socketPath = opts['--api-sock'] ?? '/run/firecracker.socket';
const id = opts['--id'] ?? 'anonymous-instance';
if (existsSync(socketPath)) {
  process.stderr.write(`Failed to open the API socket at ${socketPath}: IO Error: Address in use (os error 98)\n`);
  process.exit(1);
}

// Only now load the server (TypeScript through tsx, and zod): about a second of CPU, which on a loaded machine is
// several seconds that the failures above need not wait for.
const { register } = await import('tsx/esm/api');
register();
const { startFakeFirecracker } = await import('./fake-firecracker.ts');

const record = process.env.FAKE_FC_RECORD;
// Like Firecracker, leave the sockets behind on exit: cleaning them up is the driver's job.
const exit = (code) => process.exit(code);
// A guest that powers off by itself (installed before the socket answers, so it is in place once launch returns).
process.on('SIGUSR2', () => {
  process.stdout.write('reboot: Power down\n');
  exit(0);
});

const fake = await startFakeFirecracker({
  socketPath,
  id,
  chroot: process.env.FAKE_FC_CHROOT || undefined,
  vmmVersion: process.env.FAKE_FC_VERSION || undefined,
  ignoreCtrlAltDel: process.env.FAKE_FC_IGNORE_CTRL_ALT_DEL === '1',
  onRequest: (r) => {
    if (record) appendFileSync(record, `${JSON.stringify(r)}\n`);
  },
  onStart: () => {
    process.stdout.write(`[    0.000000] Linux version 6.1.0-fake (fake-firecracker ${id})\n[    0.100000] Run /sbin/init as init process\n`);
  },
  onCtrlAltDel: () => {
    process.stdout.write('reboot: Restarting system\n');
    exit(0);
  },
});
const guestAgent = /^(\d+):(.+)$/.exec(process.env.FAKE_FC_GUEST_AGENT ?? '');
if (guestAgent) {
  fake.listenInGuest(Number(guestAgent[1]), (sock) => {
    const child = spawn('bash', [guestAgent[2]], { stdio: ['pipe', 'pipe', 'inherit'] });
    child.on('error', () => sock.destroy());
    child.stdin.on('error', () => {});
    sock.pipe(child.stdin);
    child.stdout.pipe(sock);
    sock.on('close', () => child.kill());
    sock.resume();
  });
}
process.stderr.write(`fake firecracker ${id} serving ${socketPath} (pid ${process.pid})\n`);
