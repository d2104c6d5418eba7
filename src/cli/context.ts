/** What every command gets: --json, the RPC call helper with progress, and output helpers. */
import { BangerError } from '../errors.js';
import type { MethodName, ParamsOf } from '../rpc/protocol.js';
import { connectDaemon } from './connect.js';
import { progressPrinter } from './output.js';

export interface GlobalArgs {
  json?: boolean;
  quiet?: boolean;
}

export async function call<M extends MethodName>(method: M, params: ParamsOf<M>, opts: { quiet?: boolean; onStream?: (d: unknown) => void } = {}): Promise<any> {
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
