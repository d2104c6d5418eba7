/** cache.list and cache.prune: the workspace cache on the host (src/host/guest/workspace-cache.ts). */
import type { Handlers } from '../../rpc/server.js';
import type { CacheEntryView } from '../../rpc/types.js';
import type { CacheEntry } from '../../host/guest/workspace-cache.js';
import type { DaemonServices } from '../services.js';
import { workspaceCacheOf } from '../workspace-cache.js';

export function cacheHandlers(d: DaemonServices): Pick<Handlers, 'cache.list' | 'cache.prune'> {
  const cache = () => workspaceCacheOf(d.layout, d.config);
  return {
    'cache.list': async () => {
      const entries = await cache().list();
      return { budgetBytes: d.config.workspaceCacheBytes, totalBytes: entries.reduce((n, e) => n + e.bytes, 0), entries: entries.map(view) };
    },
    'cache.prune': async (p) => ({ removed: await cache().prune({ key: p.key }) }),
  };
}

function view(e: CacheEntry): CacheEntryView {
  return {
    key: e.key,
    sourcePath: e.parts.sourcePath,
    headCommit: e.parts.headCommit,
    mode: e.parts.mode,
    guestPath: e.parts.guestPath,
    image: e.parts.image.name,
    bytes: e.bytes,
    sizeBytes: e.sizeBytes,
    createdAt: e.createdAt,
    lastUsedAt: e.lastUsedAt,
    hits: e.hits,
  };
}
