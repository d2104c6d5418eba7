import { lstat, realpath, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, resolve, sep } from 'node:path';
import { z } from 'zod';
import { BangerError } from '../errors.js';
import type { JailResult } from '../host/vmm/firecracker/firecracker.js';
import type { FirewallStatus } from '../host/net/firewall.js';
import { ancestors, unsafeBecause } from '../host/install/ownership.js';
import { TAP_NAME_RE, UNICAST_MAC_RE, parseCidr } from '../host/net/net.js';

/**
 * The root helper's wire protocol and the rules every argument must pass before anything runs as root.
 *
 * One JSON object per line in each direction:
 *   request   {"id": 1, "verb": "tap.create", "args": {"name": "bgtapk3f9a1b2c3"}}
 *   response  {"id": 1, "ok": true, "result": {...}}
 *             {"id": 1, "ok": false, "error": {"kind": "invalid_params", "message": "...", "hint": "..."}}
 *
 * Every value that reaches a privileged command is a plain identifier matched against banger's own prefixes,
 * a bounded integer, or a path that resolves (symlinks followed) under the configured state directory.
 * Device names are drawn from [0-9a-z] after a fixed prefix, so no shell metacharacter can get through by
 * construction (and no shell is ever used: commands run with argument vectors).
 *
 * No request names a user, a group, a bridge or an address range. Who asks is the `Caller`, fixed by the
 * socket the request arrived on (one socket per owner, its uid in the helper's own config); the bridge, its
 * CIDR and NAT are the helper's configuration too. Every verb's handler gets the Caller.
 */

export const PROTOCOL_VERSION = 2;
/** Longest request line the helper reads; a longer one closes the connection. */
export const MAX_LINE_BYTES = 64 * 1024;
/** uids and gids: non-negative integers below 2^31. */
export const MAX_ID = 2 ** 31 - 1;

export const VERBS = [
  'ping',
  'tap.create',
  'tap.delete',
  'tap.list',
  'bridge.ensure',
  'firecracker.jail',
  'firecracker.unjail',
  // tap guests' firewall (issue 9)
  'firewall.set',
  'firewall.clear',
  'firewall.status',
] as const;
export type Verb = (typeof VERBS)[number];

/**
 * Who is asking, fixed by the socket the request came in on (one socket per owner, from the helper's own
 * config), never read from a request. Every verb acts only on this owner's objects.
 */
export interface Caller {
  /** The owner's uid: TAPs are made for it, jailed Firecrackers run as it, files it links must be its own. */
  uid: number;
  gid: number;
  /** The owner's banger state directory: every path argument must resolve inside it. */
  stateDir: string;
  /** ownerTag(uid, stateDir): the mark every TAP name of this owner carries. */
  tag: string;
}

const tapName = z
  .string({ error: typeError('a string') })
  .regex(TAP_NAME_RE, { error: (i) => `${JSON.stringify(i.input)} is not a banger TAP name ("bgtap" + 1-10 of [0-9a-z], 15 characters at most)` });

const macSchema = z
  .string({ error: typeError('a string') })
  .regex(UNICAST_MAC_RE, { error: (i) => `${describe(i.input)} is not a unicast MAC (six lowercase hex pairs joined by ":")` });

const ipv4Schema = z.string({ error: typeError('a string') }).refine((v) => /^(\d{1,3})(\.\d{1,3}){3}$/.test(v) && !cidrError(`${v}/32`), {
  error: (i) => `${describe(i.input)} is not an IPv4 address`,
});

/** A CIDR a guest may reach although it is private (`--allow`): network address and prefix, nothing else. */
const allowCidrSchema = z.string({ error: typeError('a string') }).refine((v) => !cidrError(v) && /^[0-9.]+\/\d{1,2}$/.test(v), {
  error: (i) => `${describe(i.input)} is not an IPv4 CIDR like 192.168.1.0/24`,
});

