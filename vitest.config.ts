import { defineConfig } from 'vitest/config';

// Tests run with the `development` export condition so XState throws on unserialisable (inline) logic
// instead of silently persisting `{}`.
const execArgv = ['--conditions=development'];

export default defineConfig({
  test: {
    pool: 'forks',
    poolOptions: { forks: { execArgv } },
    // Each test file gets a TMPDIR of its own (two runs at once, or two files, never share temp files).
    setupFiles: ['test/support/tmpdir.ts'],
    testTimeout: 30_000,
    hookTimeout: 120_000,
    reporters: process.env.CI ? ['default', 'json'] : ['default'],
    outputFile: { json: '.cache/vitest-report.json' },
    projects: [
      { extends: true, test: { name: 'unit', include: ['test/unit/**/*.test.ts'] } },
      { extends: true, test: { name: 'integration', include: ['test/integration/**/*.test.ts'] } },
      {
        extends: true,
        test: {
          name: 'e2e',
          include: ['test/e2e/**/*.test.ts'],
          // Each guest boot costs ~15 s of CPU under TCG on 2 cores: e2e files run one at a time,
          // against one test image built (or taken from the cache) once per run.
          poolOptions: { forks: { singleFork: true, execArgv } as never },
          globalSetup: ['test/e2e/global-setup.ts'],
          testTimeout: 600_000,
          hookTimeout: 900_000,
        },
      },
    ],
  },
});
