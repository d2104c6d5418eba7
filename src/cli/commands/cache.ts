/** banger cache list | prune [KEY]: the workspace cache (prepared work disks kept on the host). */
import type { Argv } from 'yargs';
import { call, out, type GlobalArgs } from '../context.js';
import { c } from '../output.js';

interface PruneArgs extends GlobalArgs {
  key?: string;
}

const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;

export function cacheCommands(y: Argv<GlobalArgs>) {
  return y
    .command('list', 'list the workspace cache, most recently used first', (a) => a, async (a) => {
      const r = await call('cache.list', {});
      out(a, r, () => {
        const head = `${r.entries.length} entr${r.entries.length === 1 ? 'y' : 'ies'}, ${mib(r.totalBytes)} of ${mib(r.budgetBytes)} (workspaceCacheBytes)`;
        const rows = r.entries.map((e) =>
          `${e.key.slice(0, 12)}  ${e.sourcePath} @ ${e.headCommit.slice(0, 12)}  ${e.mode} → ${e.guestPath}  ${e.image}  ${mib(e.bytes)}  ${e.hits} hit(s)  ${c.dim(`used ${e.lastUsedAt}`)}`);
        return [head, ...rows].join('\n');
      });
    })
    .command('prune [key]', 'remove one entry (a key or its first 8+ hex digits), or every entry', (a) => a.positional('key', { type: 'string' }), async (a: PruneArgs) => {
      const r = await call('cache.prune', { key: a.key });
      out(a, r, () => `removed ${r.removed.length} entr${r.removed.length === 1 ? 'y' : 'ies'}`);
    })
    .demandCommand(1, 'say list or prune');
}
