import { describe, expect, it } from 'vitest';
import { versionCheck } from '../../src/version-skew.js';

const v1 = { version: '0.1.0', commit: 'aaaa' };

describe('versionCheck', () => {
  it('is ok when CLI, daemon and helper run one release', () => {
    const r = versionCheck({ cli: v1, daemon: v1, helper: { version: '0.1.0' } });
    expect(r).toMatchObject({ name: 'versions', status: 'ok', detail: 'CLI, daemon, root helper run 0.1.0 (aaaa)' });
  });

  it('explains a CLI newer than the daemon, with the restart as the fix', () => {
    const r = versionCheck({ cli: { version: '0.2.0', commit: 'bbbb' }, daemon: v1 });
    expect(r.status).toBe('warn');
    expect(r.detail).toBe('the CLI is 0.2.0 (bbbb) but the daemon runs 0.1.0 (aaaa)');
    expect(r.fix).toMatch(/banger daemon stop && banger daemon start/);
  });

  it('a same version from another commit is a mismatch too', () => {
    expect(versionCheck({ cli: { version: '0.1.0', commit: 'cccc' }, daemon: v1 }).status).toBe('warn');
  });

  it('explains a helper on another release, and one too old to say', () => {
    const other = versionCheck({ daemon: v1, helper: { version: '0.0.9' } });
    expect(other.detail).toBe('the root helper runs 0.0.9 but the daemon runs 0.1.0');
    expect(other.fix).toMatch(/system install/);
    expect(versionCheck({ daemon: v1, helper: null }).detail).toMatch(/an older release/);
  });

  it('names both problems at once', () => {
    const r = versionCheck({ cli: { version: '0.2.0' }, daemon: v1, helper: { version: '0.0.9' } });
    expect(r.detail.split('; ')).toHaveLength(2);
    expect(r.fix?.split('; ')).toHaveLength(2);
  });
});
