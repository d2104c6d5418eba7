/**
 * The wire's plain constants: notification method names and the numeric bounds of VM sizes. Kept apart from
 * protocol.ts so the CLI can use them without loading the schema library (zod is hundreds of modules at start-up);
 * protocol.ts builds its schemas from these same numbers.
 */
export const PROGRESS_METHOD = 'progress';
export const STREAM_METHOD = 'stream';

export const VCPUS = { min: 1, max: 64 } as const;
export const MEMORY_MIB = { min: 128, max: 262_144 } as const;
