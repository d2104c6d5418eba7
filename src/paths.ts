import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';

/** Where banger keeps its state. Every file name inside it is a named constant here (one place, as lima's filenames.go). */
export function bangerHome(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BANGER_HOME) return env.BANGER_HOME;
  const data = env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(data, 'banger');
}

/** Runtime directory for sockets: $XDG_RUNTIME_DIR/banger, else $BANGER_HOME/run. */
export function runtimeDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BANGER_RUNTIME_DIR) return env.BANGER_RUNTIME_DIR;
  if (env.XDG_RUNTIME_DIR) return join(env.XDG_RUNTIME_DIR, 'banger');
  return join(bangerHome(env), 'run');
}

/** Cache directory (KVM probe verdict, test image). */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BANGER_CACHE_DIR) return env.BANGER_CACHE_DIR;
  const base = env.XDG_CACHE_HOME || join(homedir(), '.cache');
  return join(base, 'banger');
}

export const Files = {
  db: 'banger.db',
  keysDir: 'keys',
  userKey: 'id_ed25519',
  userPubKey: 'id_ed25519.pub',
  imagesDir: 'images',
  vmsDir: 'vms',
  config: 'config.json',
  daemonSocket: 'daemon.sock',
  daemonPid: 'daemon.pid',
  daemonLog: 'daemon.log',
  // images/<name>/
  manifest: 'manifest.json',
  rootfs: 'rootfs.ext4',
  vmlinuz: 'vmlinuz',
  vmlinux: 'vmlinux',
  initrd: 'initrd.img',
  workSeed: 'work-seed.ext4',
  packages: 'packages.txt',
  // vms/<id>/
  workDisk: 'work.ext4',
  serialLog: 'serial.log',
  vmmPid: 'vmm.pid',
  knownHosts: 'known_hosts',
  hostKey: 'ssh_host_ed25519_key',
  qmpSocket: 'qmp.sock',
} as const;

export interface Layout {
  home: string;
  run: string;
  cache: string;
  db: string;
  socket: string;
  pidFile: string;
  logFile: string;
  config: string;
  keysDir: string;
  userKey: string;
  userPubKey: string;
  imagesDir: string;
  vmsDir: string;
  imageDir(name: string): string;
  vmDir(id: string): string;
}

export function layout(env: NodeJS.ProcessEnv = process.env): Layout {
  const home = bangerHome(env);
  const run = runtimeDir(env);
  return {
    home,
    run,
    cache: cacheDir(env),
    db: join(home, Files.db),
    socket: join(run, Files.daemonSocket),
    pidFile: join(run, Files.daemonPid),
    logFile: join(home, Files.daemonLog),
    config: join(home, Files.config),
    keysDir: join(home, Files.keysDir),
    userKey: join(home, Files.keysDir, Files.userKey),
    userPubKey: join(home, Files.keysDir, Files.userPubKey),
    imagesDir: join(home, Files.imagesDir),
    vmsDir: join(home, Files.vmsDir),
    imageDir: (name) => join(home, Files.imagesDir, name),
    vmDir: (id) => join(home, Files.vmsDir, id),
  };
}

export function readDaemonPid(l: Layout): number | undefined {
  try {
    const pid = Number(readFileSync(l.pidFile, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}
