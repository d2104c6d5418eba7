/** planVm: the table of what vm.create and doctor decide from what was asked and what the host has. */
import { describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { planVm, type HostCapabilities, type PlanRequest } from '../../src/daemon/plan.js';

const missingFc = new BangerError('not_found', 'firecracker not found on PATH', 'install Firecracker, or set BANGER_FIRECRACKER_BIN');

function host(over: { fc?: boolean; kvm?: boolean; helper?: 'service' | 'child' | 'none'; defaultNet?: 'user' | 'tap'; forceTcg?: boolean } = {}): HostCapabilities {
  const helper = over.helper ?? 'service';
  return {
    firecracker: over.fc === false ? { missing: missingFc } : { binary: '/usr/local/bin/firecracker' },
    kvm: over.kvm === false ? { usable: false, reason: 'the probe boot timed out' } : { usable: true, reason: 'a probe boot reached userspace' },
    forceTcg: over.forceTcg ?? false,
    rootHelper: helper === 'none' ? { reachable: false, isService: false, why: 'nothing answers on /run/banger/roothelper.sock' } : { reachable: true, isService: helper === 'service' },
    defaultNet: over.defaultNet ?? 'user',
  };
}

describe('planVm', () => {
  it.each<[string, PlanRequest, Parameters<typeof host>[0], { vmm: string; accel: string; net: string }]>([
    ['auto everywhere on a full KVM host with a helper service: firecracker on tap', {}, {}, { vmm: 'firecracker', accel: 'kvm', net: 'tap' }],
    ['auto without a Firecracker binary: qemu with kvm', {}, { fc: false }, { vmm: 'qemu', accel: 'kvm', net: 'tap' }],
    ['auto where the KVM probe failed: qemu on tcg', {}, { kvm: false }, { vmm: 'qemu', accel: 'tcg', net: 'tap' }],
    ['auto without a root helper: qemu on user networking', {}, { helper: 'none' }, { vmm: 'qemu', accel: 'kvm', net: 'user' }],
    ['auto with the daemon\'s own helper: user networking, so qemu', {}, { helper: 'child' }, { vmm: 'qemu', accel: 'kvm', net: 'user' }],
    ['auto with the daemon\'s own helper and defaultNet tap: firecracker on tap', {}, { helper: 'child', defaultNet: 'tap' }, { vmm: 'firecracker', accel: 'kvm', net: 'tap' }],
    ['BANGER_ACCEL=tcg forces tcg, so auto is qemu', {}, { forceTcg: true }, { vmm: 'qemu', accel: 'tcg', net: 'tap' }],
    ['explicit qemu on a Firecracker host', { vmm: 'qemu' }, {}, { vmm: 'qemu', accel: 'kvm', net: 'tap' }],
    ['explicit user networking keeps auto off Firecracker', { net: 'user' }, {}, { vmm: 'qemu', accel: 'kvm', net: 'user' }],
    ['explicit tap with the daemon\'s own helper', { net: 'tap' }, { helper: 'child' }, { vmm: 'firecracker', accel: 'kvm', net: 'tap' }],
    ['explicit firecracker on a KVM host', { vmm: 'firecracker' }, {}, { vmm: 'firecracker', accel: 'kvm', net: 'tap' }],
  ])('%s', (_name, request, over, expected) => {
    const plan = planVm(request, host(over));
    expect({ vmm: plan.vmm, accel: plan.accel, net: plan.net }).toEqual(expected);
    expect(plan.why).toHaveLength(3);
    expect(plan.warnings).toEqual([]);
  });

  it('explicit --vmm firecracker is honoured even where the KVM probe failed, with a warning', () => {
    const plan = planVm({ vmm: 'firecracker' }, host({ kvm: false }));
    expect(plan).toMatchObject({ vmm: 'firecracker', accel: 'tcg', net: 'tap' });
    expect(plan.warnings).toHaveLength(1);
    expect(plan.warnings[0]).toContain('KVM is not usable here (the probe boot timed out)');
    expect(plan.warnings[0]).toContain('starting Firecracker anyway as asked');
  });

  it('explicit --vmm firecracker without a binary throws the error that says where it looked', () => {
    expect(() => planVm({ vmm: 'firecracker' }, host({ fc: false }))).toThrow(missingFc);
  });

  it('explicit --vmm firecracker with user networking is refused, naming the fix', () => {
    for (const h of [host({ helper: 'none' }), host({ helper: 'child' })]) {
      let err: unknown;
      try {
        planVm({ vmm: 'firecracker' }, h);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(BangerError);
      expect(err).toMatchObject({ kind: 'unsupported', message: 'Firecracker has no user-mode networking', hint: expect.stringContaining('--net tap') });
    }
  });

  it('--net tap without a reachable helper is refused, saying why and what to do', () => {
    expect(() => planVm({ net: 'tap' }, host({ helper: 'none' }))).toThrow(/--net tap needs the root helper, which is not reachable \(nothing answers on \/run\/banger\/roothelper.sock\)/);
    try {
      planVm({ net: 'tap', vmm: 'qemu' }, host({ helper: 'none' }));
    } catch (e) {
      expect(e).toMatchObject({ kind: 'unsupported', hint: expect.stringContaining('--net user') });
      return;
    }
    expect.unreachable('planVm accepted --net tap without a helper');
  });

  it('says why it chose each of accel, net and vmm', () => {
    const plan = planVm({}, host({ fc: false, helper: 'child' }));
    expect(plan.why[0]).toMatch(/^accel kvm: a probe boot/);
    expect(plan.why[1]).toMatch(/^net user: the root helper is this daemon's own/);
    expect(plan.why[2]).toBe('vmm qemu: no Firecracker binary');
  });
});
