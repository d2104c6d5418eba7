/**
 * One vm.exec on a daemon connection the caller holds: the command's stdout and stderr stream to ours and our
 * stdin is forwarded as it comes (src/cli/stdin-forward.ts). It settles when the command ends, whether or not our
 * stdin has ended. `vm exec` and `vm run -- CMD` both run commands this way, over the VM's pooled SSH connection.
 */
import type { BangerClient } from '../index.js';
import type { ParamsOf, ResultOf } from '../rpc/protocol.js';
import type { OutputChunk } from '../rpc/types.js';
import { forwardStdin, newInputId } from './stdin-forward.js';

const write = (c: OutputChunk) => (c.stream === 'stdout' ? process.stdout : process.stderr).write(Buffer.from(c.data, 'base64'));

export async function execStreaming(client: Pick<BangerClient, 'call'>, params: Omit<ParamsOf<'vm.exec'>, 'inputId' | 'stdin'>): Promise<ResultOf<'vm.exec'>> {
  const inputId = newInputId();
  const result = client.call('vm.exec', { ...params, inputId }, { onStream: write });
  const input = forwardStdin(client, inputId);
  // A forwarding failure is a lost daemon connection, which the exec's own answer reports.
  input.done.catch(() => {});
  try {
    return await result;
  } finally {
    input.stop();
  }
}
