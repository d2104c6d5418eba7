/**
 * Run by test/integration/workspace-stream.test.ts in its own process: export `guestPath` (a local "guest") to
 * `output` and print the process's peak RSS before and after, in bytes, as JSON. A small warm-up export first, so
 * the baseline includes the code's own footprint.
 */
import { exportWorkspaceToFile } from '../../src/host/guest/workspace-export.js';
import { streamingLocalGuest } from './local-guest.js';

const [guestPath, output, warmGuestPath] = process.argv.slice(2);
const guest = streamingLocalGuest();
const limits = { maxBytes: 2 ** 40, timeoutMs: 600_000 };
await exportWorkspaceToFile(guest, { guestPath: warmGuestPath, outputPath: `${output}.warm`, ...limits });
const before = process.resourceUsage().maxRSS * 1024;
const r = await exportWorkspaceToFile(guest, { guestPath, outputPath: output, ...limits });
const after = process.resourceUsage().maxRSS * 1024;
process.stdout.write(JSON.stringify({ before, after, patchBytes: r.patchBytes }) + '\n');
