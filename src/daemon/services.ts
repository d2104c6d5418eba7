/**
 * What the RPC handlers and the doctor need from the running daemon, and nothing more. daemon.ts builds it
 * (its DaemonHandle satisfies this interface); handlers and doctor never import daemon.ts, so the daemon
 * module graph has no cycle.
 */
import type { VmSupervisor } from '../actors/supervisor.js';
import type { RootHelper } from '../actors/root-helper.js';
import type { TapPool } from '../actors/tap-pool.js';
import type { Config } from '../config.js';
import type { VmmDriver } from '../host/vmm/qemu/qemu.js';
import type { Layout } from '../paths.js';
import type { Store } from '../store/repo.js';
import type { InspectorServer } from './inspector.js';
import type { WarmPool } from './warm-pool.js';
import type { SshPool } from '../host/guest/pool.js';

export interface DaemonServices {
  layout: Layout;
  config: Config;
  store: Store;
  supervisor: VmSupervisor;
  /** SSH connections to running guests (the step environment's: boot hands over its first). */
  ssh: SshPool;
  /** The root helper (TAP devices, bridge), when this daemon has one. */
  rootHelper?: Pick<RootHelper, 'reachable' | 'state' | 'request'>;
  tapPool?: Pick<TapPool, 'leases'>;
  /** Present when tap networking is wired in (a root helper and a TAP pool). */
  network?: object;
  helperSocket?: string;
  /** The helper runs as a service (not as this daemon's child): `--net auto` then picks tap. */
  helperIsService?: boolean;
  /** The live inspector (`daemon start --inspect`), when served. */
  inspector?: Pick<InspectorServer, 'port'>;
  /** The warm pool (config warmPool): made and started by the daemon, stopped when it stops. */
  warmPool?: Pick<WarmPool, 'claim' | 'status'>;
  startedAt: number;
  stop(): Promise<void>;
}

export interface HandlerDeps {
  version: string;
  commit: string;
  drivers: Record<string, VmmDriver | undefined>;
  log: (line: string) => void;
}
