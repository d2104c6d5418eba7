/**
 * The root helper's own configuration: whom each socket serves and the bridge it manages. It is what the
 * helper trusts, so it comes from a root-owned file (written by `banger system install`) or from the command
 * line of whoever starts the helper as root (a root daemon's child helper) — never from a request.
 *
 *   {
 *     "bridge": "banger0", "cidr": "172.30.0.1/24", "nat": false,
 *     "owners": [{ "name": "ann", "uid": 1000, "gid": 1000, "stateDir": "/home/ann/.local/share/banger",
 *                  "socket": "/run/banger-roothelper/helper.sock" }]
 *   }
 */
import { readFileSync } from 'node:fs';
import { lstat, readFile } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { z } from 'zod';
import { BangerError } from '../errors.js';
import { ancestors, unsafeBecause } from '../host/install/ownership.js';
import { BRIDGE_NAME_RE, bridgeCidrProblem, DEFAULT_BRIDGE, gatewayAddress, parseCidr } from '../host/net/net.js';
import { MAX_ID } from './protocol.js';
import { DEFAULT_BRIDGE_CIDR, type HelperNetwork } from './server.js';

const id = z.number().int().min(0).max(MAX_ID);
const absolute = z.string().refine((p) => isAbsolute(p) && !p.includes('\0'), { error: 'must be an absolute path' });

const ownerSchema = z.strictObject({
  name: z.string().optional(),
  uid: id,
  gid: id,
  stateDir: absolute,
  socket: absolute.refine((p) => Buffer.byteLength(p) <= 107, { error: 'is longer than 107 bytes (the socket path limit)' }),
});

export const helperConfigSchema = z.strictObject({
  bridge: z.string().regex(BRIDGE_NAME_RE, { error: 'is not a banger bridge name ("banger" + 0-9 of [0-9a-z])' }).default(DEFAULT_BRIDGE),
  cidr: z
    .string()
    .default(DEFAULT_BRIDGE_CIDR)
    .superRefine((v, ctx) => {
      const problem = bridgeCidrProblem(v);
      if (problem) ctx.addIssue({ code: 'custom', message: `is not a private IPv4 /16-/30 host address: ${problem}` });
    }),
  nat: z.boolean().default(false),
  jailerBin: absolute.optional(),
  chrootBase: absolute.optional(),
  owners: z.array(ownerSchema).min(1, { error: 'must name at least one owner' }),
});

export type HelperConfig = z.infer<typeof helperConfigSchema>;
export type HelperConfigOwner = HelperConfig['owners'][number];

export function parseHelperConfig(data: unknown, where: string): HelperConfig {
  const r = helperConfigSchema.safeParse(data);
  if (!r.success) {
    const why = r.error.issues.map((i) => `${i.path.join('.') || 'config'} ${i.message}`).join('; ');
    throw new BangerError('usage', `${where}: ${why}`);
  }
  const sockets = new Set<string>();
  for (const o of r.data.owners) {
    if (sockets.has(o.socket)) throw new BangerError('usage', `${where}: two owners share the socket ${o.socket}; each owner needs its own`);
    sockets.add(o.socket);
  }
  return r.data;
}

/** Read the config file; it and every directory above it must be root-owned and writable by root only. */
export async function loadHelperConfig(path: string): Promise<HelperConfig> {
  for (const p of ancestors(path)) {
    let st;
    try {
      st = await lstat(p);
    } catch {
      throw new BangerError('not_found', `the root helper's config ${path} does not exist`, 'banger system install --owner USER writes it');
    }
    const why = p === path && st.isSymbolicLink() ? 'it is a symlink' : unsafeBecause(st);
    if (why) throw new BangerError('usage', `refused the root helper's config ${path}: ${p} is not safe (${why})`, `chown root ${p} && chmod go-w ${p}`);
  }
  let data: unknown;
  try {
    data = JSON.parse(await readFile(path, 'utf8'));
  } catch (e) {
    throw new BangerError('usage', `the root helper's config ${path} is not JSON: ${(e as Error).message}`);
  }
  return parseHelperConfig(data, path);
}

export const networkOf = (c: HelperConfig): HelperNetwork => ({ bridge: c.bridge, cidr: c.cidr, nat: c.nat });

/**
 * The config `banger system install` writes for one owner: the bridge, CIDR and NAT from the owner's
 * config.json when it has one (so the daemon and the helper agree), else banger's defaults.
 */
export function helperConfigFor(owner: HelperConfigOwner, ownerConfigPath: string): HelperConfig {
  let c: { bridge?: string; subnet?: string; nat?: boolean } = {};
  try {
    c = JSON.parse(readFileSync(ownerConfigPath, 'utf8')) as typeof c;
  } catch {
    /* none: defaults */
  }
  const cidr = c.subnet ? `${gatewayAddress(c.subnet)}/${parseCidr(c.subnet).prefix}` : undefined;
  return parseHelperConfig({ bridge: c.bridge, cidr, nat: c.nat, owners: [owner] }, ownerConfigPath);
}
