/**
 * The rootHelper actor: the root-helper connection machine (src/machines/root-helper.machine.ts) with its steps —
 * connect (starting the helper as our child process when the daemon is root and nothing answers) and watch —
 * plus the link the rest of the daemon uses to send verbs. The actor itself is a child of the daemon's root
 * (systemId "rootHelper"); `attach` hands this link the live actor once the root has started it.
 */
import { existsSync, mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { fromPromise, waitFor, type ActorRefFrom } from 'xstate';
import { BangerError, errorMessage } from '../errors.js';
import { rootHelperMachine } from '../machines/root-helper.machine.js';
import { RootHelperClient } from '../roothelper/client.js';
import type { VerbResults } from '../roothelper/protocol.js';
import { spawnDetached, type Detached } from '../host/exec/spawn.js';

const HELPER_ARGV = import.meta.url.endsWith('.js') ? [fileURLToPath(new URL('../roothelper/main.js', import.meta.url))] : ['--import', 'tsx', fileURLToPath(new URL('../roothelper/main.ts', import.meta.url))]; // compiled code (a release) runs the compiled helper: no tsx

export interface RootHelperOptions {
  socket: string;
  /** Run the helper as a child process when nothing answers on the socket (the daemon is root). */
  spawnChild: boolean;
  stateDir: string;
  /** The child helper's bridge, its CIDR and NAT (its own config: requests never carry them). */
  network: { bridge: string; cidr: string; nat: boolean };
  log: (line: string) => void;
}

type RootHelperRef = ActorRefFrom<typeof rootHelperMachine>;

export class RootHelper {
  /** The machine with its steps, for the daemon's root to run as its `rootHelper` child. */
  readonly logic: typeof rootHelperMachine;
  private ref?: RootHelperRef;
  private child?: Detached;

  constructor(private opts: RootHelperOptions) {
    this.logic = rootHelperMachine.provide({
      actors: {
        connect: fromPromise(async () => this.connected(await this.connect())) as never,
        watch: fromPromise(async ({ input }) => {
          await (input.client as RootHelperClient).closed;
          this.opts.log('root helper connection closed; reconnecting with backoff');
        }),
      },
    });
  }

  /** The live actor, once the daemon's root runs it. */
  attach(ref: RootHelperRef | undefined): void {
    if (!ref) throw new Error('the daemon has no rootHelper actor: send HELPER.ENABLE first');
    this.ref = ref;
  }

  private actor(): RootHelperRef {
    if (!this.ref) throw new BangerError('unsupported', 'the root helper is not enabled in this daemon', 'use --net user');
    return this.ref;
  }

  /** Runs after every new connection: a restarted helper knows none of this daemon's VMs (their firewall is sent again). */
  onConnect?: () => void;

  private connected(client: RootHelperClient): RootHelperClient {
    const hook = this.onConnect;
    if (hook) setImmediate(hook);
    return client;
  }

  private async connect(): Promise<RootHelperClient> {
    try {
      return await RootHelperClient.connect(this.opts.socket, { timeoutMs: 2000, requestTimeoutMs: 60_000 });
    } catch (e) {
      if (!this.opts.spawnChild) throw e;
    }
    // We own the helper: (re)start it as our child process and connect once its socket answers.
    if (!this.child || !this.child.isRunning()) {
      mkdirSync(this.opts.stateDir, { recursive: true });
      // Its one owner is this daemon's user (root: TAPs get no owner, the jailer is refused), its socket ours alone.
      const { bridge, cidr, nat } = this.opts.network;
      const owner = ['--owner-uid', String(process.getuid?.() ?? 0), '--owner-gid', String(process.getgid?.() ?? 0)];
      const argv = [...HELPER_ARGV, '--socket', this.opts.socket, '--state-dir', this.opts.stateDir, ...owner, '--bridge', bridge, '--cidr', cidr, ...(nat ? ['--nat'] : [])];
      const c = spawnDetached(process.execPath, argv, {
        onStderrLine: (line) => this.opts.log(`roothelper: ${line}`),
      });
      this.child = c;
      void c.exited.then((code) => this.opts.log(`root helper child exited (${code})`));
      this.opts.log(`started the root helper as a child process (pid ${c.pid})`);
    }
    const deadline = Date.now() + 15_000;
    let last: unknown;
    while (Date.now() < deadline) {
      if (existsSync(this.opts.socket)) {
        try {
          return await RootHelperClient.connect(this.opts.socket, { timeoutMs: 2000, requestTimeoutMs: 60_000 });
        } catch (e) {
          last = e;
        }
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new BangerError('timeout', `the root helper did not come up on ${this.opts.socket}: ${errorMessage(last)}`);
  }

  state(): { state: string; lastError: string | null; attempts: number } {
    if (!this.ref) return { state: 'not enabled', lastError: null, attempts: 0 };
    const s = this.ref.getSnapshot();
    return { state: String(s.value), lastError: s.context.lastError, attempts: s.context.attempts };
  }

  /** Is the helper reachable now (waits up to timeoutMs for a connection in progress)? */
  async reachable(timeoutMs = 3000): Promise<boolean> {
    try {
      await waitFor(this.actor(), (s) => s.matches('connected'), { timeout: timeoutMs });
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Send a verb; waits (bounded) while the connection is being re-established. Every verb banger sends is
   * idempotent, so a request cut off by the helper dying is sent once more after the reconnect.
   */
  async request<V extends keyof VerbResults>(verb: V, args: Record<string, unknown>, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<VerbResults[V]> {
    const deadline = Date.now() + (opts.timeoutMs ?? 30_000);
    let lastErr: unknown;
    for (let attempt = 0; attempt < 3; attempt++) {
      let snap;
      try {
        snap = await waitFor(this.actor(), (s) => (s.matches('connected') && (s.context.client as RootHelperClient).isOpen) || s.matches('disabled'), { timeout: Math.max(1, deadline - Date.now()), signal: opts.signal });
      } catch {
        const st = this.state();
        throw new BangerError('host', `the root helper is not reachable (${st.state}${st.lastError ? `: ${st.lastError}` : ''})`, 'start it (banger system install sets it up) or use --net user');
      }
      if (snap.matches('disabled')) throw new BangerError('unsupported', 'the root helper is disabled in this daemon', 'unset BANGER_ROOT_HELPER=off, or use --net user');
      const client = snap.context.client as RootHelperClient;
      try {
        return (await client.request(verb as never, args as never, { timeoutMs: Math.max(1000, deadline - Date.now()), signal: opts.signal })) as VerbResults[V];
      } catch (e) {
        lastErr = e;
        // Refusals and failures of the verb itself are final; only a lost connection is retried.
        if (client.isOpen) throw e;
        this.opts.log(`root helper connection lost during ${verb}; retrying after the reconnect`);
      }
    }
    throw lastErr;
  }

  /** Disable the connection; a helper we run as our child (or adopted from an earlier daemon) is stopped too. */
  async stop(): Promise<void> {
    if (!this.ref) return;
    if (this.opts.spawnChild && this.ref.getSnapshot().matches('connected')) {
      try {
        const client = this.ref.getSnapshot().context.client as RootHelperClient;
        const { pid } = (await client.request('ping' as never, {} as never, { timeoutMs: 2000 })) as { pid: number };
        client.close();
        if (pid && pid !== process.pid) process.kill(pid, 'SIGTERM');
      } catch {
        /* already gone */
      }
    }
    this.ref.send({ type: 'DISABLE' });
  }
}
