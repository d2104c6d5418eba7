/**
 * Every RPC method is described once, here: its name and the schema of its params. The server validates
 * against these (unknown fields are rejected); the client uses the same names and types.
 */
import { z } from 'zod';
import { MEMORY_MIB, VCPUS } from './wire.js';
import type { Results, Streams } from './types.js';

export type * from './types.js';

const vmRef = z.string().min(1).max(128);
const size = z.union([z.number().int().positive(), z.string().min(1).max(32)]);

export const createParams = z.strictObject({
  name: z.string().optional(),
  image: z.string().optional(),
  vcpus: z.number().int().min(VCPUS.min).max(VCPUS.max).optional(),
  memoryMiB: z.number().int().min(MEMORY_MIB.min).max(MEMORY_MIB.max).optional(),
  disk: size.optional(),
  vmm: z.enum(['auto', 'firecracker', 'qemu']).optional(),
  net: z.enum(['auto', 'tap', 'user']).optional(),
  // tap guests' isolation (issue 9): egress, reaching other VMs, private CIDRs let through
  egress: z.enum(['internet', 'none']).optional(),
  allowPeers: z.boolean().optional(),
  allow: z.array(z.string().min(1).max(32)).max(64).optional(),
  /** `[HOSTADDR:]HOSTPORT:GUESTPORT` each (src/rpc/publish.ts); the daemon parses them. */
  publish: z.array(z.string().min(1).max(64)).max(64).optional(),
  start: z.boolean().optional(),
  wait: z.boolean().optional(),
  /** The workspace this VM is made for: a cached work disk for it is cloned (vm.workspace.prepare then streams the delta). */
  workspace: z.strictObject({ source: z.string().min(1), mode: z.enum(['shallow', 'full_history', 'full_copy']).optional(), guestPath: z.string().optional() }).optional(),
});

export const prepareParams = z.strictObject({
  vm: vmRef,
  source: z.string().min(1),
  guestPath: z.string().optional(),
  branch: z.string().optional(),
  from: z.string().optional(),
  mode: z.enum(['shallow', 'full_history', 'full_copy']).optional(),
  readOnly: z.boolean().optional(),
  replace: z.boolean().optional(),
});

export const exportParams = z.strictObject({
  vm: vmRef,
  guestPath: z.string().optional(),
  baseCommit: z.string().optional(),
  /** An absolute path the daemon writes the patch to (whole or not at all); the result then carries no patch. */
  output: z.string().min(1).optional(),
});

// ---- guest sessions, exec and health (issue 11)
/** A session name: one word a shell never splits or expands, and part of a systemd unit name. */
export const SESSION_NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const sessionName = z.string().regex(SESSION_NAME, 'a session name is 1-32 characters of a-z 0-9 _ - starting with a letter or digit');
const envMap = z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]{0,127}$/, 'environment names are letters, digits and _'), z.string().max(65536));
const guestArgv = z.array(z.string().max(65536)).min(1).max(4096);
const sessionRef = { vm: vmRef, session: sessionName };
const execInputId = z.string().regex(/^[A-Za-z0-9_-]{16,64}$/, 'an input id is 16-64 characters of A-Z a-z 0-9 _ -');
/** The most bytes one guest.session.send carries. */
export const SEND_LIMIT_BYTES = 512 * 1024;

export const sessionMethods = {
  'guest.session.start': z.strictObject({ vm: vmRef, name: sessionName.optional(), pipe: z.boolean().optional(), cwd: z.string().min(1).max(4096).optional(), env: envMap.optional(), argv: guestArgv }),
  'guest.session.list': z.strictObject({ vm: vmRef }),
  'guest.session.show': z.strictObject(sessionRef),
  'guest.session.send': z.strictObject({ ...sessionRef, data: z.string(), encoding: z.enum(['utf8', 'base64']).optional() }),
  'guest.session.attach': z.strictObject({ ...sessionRef, holder: z.string().min(1).max(200) }),
  'guest.session.logs': z.strictObject({ ...sessionRef, stderr: z.boolean().optional(), follow: z.boolean().optional(), offset: z.number().int().min(0).optional() }),
  'guest.session.kill': z.strictObject({ ...sessionRef, signal: z.string().regex(/^(SIG)?[A-Z0-9+]{2,10}$/, 'a signal name such as TERM, KILL, INT').optional() }),
  /** stdin: all of it, base64. Or inputId: it follows as vm.exec.input calls on the same connection. Neither: none. */
  'vm.exec': z.strictObject({ vm: vmRef, argv: guestArgv, cwd: z.string().min(1).max(4096).optional(), env: envMap.optional(), timeoutMs: z.number().int().positive().optional(), stdin: z.string().optional(), inputId: execInputId.optional() }),
  /** A chunk (base64) of a running vm.exec's stdin, and/or its end; answered once the chunk is taken (flow control). */
  'vm.exec.input': z.strictObject({ inputId: execInputId, data: z.string().max(1024 * 1024).optional(), end: z.boolean().optional() }),
  'vm.health': z.strictObject({ vm: vmRef }),
} as const;
// ---- end guest sessions

