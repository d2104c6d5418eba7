/**
 * The test image is built once per machine and builder version, then hard-linked into each test's BANGER_HOME.
 * The cache is $BANGER_TEST_CACHE, else the checkout's .cache/e2e (gitignored): never HOME, which CI makes fresh
 * for every run.
 */
import { join } from 'node:path';
import { BUILDER_VERSION } from '../../src/host/image/image.js';

export const TEST_IMAGE = 'debian-bookworm';

const REPO = join(import.meta.dirname, '..', '..');

export function testCacheRoot(): string {
  return process.env.BANGER_TEST_CACHE || join(REPO, '.cache', 'e2e');
}

/** A BANGER_HOME that holds only the built test image. */
export function imageHome(): string {
  return join(testCacheRoot(), `image-home-v${BUILDER_VERSION}`);
}
