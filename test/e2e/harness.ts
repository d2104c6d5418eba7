/** Drives the real CLI against a private BANGER_HOME (with the cached test image hard-linked in). */
import { mkdirSync, mkdtempSync, readdirSync, rmSync, readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import { describe, inject } from 'vitest';
import { imageHome, testCacheRoot, TEST_IMAGE } from './image-cache.js';

export const BIN = join(import.meta.dirname, '..', '..', 'bin', 'banger.js');

export interface CliResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** describe() for e2e suites: skips with the reason outside CI, fails under CI (nothing may skip there). */
export function describeE2E(name: string, fn: () => void): void {
  const reason = inject('e2eSkipReason');
  if (reason) {
    if (process.env.CI === 'true') {
      describe(name, () => {
        it('has what e2e tests need', () => {
          throw new Error(`e2e prerequisites missing under CI: ${reason}`);
        });
      });
      return;
    }
    describe.skip(`${name} (skipped: ${reason})`, fn);
    return;
  }
  describe(name, fn);
}
import { it } from 'vitest';

export class Banger {
  readonly home: string;
  readonly runDir: string;
  readonly env: Record<string, string>;

  /** Command prefix, e.g. ['ip', 'netns', 'exec', NS] to run banger (and so its daemon) inside a namespace. */
  wrap: string[] = [];

  private constructor(extraEnv: Record<string, string> = {}) {
    const root = join(testCacheRoot(), 'homes');
    mkdirSync(root, { recursive: true });
    this.home = mkdtempSync(join(root, 'h-'));
    this.runDir = mkdtempSync('/tmp/bgr-');
    this.env = {
      ...(process.env as Record<string, string>),
      BANGER_HOME: this.home,
      BANGER_RUNTIME_DIR: this.runDir,
      // the KVM verdict and anything else banger caches: this home's, never HOME's
      BANGER_CACHE_DIR: join(this.home, 'cache'),
      // banger's host-side git sees only this home's global config (none until a test writes one with
      // hostGitIdentity), so the guest's identity never depends on the machine's ~/.gitconfig or /etc/gitconfig
      GIT_CONFIG_GLOBAL: join(this.home, 'host-gitconfig'),
      GIT_CONFIG_NOSYSTEM: '1',
      NO_COLOR: '1',
      // Suites that test tap networking opt in (inside their own network namespace).
      BANGER_ROOT_HELPER: 'off',
      ...extraEnv,
    };
    delete this.env.XDG_RUNTIME_DIR;
  }

  /** A fresh home with the test image hard-linked in (the image's files are only ever read). */
  static async create(extraEnv: Record<string, string> = {}): Promise<Banger> {
    const b = new Banger(extraEnv);
    mkdirSync(join(b.home, 'images'), { recursive: true });
    const src = join(imageHome(), 'images', TEST_IMAGE);
    const r = await execa('cp', ['-al', src, join(b.home, 'images', TEST_IMAGE)], { reject: false });
    if (r.exitCode !== 0) await execa('cp', ['-a', '--reflink=auto', src, join(b.home, 'images', TEST_IMAGE)]);
    return b;
  }

  /** Give the "host" (banger as this home's user) a git identity, as `git config --global` would. */
  async hostGitIdentity(name: string, email: string): Promise<void> {
    for (const [k, v] of [['user.name', name], ['user.email', email]]) {
      await execa('git', ['config', '--file', this.env.GIT_CONFIG_GLOBAL, k, v]);
    }
  }

  async run(args: string[], opts: { timeoutMs?: number; input?: string; cwd?: string } = {}): Promise<CliResult> {
    const [file, ...pre] = this.wrap.length ? [...this.wrap, process.execPath] : [process.execPath];
    const r = await execa(file, [...pre, BIN, ...args], {
      env: this.env,
      reject: false,
      timeout: opts.timeoutMs ?? 300_000,
      input: opts.input,
      cwd: opts.cwd,
      stripFinalNewline: false,
    });
    return { exitCode: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr) };
  }

  async ok(args: string[], opts: { timeoutMs?: number; cwd?: string } = {}): Promise<CliResult> {
    const r = await this.run(args, opts);
    if (r.exitCode !== 0) throw new Error(`banger ${args.join(' ')} exited ${r.exitCode}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
    return r;
  }

  async json<T = any>(args: string[], opts: { timeoutMs?: number; cwd?: string } = {}): Promise<T> {
    const r = await this.ok(['--json', ...args], opts);
    return JSON.parse(r.stdout) as T;
  }

  daemonPid(): number | undefined {
    try {
      return Number(readFileSync(join(this.runDir, 'daemon.pid'), 'utf8'));
    } catch {
      return undefined;
    }
  }

  /** QEMU processes that belong to this home's VMs (by the VM ids on their command lines). */
  qemuPids(): number[] {
    const ids = existsSync(join(this.home, 'vms')) ? readdirSync(join(this.home, 'vms')) : [];
    return vmmPidsFor(ids);
  }

  async cleanup(): Promise<void> {
    const ids = existsSync(join(this.home, 'vms')) ? readdirSync(join(this.home, 'vms')) : [];
    const list = await this.run(['--json', 'vm', 'list'], { timeoutMs: 30_000 });
    if (list.exitCode === 0) {
      for (const v of JSON.parse(list.stdout) as Array<{ id: string }>) await this.run(['vm', 'delete', v.id], { timeoutMs: 60_000 });
    }
    await this.run(['daemon', 'stop'], { timeoutMs: 30_000 });
    for (const pid of vmmPidsFor(ids)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    rmSync(this.home, { recursive: true, force: true });
    rmSync(this.runDir, { recursive: true, force: true });
  }
}

export function vmmPidsFor(ids: string[]): number[] {
  const out: number[] = [];
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const cmd = readFileSync(`/proc/${p}/cmdline`, 'utf8');
      if (cmd && pidAlive(Number(p)) && ids.some((id) => cmd.includes(`banger-${id}`))) out.push(Number(p));
    } catch {
      /* raced */
    }
  }
  return out;
}

/** Alive and not a zombie waiting for its (adoptive) parent to reap it. */
export const pidAlive = (pid: number): boolean => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
};
