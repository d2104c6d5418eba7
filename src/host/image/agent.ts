/**
 * The guest agent: a small bash program in the image that answers `GET /healthz` with this guest's health as JSON,
 * and `POST /identity` by applying the identity disk again, network included (a fork restored onto its own TAP takes
 * its new MAC and address so: the request carries no data, the host-written identity disk does).
 * No runtime is added to the guest for it (bash, coreutils and systemd are there already). It serves HTTP/1.1-style
 * requests one after another on one of two channels, each started by udev when the VMM offers it:
 * - a virtio-serial port named org.banger.agent (QEMU): banger-agent-port.service holds the port open and answers
 *   whoever is connected to its host side, a Unix socket next to the VM's QMP socket;
 * - vsock port AGENT_VSOCK_PORT (Firecracker): banger-agent.socket, one banger-agent@.service per connection.
 * The host side (src/host/guest/agent.ts) tags each request with X-Banger-Request and skips any answer that carries
 * another tag: a virtio-serial port outlives a host connection, so an answer to a client that gave up can be
 * waiting for the next one.
 */

/** The virtio-serial port's name, as the guest sees it in /dev/virtio-ports/. */
export const AGENT_PORT_NAME = 'org.banger.agent';
/** The vsock port the agent listens on (Firecracker: the host sends `CONNECT <port>`). */
export const AGENT_VSOCK_PORT = 10052;
/** Where the agent lives in the guest. */
export const AGENT_PATH = '/usr/local/sbin/banger-agent';
/** The script that applies the identity disk (src/host/image/image.ts), at boot and on POST /identity. */
export const IDENTITY_PATH = '/usr/local/sbin/banger-identity';

// `$\{` stands for `${` (bash's), which a template literal would take for its own.
export const AGENT_SCRIPT = String.raw`#!/bin/bash
# written by banger: the guest agent. GET /healthz answers this guest's health as JSON; POST /identity applies the
# identity disk again (banger-identity --refresh: hostname, network, MAC); nothing else is served.
# Requests come one after another, HTTP/1.1-style: on stdin/stdout (a vsock connection) or, with --port DEV, on a
# virtio-serial port whose host side banger connects to for a request and leaves again.
set -u
export LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin
MAX_LINE=1024   # bytes in a request line or a header line
MAX_HEADERS=32
HEADER_WAIT=5   # seconds a client may take between the lines of one request
IDLE_WAIT=30    # seconds a vsock client may stay silent between requests

# reply STATUS REASON BODY: one answer, tagged with the request's X-Banger-Request.
reply() {
  printf 'HTTP/1.1 %s %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-Banger-Request: %s\r\n\r\n%s' \
    "$1" "$2" "$\{#3}" "$req_id" "$3" >&"$out"
}

health() {
  local up l1 l2 l3 k v _ total=0 avail=0 running=0 ev
  read -r up _ </proc/uptime
  read -r l1 l2 l3 _ </proc/loadavg
  while read -r k v _; do
    case $k in MemTotal:) total=$v ;; MemAvailable:) avail=$v ;; esac
  done </proc/meminfo
  for ev in /sys/fs/cgroup/system.slice/banger-session-*.service/cgroup.events; do
    [ -r "$ev" ] || continue
    while read -r k v; do [ "$k" = populated ] && [ "$v" = 1 ] && running=$((running + 1)); done <"$ev"
  done
  # f_bavail f_frsize f_blocks of / then /root (the work disk)
  set -- $(stat -f -c '%a %S %b' / /root 2>/dev/null)
  [ $# -eq 6 ] || set -- 0 0 0 0 0 0
  printf -v body '{"ok":true,"uptimeSeconds":%s,"load":[%s,%s,%s],"memory":{"totalKiB":%s,"availableKiB":%s},"disk":{"/":{"freeBytes":%s,"totalBytes":%s},"/root":{"freeBytes":%s,"totalBytes":%s}},"sessionsRunning":%s}' \
    "$up" "$l1" "$l2" "$l3" "$total" "$avail" $(($1 * $2)) $(($3 * $2)) $(($4 * $5)) $(($6 * $5)) "$running"
  reply 200 OK "$body"
}

refresh_identity() {
  if "$\{BANGER_IDENTITY_SCRIPT:-${IDENTITY_PATH}}" --refresh </dev/null 1>&2; then
    reply 200 OK '{"ok":true}'
  else
    reply 500 'Internal Server Error' '{"ok":false,"error":"banger-identity --refresh failed: see journalctl -u banger-agent-port"}'
  fi
}

# Reads one request from fd $in and answers it on fd $out. Returns 1 at the end of input, or when the client
# went silent within a request (nothing is answered then).
one_request() {
  local line method target version rest n=0 wait=()
  req_id=-
  [ "$mode" = stdio ] && wait=(-t "$IDLE_WAIT")
  IFS= read -r -n "$MAX_LINE" "$\{wait[@]}" -u "$in" line || return 1
  if [ "$\{#line}" -ge "$MAX_LINE" ]; then
    # The rest of an over-long line is read and dropped (bounded), then answered once.
    local drained=0
    while [ "$drained" -lt 64 ] && IFS= read -r -n "$MAX_LINE" -t "$HEADER_WAIT" -u "$in" rest && [ "$\{#rest}" -ge "$MAX_LINE" ]; do
      drained=$((drained + 1))
    done
    reply 400 'Bad Request' '{"ok":false,"error":"request line too long"}'
    return 0
  fi
  line=$\{line%$'\r'}
  method=$\{line%% *}; rest=$\{line#* }; target=$\{rest%% *}; version=$\{rest#* }
  # Header lines up to the blank one; past the caps they are still read (up to 8 times the count), then refused.
  while :; do
    IFS= read -r -n "$MAX_LINE" -t "$HEADER_WAIT" -u "$in" rest || return 1
    rest=$\{rest%$'\r'}
    [ -z "$rest" ] && break
    n=$((n + 1))
    [ "$n" -gt $((MAX_HEADERS * 8)) ] && return 1
    [ "$\{#rest}" -ge "$MAX_LINE" ] && n=$((n + MAX_HEADERS))
    [ "$n" -gt "$MAX_HEADERS" ] && continue
    shopt -s nocasematch
    if [[ $rest =~ ^x-banger-request:\ *([A-Za-z0-9_-]{1,64})\ *$ ]]; then req_id=$\{BASH_REMATCH[1]}; fi
    shopt -u nocasematch
  done
  if [ "$n" -gt "$MAX_HEADERS" ]; then
    reply 431 'Request Header Fields Too Large' '{"ok":false,"error":"too many or too long header lines"}'
  elif [ "$version" != HTTP/1.1 ] && [ "$version" != HTTP/1.0 ]; then
    reply 400 'Bad Request' '{"ok":false,"error":"not an HTTP/1.x request line"}'
  elif [ "$target" = /healthz ] && [ "$method" = GET ]; then
    health
  elif [ "$target" = /identity ] && [ "$method" = POST ]; then
    refresh_identity
  elif [ "$target" = /healthz ] || [ "$target" = /identity ]; then
    reply 405 'Method Not Allowed' '{"ok":false,"error":"GET /healthz and POST /identity are served"}'
  else
    reply 404 'Not Found' '{"ok":false,"error":"only /healthz and /identity are served"}'
  fi
}

if [ "$\{1-}" = --port ]; then
  mode=port
  exec 3<>"$2" || exit 1
  in=3 out=3
  # While no host is connected the port reads as at its end, and a write to it blocks until one connects: each
  # connection is greeted with an empty line (the host skips empty lines between answers), which costs no CPU
  # while nobody is there. Then requests until the host leaves.
  while printf '\n' >&3; do
    while one_request; do :; done
  done
else
  mode=stdio in=0 out=1
  while one_request; do :; done
fi
`.replaceAll('$\\{', '${');

