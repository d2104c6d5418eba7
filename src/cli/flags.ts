/**
 * Usage checks for VM size flags, done in the CLI before any daemon is reached, so a typo exits 2 at once.
 * The bounds are the daemon's own (src/rpc/wire.ts, which its schemas use), and the schemas stay the second line.
 */
import { MEMORY_MIB, VCPUS } from '../rpc/wire.js';
import { usage } from './context.js';

/** The smallest work disk the daemon accepts (vm.create refuses smaller). */
export const MIN_DISK_BYTES = 64 * 1024 * 1024;

/** A whole number within the schema's bounds, from a flag yargs left as a string (so the message shows what was typed). */
function boundedInt(flag: string, raw: unknown, bounds: { min: number; max: number }, unit = ''): number | undefined {
  if (raw === undefined) return undefined;
  const range = `${bounds.min} to ${bounds.max}${unit}`;
  if (typeof raw !== 'string') usage(`${flag} was given more than once`, `give it once: ${range}`);
  if (!/^\s*\d+\s*$/.test(raw)) usage(`${flag} ${JSON.stringify(raw)} is not a whole number`, `give ${range}`);
  const n = Number(raw);
  if (n < bounds.min || n > bounds.max) {
    usage(`${flag} ${n} is out of range`, `give ${range}`);
  }
  return n;
}

export const vcpusFlag = (raw: unknown): number | undefined => boundedInt('--vcpus', raw, VCPUS);
export const memoryFlag = (raw: unknown): number | undefined => boundedInt('--memory', raw, MEMORY_MIB, ' MiB');

/** A size like 8G; `minBytes` for a new disk (growing an existing one is checked by the daemon against its size). */
export async function diskFlag(raw: unknown, minBytes = 1): Promise<string | undefined> {
  if (raw === undefined) return undefined;
  if (typeof raw !== 'string') usage('--disk was given more than once', 'give it once, e.g. --disk 8G');
  // Loaded only for --disk: the host layer stays out of the CLI's ordinary path.
  const { parseSize } = await import('../host/disk/disks.js');
  let bytes: number;
  try {
    bytes = parseSize(raw);
  } catch (e) {
    usage(`--disk ${JSON.stringify(raw)} is not a size`, (e as { hint?: string }).hint);
  }
  if (bytes < minBytes) usage(`--disk ${raw} is too small`, `the work disk needs at least ${minBytes / 2 ** 20}M`);
  return raw;
}
