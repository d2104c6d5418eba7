import { connectDaemon } from '../connect.js';
import type { GlobalArgs } from '../context.js';
import { c, stateColor, table } from '../output.js';

export async function runInspect(a: GlobalArgs & { vm?: string }): Promise<void> {
  {
    {
      const client = await connectDaemon();
      const onStream = (d: any) => {
        if (a.json) return process.stdout.write(JSON.stringify(d) + '\n');
        if (d.type === 'hello') {
          process.stdout.write(
            (d.vms.length ? table([['VM', 'ID', 'STATE'], ...d.vms.map((v: any) => [c.bold(v.name), v.id, stateColor(v.state)])]) : 'no VMs yet') + `\n${c.dim('watching transitions (Ctrl-C to stop)')}\n`,
          );
          return;
        }
        process.stdout.write(`${c.dim(d.time)} ${d.actor.padEnd(22)} ${d.event.padEnd(34)} ${d.from ?? '∅'} → ${stateColor(d.to)}\n`);
      };
      process.on('SIGINT', () => {
        client.close();
        process.exit(0);
      });
      await client.call('inspect.subscribe', { vm: a.vm }, { onStream });
    }
  }
}
