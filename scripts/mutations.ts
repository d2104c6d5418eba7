/**
 * A standing mutation check: five bugs we once had or nearly had, each of which the unit or integration tests
 * must catch. `npm run mutations` copies the working tree (git ls-files: tracked and untracked-but-not-ignored
 * files; node_modules as a symlink) into a temp directory per mutation, makes the one exact text replacement,
 * runs the chosen test files there with HOME an empty directory, and expects at least one test to fail.
 *
 * First it runs all the chosen test files once on an unmutated copy: if they fail there, a "killed" would
 * mean nothing, so the check stops. A mutation whose original text is not found exactly once fails loudly:
 * the code moved on, and the mutation must be rewritten to match it. Exit 0 only when every mutation applied
 * and was killed.
 *
 * Adding one: pick the smallest replacement that reintroduces the bug, and the fewest, fastest test files
 * that should catch it (the whole run should stay well under three minutes on two cores).
 */
import { existsSync } from 'node:fs';
import { copyFile, lstat, mkdir, mkdtemp, readFile, readlink, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from '../src/host/exec/runner.js';

interface Mutation {
  what: string;
  file: string;
  from: string;
  to: string;
  tests: string[];
}

const MUTATIONS: Mutation[] = [
  {
    what: 'workspace export stages into the real index (no GIT_INDEX_FILE)',
    file: 'src/host/guest/workspace-scripts.ts',
    from: 'GIT_INDEX_FILE=$tmp/index GIT_OBJECT_DIRECTORY=$tmp/objects',
    to: 'GIT_OBJECT_DIRECTORY=$tmp/objects',
    tests: ['test/integration/export-index.test.ts'],
  },
  {
    what: 'the VM-name pattern without its ^ anchor',
    file: 'src/errors.ts',
    from: 'export const NAME_RE = /^[a-zA-Z0-9]',
    to: 'export const NAME_RE = /[a-zA-Z0-9]',
    tests: ['test/unit/names.test.ts'],
  },
  {
    what: "the root helper's verb lookup goes through the prototype",
    file: 'src/roothelper/protocol.ts',
    from: 'export const isVerb = (v: string): v is Verb => (VERBS as readonly string[]).includes(v);',
    to: 'export const isVerb = (v: string): v is Verb => (verbSchemas as Record<string, unknown>)[v] !== undefined;',
    tests: ['test/unit/roothelper-validation.test.ts', 'test/integration/roothelper-fuzz.test.ts'],
  },
  {
    what: 'the workspace queue runs LIFO',
    file: 'src/machines/job-queue.machine.ts',
    from: 'assign({ current: ({ context }) => context.queue[0], queue: ({ context }) => context.queue.slice(1) })',
    to: 'assign({ current: ({ context }) => context.queue[context.queue.length - 1], queue: ({ context }) => context.queue.slice(0, -1) })',
    tests: ['test/unit/workspace-queue-order.test.ts', 'test/unit/workspace-machine.test.ts'],
  },
  {
    what: 'a transition is written without its transaction',
    file: 'src/store/repo.ts',
    from: 'return this.db.transaction(() => {\n      const seq = ',
    to: 'return (() => {\n      const seq = ',
    tests: ['test/unit/store.test.ts'],
  },
];

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const VITEST = join(ROOT, 'node_modules', 'vitest', 'vitest.mjs');
const RUN_TIMEOUT_MS = 150_000;

interface Outcome {
  ok: boolean;
  line: string;
}

async function main(): Promise<number> {
  const work = await mkdtemp(join(tmpdir(), 'banger-mutations-'));
  try {
    const baseline = await runTests(work, 'baseline', undefined, allTests());
    if (!baseline.ranClean) {
      console.error(`baseline: the tests fail without any mutation, so no mutation can be judged:\n${baseline.detail}`);
      return 2;
    }
    console.log(`baseline: ${baseline.passed} tests pass unmutated`);
    const outcomes: Outcome[] = [];
    for (const [i, m] of MUTATIONS.entries()) {
      const outcome = await judge(work, i + 1, m);
      console.log(outcome.line);
      outcomes.push(outcome);
    }
    const killed = outcomes.filter((o) => o.ok).length;
    console.log(`\n${killed} of ${MUTATIONS.length} mutations killed${killed === MUTATIONS.length ? '' : ': see the lines above'}`);
    return killed === MUTATIONS.length ? 0 : 1;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** Every test file some mutation names and the working tree has. */
function allTests(): string[] {
  return [...new Set(MUTATIONS.flatMap((m) => m.tests))].filter((t) => existsSync(join(ROOT, t)));
}

async function judge(work: string, n: number, m: Mutation): Promise<Outcome> {
  const label = `mutation ${n} (${m.what})`;
  const present = m.tests.filter((t) => existsSync(join(ROOT, t)));
  const missing = m.tests.filter((t) => !present.includes(t));
  const missingNote = missing.length ? ` [missing test files: ${missing.join(', ')}]` : '';
  if (present.length === 0) return { ok: false, line: `${label}: SURVIVED, no test file to run${missingNote}` };
  const r = await runTests(work, `m${n}`, m, present);
  if (r.notApplied) return { ok: false, line: `${label}: mutation ${n} no longer applies: ${m.file} changed, update the script (${r.notApplied})` };
  if (r.failures.length > 0) {
    return { ok: true, line: `${label}: killed by ${describeFailures(r.failures)}${missingNote}` };
  }
  if (r.ranClean) return { ok: false, line: `${label}: SURVIVED ${present.join(', ')} (${r.passed} tests passed)${missingNote}` };
  return { ok: false, line: `${label}: ERROR, the test run failed without a failing test: ${r.detail}${missingNote}` };
}

/** "3 tests in test/unit/a.test.ts (first: <name>), 1 in test/unit/b.test.ts (first: <name>)" */
function describeFailures(failures: Array<{ file: string; test: string }>): string {
  const byFile = new Map<string, string[]>();
  for (const f of failures) byFile.set(f.file, [...(byFile.get(f.file) ?? []), f.test]);
  return [...byFile].map(([file, tests]) => `${tests.length} test${tests.length > 1 ? 's' : ''} in ${file} (first: ${tests[0]})`).join(', ');
}

interface TestRun {
  /** Why the mutation's original text could not be replaced (it must occur exactly once). */
  notApplied?: string;
  /** Exit 0 and a report with no failures. */
  ranClean: boolean;
  passed: number;
  /** Each failed test (or "failed to load" for a file that did not load). */
  failures: Array<{ file: string; test: string }>;
  detail: string;
}

/** Copy the tree into a fresh directory, apply the mutation, run vitest on `tests` with an empty HOME. */
async function runTests(work: string, name: string, mutation: Mutation | undefined, tests: string[]): Promise<TestRun> {
  const copy = join(work, name);
  await copyTree(await workingTreeFiles(), copy);
  const notApplied = mutation && (await applyMutation(copy, mutation));
  if (notApplied) {
    await rm(copy, { recursive: true, force: true });
    return { notApplied, ranClean: false, passed: 0, failures: [], detail: notApplied };
  }
  const home = join(work, `${name}-home`);
  await mkdir(home);
  const report = join(work, `${name}-report.json`);
  const r = await run(
    process.execPath,
    [VITEST, 'run', '--project', 'unit', '--project', 'integration', '--reporter=json', `--outputFile=${report}`, ...tests],
    { cwd: copy, env: { HOME: home, XDG_CONFIG_HOME: join(home, '.config') }, reject: false, timeoutMs: RUN_TIMEOUT_MS },
  );
  await rm(copy, { recursive: true, force: true });
  const parsed = existsSync(report) ? parseReport(JSON.parse(await readFile(report, 'utf8'))) : undefined;
  const detail = `exit ${r.exitCode}: ${lastLines(r.stderr || r.stdout, 6)}`;
  if (!parsed) return { ranClean: false, passed: 0, failures: [], detail: `no report (${detail})` };
  if (parsed.files === 0) return { ranClean: false, passed: 0, failures: [], detail: `no test file ran (${detail})` };
  return { ranClean: r.exitCode === 0 && parsed.failures.length === 0, passed: parsed.passed, failures: parsed.failures, detail };
}

/** Replace the mutation's text in the copy; returns why not when it does not occur exactly once. */
async function applyMutation(copy: string, m: Mutation): Promise<string | undefined> {
  const path = join(copy, m.file);
  const source = await readFile(path, 'utf8').catch(() => undefined);
  if (source === undefined) return 'the file is gone';
  const count = source.split(m.from).length - 1;
  if (count !== 1) return `the original text is ${count === 0 ? 'not found' : `found ${count} times`}`;
  await writeFile(path, source.replace(m.from, () => m.to));
  return undefined;
}

interface VitestJson {
  numPassedTests: number;
  testResults: Array<{ name: string; status: string; message?: string; assertionResults: Array<{ fullName: string; status: string }> }>;
}

function parseReport(json: VitestJson): { files: number; passed: number; failures: TestRun['failures'] } {
  const failures: TestRun['failures'] = [];
  for (const file of json.testResults) {
    const rel = file.name.replace(/^.*?\/(test\/)/, '$1');
    const failed = file.assertionResults.filter((a) => a.status === 'failed');
    for (const a of failed) failures.push({ file: rel, test: JSON.stringify(a.fullName) });
    if (failed.length === 0 && file.status === 'failed') failures.push({ file: rel, test: `failed to load: ${lastLines(file.message ?? '', 1)}` });
  }
  return { files: json.testResults.length, passed: json.numPassedTests, failures };
}

/** Tracked and untracked-but-not-ignored files that exist now (a deleted tracked file is left out). */
async function workingTreeFiles(): Promise<string[]> {
  const r = await run('git', ['-C', ROOT, 'ls-files', '-z', '--cached', '--others', '--exclude-standard']);
  return [...new Set(r.stdout.split('\0').filter((f) => f !== ''))];
}

async function copyTree(files: string[], dest: string): Promise<void> {
  await mkdir(dest);
  for (const f of files) {
    const from = join(ROOT, f);
    const to = join(dest, f);
    const st = await lstat(from).catch(() => undefined);
    if (!st) continue;
    await mkdir(dirname(to), { recursive: true });
    if (st.isSymbolicLink()) await symlink(await readlink(from), to);
    else if (st.isFile()) await copyFile(from, to);
  }
  await symlink(join(ROOT, 'node_modules'), join(dest, 'node_modules'));
}

function lastLines(s: string, n: number): string {
  return s.trim().split('\n').slice(-n).join(' | ');
}

process.exitCode = await main();
