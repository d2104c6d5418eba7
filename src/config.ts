/** banger's configuration file ($BANGER_HOME/config.json), validated; every key optional. */
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { BangerError } from './errors.js';

export const configSchema = z.strictObject({
  /** host path → path under /root in the guest, copied into every new work disk */
  fileSync: z.array(z.strictObject({ host: z.string().min(1), guest: z.string().min(1) })).default([]),
  firecrackerBin: z.string().optional(),
  defaultImage: z.string().default('debian-bookworm'),
  defaultVcpus: z.number().int().min(1).default(2),
  defaultMemoryMiB: z.number().int().min(128).default(1024),
  defaultDisk: z.string().default('8G'),
  bootTimeoutMs: z.number().int().min(1000).default(180_000),
  stopTimeoutMs: z.number().int().min(100).default(15_000),
  tapPoolSize: z.number().int().min(0).max(64).default(2),
  bridge: z.string().default('banger0'),
  subnet: z.string().default('172.30.0.0/24'),
  nat: z.boolean().default(false),
  /** What `--net auto` prefers when the daemon runs its own root helper (as root): user unless set to tap. */
  defaultNet: z.enum(['user', 'tap']).default('user'),
  kvmProbeTimeoutMs: z.number().int().min(1000).default(20_000),
  /** Workspace export: a patch larger than this is refused (PatchTooLarge) and nothing is written. */
  maxPatchBytes: z.number().int().min(1).default(2 ** 30),
  /** Workspace export: the whole export, guest command included. */
  exportTimeoutMs: z.number().int().min(1000).default(600_000),
  /** VMs booted ahead of time per kind; `vm create` / `vm run` of that kind takes one (src/daemon/warm-pool.ts). */
  warmPool: z
    .array(z.strictObject({ image: z.string().min(1), size: z.number().int().min(0).max(16), vcpus: z.number().int().min(1).optional(), memoryMiB: z.number().int().min(128).optional() }))
    .default([]),
  /**
   * User networking's backend. isolated (default): QEMU's slirp in a user + network namespace of its own whose way
   * out is slirp4netns `--disable-host-loopback`, the host's addresses and private ranges refused (Debian package
   * slirp4netns; README, Security model). slirp: QEMU's own in the host's namespace; its gateway 10.0.2.2 is the
   * host's loopback, so a guest reaches localhost services.
   * passt: `--no-map-gw`; the passt Debian 12 ships (2023-03) loses forwarded connections and crashes under load.
   */
  userNet: z.enum(['isolated', 'slirp', 'passt']).default('isolated'),
  /** The workspace cache's budget in bytes on the host (least recently used entries go first); 0 turns it off. */
  workspaceCacheBytes: z.number().int().min(0).default(20 * 2 ** 30),
});

export type Config = z.infer<typeof configSchema>;

export function loadConfig(path: string, env: NodeJS.ProcessEnv = process.env): Config {
  let raw: unknown = {};
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new BangerError('usage', `cannot read the config file ${path}: ${(e as Error).message}`, 'fix the JSON or remove the file to use the defaults');
    }
  }
  const parsed = configSchema.safeParse(raw);
  if (!parsed.success) {
    throw new BangerError('usage', `invalid config file ${path}: ${parsed.error.issues.map((i) => `${i.path.join('.') || 'config'}: ${i.message}`).join('; ')}`, 'fix the named keys');
  }
  const cfg = parsed.data;
  if (env.BANGER_BOOT_TIMEOUT_MS) cfg.bootTimeoutMs = Number(env.BANGER_BOOT_TIMEOUT_MS);
  return cfg;
}
