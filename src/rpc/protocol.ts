/**
 * Every RPC method is described once, here: its name and the schema of its params. The server validates
 * against these (unknown fields are rejected); the client uses the same names and types.
 */
import { z } from 'zod';
import type { Results, Streams } from './types.js';

export type * from './types.js';

const vmRef = z.string().min(1).max(128);
const size = z.union([z.number().int().positive(), z.string().min(1).max(32)]);

export const createParams = z.strictObject({
  name: z.string().optional(),
  image: z.string().optional(),
  vcpus: z.number().int().min(1).max(64).optional(),
  memoryMiB: z.number().int().min(128).max(262144).optional(),
  disk: size.optional(),
  vmm: z.enum(['auto', 'firecracker', 'qemu']).optional(),
  net: z.enum(['auto', 'tap', 'user']).optional(),
  start: z.boolean().optional(),
  wait: z.boolean().optional(),
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
});

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
  'vm.set': z.strictObject({ vm: vmRef, vcpus: z.number().int().min(1).max(64).optional(), memoryMiB: z.number().int().min(128).max(262144).optional(), disk: size.optional() }),
  'vm.wait': z.strictObject({ vm: vmRef, state: z.enum(['running', 'stopped', 'deleted']), timeoutMs: z.number().int().positive().optional() }),
  'vm.list': z.strictObject({}),
  'vm.show': z.strictObject({ vm: vmRef }),
  'vm.events': z.strictObject({ vm: vmRef }),
  'vm.logs': z.strictObject({ vm: vmRef, follow: z.boolean().optional(), serial: z.boolean().optional(), afterSeq: z.number().int().optional() }),
  'vm.ssh': z.strictObject({ vm: vmRef, wait: z.boolean().optional() }),
  'vm.workspace.prepare': prepareParams,
  'vm.workspace.export': exportParams,
  'inspect.subscribe': z.strictObject({ vm: vmRef.optional() }),
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

export const PROGRESS_METHOD = 'progress';
export const STREAM_METHOD = 'stream';
