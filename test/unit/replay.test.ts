/**
 * Recorded event logs (the JSON lines of `banger vm events`, taken from real runs) replayed through the pure
 * machine: every recorded `to` state must be reproduced, and the final state must be the expected one.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readLog, replayVm } from '../support/replay.js';

const dir = join(import.meta.dirname, '..', 'fixtures');
const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Record<string, { final: string; passes: string[]; stopReason?: string; errorStage?: string }>;

describe('recorded event logs replay to the same states', () => {
  const files = readdirSync(dir).filter((f) => f.endsWith('.jsonl'));
  it('has at least three recorded logs, each with an expectation', () => {
    expect(files.length).toBeGreaterThanOrEqual(3);
    for (const f of files) expect(expected[f], f).toBeDefined();
  });
  for (const f of files) {
    it(f, () => {
      const { snapshot, states, mismatches } = replayVm(readLog(join(dir, f)));
      expect(mismatches).toEqual([]);
      const exp = expected[f];
      expect(snapshot.value).toBe(exp.final);
      for (const s of exp.passes) expect(states).toContain(s);
      if (exp.stopReason) expect(snapshot.context.stopReason).toContain(exp.stopReason);
      if (exp.errorStage) expect(snapshot.context.error?.stage).toBe(exp.errorStage);
    });
  }
});
