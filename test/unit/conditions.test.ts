import { describe, expect, it } from 'vitest';

describe('test runtime', () => {
  it('runs with the development export condition (XState checks persistence strictly)', () => {
    expect(process.execArgv.join(' ')).toContain('--conditions=development');
  });
});
