/**
 * banger as a library: a typed client of the owner daemon, the same one the CLI uses.
 *
 *   import { connect } from 'banger';
 *   const banger = await connect();
 *   try {
 *     const vm = await banger.call('vm.create', { name: 'scratch' }, { onProgress: (p) => console.error(p.stage) });
 *     console.log(vm.state, (await banger.vms()).length);
 *   } finally {
 *     banger.close();
 *   }
 *
 * Every method's params and result are typed by the protocol (src/rpc/protocol.ts, src/rpc/types.ts). This
 * module loads no daemon code: connecting needs a running daemon (`banger daemon start`).
 */
import { BangerError } from './errors.js';
import { layout } from './paths.js';
import { RpcClient, type CallOptions } from './rpc/client.js';
import type { MethodName, ParamsOf, ResultOf } from './rpc/protocol.js';
import type { DaemonStatus, HealthView, ImageView, VmDetail, VmView } from './rpc/types.js';

export type * from './rpc/types.js';
export type { MethodName, ParamsOf, ResultOf, StreamOf } from './rpc/protocol.js';
export type { CallOptions } from './rpc/client.js';
export { BangerError } from './errors.js';

export interface ConnectOptions {
  /** The daemon socket; default the one of this user's BANGER_HOME (or of `env`). */
  socket?: string;
  /** The environment the default socket is worked out from (BANGER_HOME, BANGER_RUNTIME_DIR, XDG_RUNTIME_DIR). */
  env?: NodeJS.ProcessEnv;
  /** How long to wait for the connection, in ms (default 5000). */
  timeoutMs?: number;
}

/** One connection to the daemon. Calls may run at once on it; close it when done. */
export class BangerClient {
  constructor(private readonly rpc: RpcClient) {}

  /** Any method of the protocol, typed by its params, result and stream. */
  call<M extends MethodName>(method: M, params: ParamsOf<M>, opts: CallOptions<M> = {}): Promise<ResultOf<M>> {
    return this.rpc.call(method, params, opts);
  }

  status(): Promise<DaemonStatus> {
    return this.call('daemon.status', {});
  }

  vms(): Promise<VmView[]> {
    return this.call('vm.list', {});
  }

  /** One VM by id, unique id prefix or name. */
  vm(ref: string): Promise<VmDetail> {
    return this.call('vm.show', { vm: ref });
  }

  /** A running VM's health, from its guest agent. */
  health(ref: string): Promise<HealthView> {
    return this.call('vm.health', { vm: ref });
  }

  images(): Promise<ImageView[]> {
    return this.call('image.list', {});
  }

  close(): void {
    this.rpc.close();
  }
}

/** Connect to the running daemon; a BangerError (kind host) says so when none answers. */
export async function connect(opts: ConnectOptions = {}): Promise<BangerClient> {
  const socket = opts.socket ?? layout(opts.env).socket;
  try {
    return new BangerClient(await RpcClient.connect(socket, opts.timeoutMs));
  } catch (e) {
    if (e instanceof BangerError) throw e;
    throw new BangerError('host', `the banger daemon is not running (no answer on ${socket}: ${(e as Error).message})`, 'banger daemon start');
  }
}