function cidrError(v: string): string | undefined {
  try {
    parseCidr(v);
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}

/** A path argument: absolute, no `..` segment, no NUL, bounded. It is resolved against the state directory later. */
const pathSchema = z
  .string({ error: typeError('a string') })
  .min(1, { error: 'must not be empty' })
  .max(4096, { error: 'is too long' })
  .refine((p) => !p.includes('\0'), { error: 'contains a NUL byte' })
  .refine((p) => isAbsolute(p), { error: (i) => `${JSON.stringify(i.input)} is not an absolute path` })
  .refine((p) => !p.split('/').includes('..'), { error: (i) => `${JSON.stringify(i.input)} contains a ".." segment` });

/** Firecracker's and the jailer's instance id: alphanumerics and hyphens, 64 at most. */
export const FIRECRACKER_ID_RE = /^[A-Za-z0-9-]{1,64}$/;

const firecrackerIdSchema = z
  .string({ error: typeError('a string') })
  .regex(FIRECRACKER_ID_RE, { error: (i) => `${JSON.stringify(i.input)} is not a Firecracker id (1-64 of [A-Za-z0-9-])` });

export const verbSchemas = {
  ping: z.strictObject({}),
  /** A TAP for the caller (its uid and gid), on the helper's bridge. */
  'tap.create': z.strictObject({ name: tapName }),
  'tap.delete': z.strictObject({ name: tapName }),
  /** The caller's TAPs. */
  'tap.list': z.strictObject({}),
  /** The helper's bridge, with its configured CIDR and NAT. */
  'bridge.ensure': z.strictObject({}),
  'firecracker.jail': z.strictObject({
    id: firecrackerIdSchema,
    vmDir: pathSchema,
    /** The Firecracker binary; the jailer copies it into the chroot and runs it as the caller's uid:gid. */
    binary: pathSchema,
    kernel: pathSchema,
    initrd: pathSchema.optional(),
    rootDisk: pathSchema,
    workDisk: pathSchema,
  }),
  /** Remove an exited instance's chroot (it holds hard links to the VM's disks): the caller's jails only. */
  'firecracker.unjail': z.strictObject({ id: firecrackerIdSchema }),
  // The firewall: a VM is its TAP, its address, its MAC and its policy; nothing else is taken from the request.
  'firewall.set': z.strictObject({
    tap: tapName,
    ip: ipv4Schema,
    mac: macSchema,
    egress: z.enum(['internet', 'none'], { error: (i) => `must be "internet" or "none", got ${describe(i.input)}` }),
    allowPeers: z.boolean({ error: typeError('a boolean') }),
    allow: z.array(allowCidrSchema, { error: typeError('an array of IPv4 CIDRs') }).max(64, { error: 'has more than 64 CIDRs' }),
  }),
  'firewall.clear': z.strictObject({ tap: tapName }),
  'firewall.status': z.strictObject({}),
} satisfies Record<Verb, z.ZodType>;

export type VerbArgs<V extends Verb> = z.infer<(typeof verbSchemas)[V]>;

export interface TapListEntry {
  name: string;
  up: boolean;
  operstate?: string;
  master?: string;
  mac?: string;
}

/** What each verb answers. */
export interface VerbResults {
  /** `uid`: the helper's own; `owner`: the caller this socket serves; `release`: the banger release it runs. */
  ping: { version: number; release: string; pid: number; uid: number; owner: { uid: number; tag: string } };
  'tap.create': { name: string; created: boolean };
  'tap.delete': { name: string; deleted: boolean };
  'tap.list': { taps: TapListEntry[] };
  'bridge.ensure': { name: string; cidr: string; created: boolean; addressAdded: boolean; nat?: 'nft' | 'iptables' };
  /** pid, the chroot, the API socket's host path and the paths as Firecracker sees them inside the jail. */
  'firecracker.jail': JailResult;
  'firecracker.unjail': { removed: string[] };
  'firewall.set': FirewallStatus;
  'firewall.clear': FirewallStatus;
  'firewall.status': FirewallStatus;
}

export interface Request {
  id: number | string;
  verb: string;
  args: unknown;
}

export type ErrorBody = { kind: string; message: string; hint?: string };
export type Response =
  | { id: number | string | null; ok: true; result: unknown }
  | { id: number | string | null; ok: false; error: ErrorBody };

const envelopeSchema = z.strictObject({
  id: z.custom<number | string>(
    (id) => (typeof id === 'number' && Number.isSafeInteger(id) && id >= 0) || (typeof id === 'string' && id.length <= 64),
    { error: (i) => (i.input === undefined ? 'is required' : `must be a non-negative integer or a string of 64 characters at most, got ${describe(i.input)}`) },
  ),
  verb: z.string({ error: typeError('a string') }).max(64, { error: 'is longer than 64 characters' }),
  args: z.unknown().optional(),
});

/** Error text for a wrong or missing value (zod hands the input to this function, not to the issue). */
function typeError(expected: string) {
  return (i: { input?: unknown }) => (i.input === undefined ? 'is required' : `must be ${expected}, got ${describe(i.input)}`);
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'number') return Number.isInteger(v) ? `the number ${v}` : `the non-integer ${v}`;
  if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)}`;
  return typeof v;
}

export const refusal = (verb: string, why: string, hint?: string) =>
  new BangerError('invalid_params', `refused ${verb}: ${why}`, hint);

/** Parse one request line (JSON, the envelope). Throws `parse` or `invalid_request`; the id is kept when readable. */
export function parseRequestLine(line: string): Request {
  let data: unknown;
  try {
    data = JSON.parse(line);
  } catch (e) {
    throw new BangerError('parse', `refused request: not JSON (${(e as Error).message})`);
  }
  const r = envelopeSchema.safeParse(data);
  if (!r.success) {
    throw new BangerError('invalid_request', `refused request: ${formatIssues(r.error)}`, 'a request is {"id": N, "verb": "...", "args": {...}}');
  }
  return { id: r.data.id, verb: r.data.verb, args: r.data.args ?? {} };
}

function formatIssues(err: z.ZodError): string {
  return err.issues
    .map((i) => {
      if (i.code === 'unrecognized_keys') return `unknown field${i.keys.length > 1 ? 's' : ''} ${i.keys.map((k) => JSON.stringify(k)).join(', ')}`;
      const where = i.path.length ? i.path.join('.') : 'args';
      return `${where} ${i.message}`;
    })
    .join('; ');
}

export const isVerb = (v: string): v is Verb => (VERBS as readonly string[]).includes(v);

/** What validation needs of the caller: its state directory (every path argument must resolve under it). */
export type ValidationPolicy = Pick<Caller, 'stateDir'>;

export type ValidatedRequest = { [V in Verb]: { verb: V; args: VerbArgs<V> } }[Verb];

/** Schema checks only (synchronous): unknown verbs, unknown fields, types, names, CIDRs. */
export function parseArgs<V extends Verb>(verb: V, args: unknown): VerbArgs<V>;
export function parseArgs(verb: string, args: unknown): VerbArgs<Verb>;
export function parseArgs(verb: string, args: unknown): unknown {
  if (!isVerb(verb)) {
    throw new BangerError('method_not_found', `refused verb ${JSON.stringify(verb)}: not one the root helper accepts`, `accepted verbs: ${VERBS.join(', ')}`);
  }
  const r = verbSchemas[verb].safeParse(args);
  if (!r.success) throw refusal(verb, formatIssues(r.error));
  return r.data;
}

/**
 * Full validation: the schema, then every path resolved (realpath, following symlinks) and required to lie
 * strictly inside the state directory, with the expected file type. The returned args carry resolved paths,
 * which are what the handlers use. A path could still be swapped for a symlink between this check and its
 * use by a user who owns the state directory; handlers act on the resolved path and never follow a link
 * at the last component (lchown), which bounds what such a race can reach.
 */
export async function validateRequest(verb: string, args: unknown, policy: ValidationPolicy): Promise<ValidatedRequest> {
  const parsed = parseArgs(verb, args);
  const v = verb as Verb;
  switch (v) {
    case 'firecracker.jail': {
      const a = parsed as VerbArgs<'firecracker.jail'>;
      const under = (field: string, p: string, kind: 'file' | 'dir') => resolveUnder(v, field, p, policy.stateDir, kind);
      const vmDir = await under('vmDir', a.vmDir, 'dir');
      const kernel = await under('kernel', a.kernel, 'file');
      const initrd = a.initrd === undefined ? undefined : await under('initrd', a.initrd, 'file');
      const rootDisk = await under('rootDisk', a.rootDisk, 'file');
      const workDisk = await under('workDisk', a.workDisk, 'file');
      const binary = await checkFirecrackerBinary(v, a.binary);
      return { verb: v, args: { ...a, binary, vmDir, kernel, initrd, rootDisk, workDisk } };
    }
    default:
      return { verb: v, args: parsed } as ValidatedRequest;
  }
}

/** realpath(p) must exist, be of the given kind and lie strictly inside realpath(stateDir). */
export async function resolveUnder(verb: string, field: string, p: string, stateDir: string, kind: 'file' | 'dir'): Promise<string> {
  let root: string;
  try {
    root = await realpath(resolve(stateDir));
  } catch {
    throw refusal(verb, `the state directory ${stateDir} does not exist`, 'start the helper with --state-dir pointing at banger\'s state directory');
  }
  let real: string;
  try {
    real = await realpath(p);
  } catch (e) {
    throw refusal(verb, `${field} ${JSON.stringify(p)} does not exist (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  if (!(real + sep).startsWith(root + sep) || real === root) {
    const how = real === resolve(p) ? '' : ` (it resolves to ${real})`;
    throw refusal(verb, `${field} ${JSON.stringify(p)} is not inside the state directory ${root}${how}`);
  }
  const st = await stat(real);
  if (kind === 'dir' && !st.isDirectory()) throw refusal(verb, `${field} ${JSON.stringify(p)} is not a directory`);
  if (kind === 'file' && !st.isFile()) throw refusal(verb, `${field} ${JSON.stringify(p)} is not a regular file`);
  return real;
}

