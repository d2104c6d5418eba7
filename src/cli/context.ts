/** What every command gets: --json, the RPC call helper with progress, and output helpers. */
import { BangerError } from '../errors.js';
import type { MethodName, ParamsOf, ResultOf, StreamOf } from '../rpc/protocol.js';
import { connectDaemon } from './connect.js';
import { progressPrinter } from './output.js';

export interface GlobalArgs {
  json?: boolean;
  quiet?: boolean;
}

export interface CallFlags<M extends MethodName> {
  /** No progress lines on stderr. */
  quiet?: boolean;
  onStream?: (data: StreamOf<M>) => void;
}

/** One call on a connection of its own (the daemon is started when it is not running), with progress on stderr. */
export async function call<M extends MethodName>(method: M, params: ParamsOf<M>, opts: CallFlags<M> = {}): Promise<ResultOf<M>> {
  const client = await connectDaemon();
  try {
    return await client.call(method, params, { onProgress: progressPrinter(opts.quiet), onStream: opts.onStream });
  } finally {
    client.close();
  }
}

export function out(args: GlobalArgs, value: unknown, human: () => string | void): void {
  if (args.json) {
    process.stdout.write(JSON.stringify(value, null, 2) + '\n');
    return;
  }
  const s = human();
  if (typeof s === 'string' && s.length) process.stdout.write(s + '\n');
}

export function usage(message: string, hint?: string): never {
  throw new BangerError('usage', message, hint);
}
