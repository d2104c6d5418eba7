#!/usr/bin/env bash
# Installs what banger needs on a Debian/Ubuntu host, then its npm dependencies. Idempotent: only missing
# packages are installed. Uses sudo when not root. Package names only: the mirror is the host's own apt setup.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
wanted=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
want() { # want <command> <package>
  wanted+=("$1")
  have "$1" || need+=("$2")
}
want qemu-system-x86_64 qemu-system-x86
want qemu-img qemu-utils
want mmdebstrap mmdebstrap
want mkfs.ext4 e2fsprogs
want debugfs e2fsprogs
want ssh openssh-client
want ssh-keygen openssh-client
want git git
want ip iproute2
want lz4 lz4
want xz xz-utils
want zstd zstd
want make make
want g++ g++
want python3 python3
want nft nftables
want slirp4netns slirp4netns
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)

if [ ${#need[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  uniq=($(printf '%s\n' "${need[@]}" | sort -u))
  echo "bootstrap: installing ${uniq[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${uniq[@]}" >/dev/null
fi

# Everything the suite needs is here now, or bootstrap says what is missing (a test must never skip for want of it).
missing=()
for cmd in "${wanted[@]}"; do have "$cmd" || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: still missing after install: ${missing[*]} (check the host's apt sources)" >&2
  exit 1
fi

node -e 'const [M]=process.versions.node.split(".").map(Number); if (M < 20) { console.error(`banger needs Node 20 or newer (found ${process.versions.node})`); process.exit(1) }'

# npm ci: the exact lockfile. Some npm 11 releases refuse lockfiles that omit other platforms' optional
# packages; npm install keeps to the lockfile's versions too, so fall back to it then.
if [ ! -d node_modules/.bin ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund >/dev/null 2>&1 || npm install --no-audit --no-fund --no-save >/dev/null || {
    echo "bootstrap: npm install failed; retrying once from a clean node_modules" >&2
    rm -rf node_modules
    npm install --no-audit --no-fund --no-save >/dev/null
  }
fi
node -e "require('better-sqlite3'); require('ssh2')" || { echo "bootstrap: native modules failed to load; run npm rebuild" >&2; exit 1; }
# The CLI runs compiled JavaScript from dist/ (bin/banger.js falls back to the sources, slower, when it is stale).
if [ "$(node -e "import('./bin/freshness.js').then((m) => console.log(m.distState('.')))")" != fresh ]; then
  node scripts/build.mjs >/dev/null || { echo "bootstrap: compiling src/ to dist/ failed (npm run build shows why)" >&2; exit 1; }
fi
echo "bootstrap: ready" >&2
