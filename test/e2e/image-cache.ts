/**
 * The test image is built once per machine and builder version (cached under the OS cache directory),
 * then hard-linked into each test's BANGER_HOME.
 */
import { homedir } from 'node:os';
import { join } from 'node:path';
import { BUILDER_VERSION } from '../../src/host/image.js';

export const TEST_IMAGE = 'debian-bookworm';

export function testCacheRoot(): string {
  const base = process.env.XDG_CACHE_HOME || join(homedir(), '.cache');
  return join(base, 'banger-test');
}

/** A BANGER_HOME that holds only the built test image. */
export function imageHome(): string {
  return join(testCacheRoot(), `image-home-v${BUILDER_VERSION}`);
}
