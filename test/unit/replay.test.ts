/**
 * Recorded event logs (the JSON lines of `banger vm events`, taken from real runs) replayed through the pure
 * machine: every recorded `to` state must be reproduced, and the final state must be the expected one.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readLog, replayVm, replayWorkspace } from '../support/replay.js';

const dir = join(import.meta.dirname, '..', 'fixtures');
const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Record<string, { final: string; passes: string[]; stopReason?: string; errorStage?: string; workspace?: { done: number; failed: number; queued: number; current: string | null } }>;

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
      // the workspace queue's own events replay too: FIFO, one job at a time, the state at the stop kept
      const ws = replayWorkspace(readLog(join(dir, f)));
      expect(ws.mismatches).toEqual([]);
      if (exp.workspace) {
        const last = ws.instances[ws.instances.length - 1].context as { done: number; failed: number; queue: unknown[]; current: { kind: string } | null };
        expect({ done: last.done, failed: last.failed, queued: last.queue.length, current: last.current?.kind ?? null }).toEqual(exp.workspace);
      }
    });
  }
});
