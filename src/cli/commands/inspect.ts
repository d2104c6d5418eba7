import type { InspectEvent } from '../../rpc/types.js';
import { connectDaemon } from '../connect.js';
import type { GlobalArgs } from '../context.js';
import { c, stateColor, table } from '../output.js';

export interface InspectArgs extends GlobalArgs {
  vm?: string;
}

function printer(json: boolean | undefined): (d: InspectEvent) => void {
  return (d) => {
    if (json) return void process.stdout.write(JSON.stringify(d) + '\n');
    if ('type' in d) {
      const vms = d.vms.length ? table([['VM', 'ID', 'STATE'], ...d.vms.map((v) => [c.bold(v.name), v.id, stateColor(v.state)])]) : 'no VMs yet';
      process.stdout.write(`${vms}\n${c.dim('watching transitions (Ctrl-C to stop)')}\n`);
      return;
    }
    process.stdout.write(`${c.dim(d.time)} ${d.actor.padEnd(22)} ${d.event.padEnd(34)} ${d.from ?? '∅'} → ${stateColor(d.to)}\n`);
  };
}

export async function runInspect(a: InspectArgs): Promise<void> {
  const client = await connectDaemon();
  process.on('SIGINT', () => {
    client.close();
    process.exit(0);
  });
  await client.call('inspect.subscribe', { vm: a.vm }, { onStream: printer(a.json) });
}