/** udev starts the agent on whichever channel the VMM offers (the pattern of Debian's qemu-guest-agent). */
export const AGENT_UDEV_RULES = [
  '# written by banger: start the guest agent on the channel the VMM offers',
  `SUBSYSTEM=="virtio-ports", ATTR{name}=="${AGENT_PORT_NAME}", TAG+="systemd", ENV{SYSTEMD_WANTS}+="banger-agent-port.service"`,
  'SUBSYSTEM=="misc", KERNEL=="vsock", TAG+="systemd", ENV{SYSTEMD_WANTS}+="banger-agent.socket"',
  '',
].join('\n');

const PORT_DEVICE_UNIT = `dev-virtio\\x2dports-${AGENT_PORT_NAME}.device`;

export const AGENT_PORT_UNIT = [
  '# written by banger',
  '[Unit]',
  'Description=banger guest agent on the virtio-serial port ' + AGENT_PORT_NAME,
  `BindsTo=${PORT_DEVICE_UNIT}`,
  `After=${PORT_DEVICE_UNIT}`,
  '',
  '[Service]',
  `ExecStart=${AGENT_PATH} --port /dev/virtio-ports/${AGENT_PORT_NAME}`,
  'Restart=always',
  'RestartSec=1',
  '',
].join('\n');

export const AGENT_SOCKET_UNIT = [
  '# written by banger',
  '[Unit]',
  'Description=banger guest agent on vsock',
  '',
  '[Socket]',
  `ListenStream=vsock::${AGENT_VSOCK_PORT}`,
  'Accept=yes',
  'MaxConnections=8',
  '',
].join('\n');

export const AGENT_CONNECTION_UNIT = [
  '# written by banger',
  '[Unit]',
  'Description=banger guest agent: one vsock connection',
  '',
  '[Service]',
  `ExecStart=${AGENT_PATH}`,
  'StandardInput=socket',
  'StandardOutput=socket',
  'StandardError=journal',
  'RuntimeMaxSec=120',
  '',
].join('\n');

/** Guest path → [content, mode]: what the image builder writes for the agent. */
export const AGENT_FILES: Record<string, [string, number]> = {
  [AGENT_PATH]: [AGENT_SCRIPT, 0o755],
  '/etc/udev/rules.d/90-banger-agent.rules': [AGENT_UDEV_RULES, 0o644],
  '/etc/systemd/system/banger-agent-port.service': [AGENT_PORT_UNIT, 0o644],
  '/etc/systemd/system/banger-agent.socket': [AGENT_SOCKET_UNIT, 0o644],
  '/etc/systemd/system/banger-agent@.service': [AGENT_CONNECTION_UNIT, 0o644],
};
