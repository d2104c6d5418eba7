import { describe, expect, it } from 'vitest';
import { assertForkable } from '../../src/actors/snapshot-steps.js';
import { BangerError } from '../../src/errors.js';

const refusal = (s: Parameters<typeof assertForkable>[0]) => {
  try {
    assertForkable(s);
  } catch (e) {
    expect(e).toBeInstanceOf(BangerError);
    return e as BangerError;
  }
  return undefined;
};
const base = { name: 'vm a', image: 'debian-bookworm' };

describe('which VMs can be forked (each fork takes its own MAC and address)', () => {
  it('a user-network VM always; a QEMU tap VM from builder 5 on with its identity disk', () => {
    expect(refusal({ ...base, net: 'user', builderVersion: 1 })).toBeUndefined();
    expect(refusal({ ...base, net: 'tap', vmm: 'qemu', builderVersion: 5, identityDisk: true })).toBeUndefined();
    const e = refusal({ ...base, net: 'tap', builderVersion: 4, identityDisk: true })!;
    expect(e.message).toMatch(/builder 4: its forks could not take their own MAC and address \(qemu needs builder 5 and an identity disk\)/);
    expect(e.hint).toMatch(/banger image pull debian-bookworm --force\), or a --net user VM/);
  });

  it('a Firecracker VM from builder 6 on (its guest finds the identity disk without a serial), with its identity disk', () => {
    expect(refusal({ ...base, net: 'tap', vmm: 'firecracker', builderVersion: 6, identityDisk: true })).toBeUndefined();
    expect(refusal({ ...base, net: 'tap', vmm: 'firecracker', builderVersion: 5, identityDisk: true })!.message).toMatch(/firecracker needs builder 6/);
    const e = refusal({ ...base, net: 'tap', vmm: 'firecracker', builderVersion: 6, identityDisk: false })!;
    expect(e.message).toMatch(/from builder 6, without an identity disk/);
    // Firecracker has no user networking to offer instead
    expect(e.hint).not.toMatch(/--net user/);
  });
});