/**
 * The Firecracker binary the jailer will copy and run as the (non-root) uid: an existing regular executable,
 * named like firecracker (the jailer insists), writable by nobody but root, in directories only root can change.
 */
async function checkFirecrackerBinary(verb: string, p: string): Promise<string> {
  let real: string;
  try {
    real = await realpath(p);
  } catch {
    throw refusal(verb, `binary ${JSON.stringify(p)} does not exist`);
  }
  const st = await stat(real);
  if (!st.isFile()) throw refusal(verb, `binary ${JSON.stringify(p)} is not a regular file`);
  if ((st.mode & 0o111) === 0) throw refusal(verb, `binary ${JSON.stringify(p)} is not executable`);
  if (st.uid !== 0 || (st.mode & 0o022) !== 0) {
    throw refusal(verb, `binary ${JSON.stringify(p)} must be owned by root and writable only by root`, `chown root:root ${p} && chmod 755 ${p}`);
  }
  if (!basename(real).includes('firecracker')) throw refusal(verb, `binary ${JSON.stringify(p)} is not named like firecracker`);
  // Its directories too: whoever can write one of them can swap the binary between this check and the launch.
  for (const dir of ancestors(dirname(real))) {
    const why = unsafeBecause(await lstat(dir));
    if (why) throw refusal(verb, `binary ${JSON.stringify(p)} lies in ${dir}, which is not safe for what root runs (${why})`, `install firecracker in a root-owned directory (e.g. /usr/local/bin), or chown root ${dir} && chmod go-w ${dir}`);
  }
  return real;
}