export const methods = {
  'daemon.status': z.strictObject({}),
  'daemon.stop': z.strictObject({}),
  'doctor.run': z.strictObject({}),
  'image.pull': z.strictObject({ name: z.string(), mirror: z.string().optional(), force: z.boolean().optional() }),
  'image.import': z.strictObject({ name: z.string(), rootfs: z.string(), kernel: z.string(), initrd: z.string().optional() }),
  'image.list': z.strictObject({}),
  'image.show': z.strictObject({ name: z.string() }),
  'image.delete': z.strictObject({ name: z.string() }),
  'vm.create': createParams,
  'vm.start': z.strictObject({ vm: vmRef, wait: z.boolean().optional() }),
  'vm.stop': z.strictObject({ vm: vmRef, wait: z.boolean().optional() }),
  'vm.restart': z.strictObject({ vm: vmRef, wait: z.boolean().optional() }),
  'vm.delete': z.strictObject({ vm: vmRef, wait: z.boolean().optional() }),
  'vm.set': z.strictObject({ vm: vmRef, vcpus: z.number().int().min(VCPUS.min).max(VCPUS.max).optional(), memoryMiB: z.number().int().min(MEMORY_MIB.min).max(MEMORY_MIB.max).optional(), disk: size.optional() }),
  /** healthy: running, and the guest agent answers GET /healthz. */
  'vm.wait': z.strictObject({ vm: vmRef, state: z.enum(['running', 'stopped', 'deleted', 'healthy']), timeoutMs: z.number().int().positive().optional() }),
  'vm.list': z.strictObject({}),
  'vm.show': z.strictObject({ vm: vmRef }),
  'vm.events': z.strictObject({ vm: vmRef }),
  'vm.logs': z.strictObject({ vm: vmRef, follow: z.boolean().optional(), serial: z.boolean().optional(), afterSeq: z.number().int().optional() }),
  'vm.ssh': z.strictObject({ vm: vmRef, wait: z.boolean().optional() }),
  'vm.workspace.prepare': prepareParams,
  'vm.workspace.export': exportParams,
  'cache.list': z.strictObject({}),
  'cache.prune': z.strictObject({ key: z.string().optional() }),
  'inspect.subscribe': z.strictObject({ vm: vmRef.optional() }),
  ...sessionMethods,
  // ---- snapshots, restore and fork (issue 12)
  'vm.snapshot': z.strictObject({ vm: vmRef, name: z.string().optional(), stop: z.boolean().optional() }),
  'vm.restore': z.strictObject({ snapshot: vmRef, name: z.string().optional() }),
  'vm.fork': z.strictObject({ source: vmRef, count: z.number().int().min(1).max(32).optional(), namePrefix: z.string().optional() }),
  'snapshot.list': z.strictObject({}),
  'snapshot.show': z.strictObject({ snapshot: vmRef }),
  'snapshot.delete': z.strictObject({ snapshot: vmRef }),
} as const;

export type MethodName = keyof typeof methods;
/** What a call of M sends (after defaults: the schema's output). */
export type ParamsOf<M extends MethodName> = z.infer<(typeof methods)[M]>;
/** What a call of M answers. */
export type ResultOf<M extends MethodName> = Results[M];
/** What M sends as `stream` notifications while it runs (never for a method that streams nothing). */
export type StreamOf<M extends MethodName> = M extends keyof Streams ? Streams[M] : never;

// Every method has exactly one result type, and nothing else has one: a method added to `methods` without
// its entry in Results (src/rpc/types.ts), or the other way round, stops the build here.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const everyMethodHasAResult: Same<MethodName, keyof Results> = true;
void everyMethodHasAResult;

export interface RpcRequest {
  jsonrpc: '2.0';
  id?: number | string | null;
  method: string;
  params?: unknown;
}

export interface RpcErrorObject {
  code: number;
  message: string;
  data?: { kind: string; hint?: string };
}

export interface RpcResponse {
  jsonrpc: '2.0';
  id: number | string | null;
  result?: unknown;
  error?: RpcErrorObject;
}

export { PROGRESS_METHOD, STREAM_METHOD } from './wire.js';
