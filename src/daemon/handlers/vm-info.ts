/** What there is to know about VMs: vm.list, vm.show, vm.events, vm.logs, vm.ssh. */
import { existsSync, statSync } from 'node:fs';
import { BangerError } from '../../errors.js';
import { vmFiles } from '../../actors/vm-files.js';
import { ensureUserKey } from '../../host/guest/keys.js';
import { readTail } from '../../host/guest/serial.js';
import type { Handlers } from '../../rpc/server.js';
import type { DaemonServices } from '../services.js';
import { vmAccess } from './vm-access.js';
import { guestFields } from './guest.js';

type InfoHandlers = Pick<Handlers, 'vm.list' | 'vm.show' | 'vm.events' | 'vm.logs' | 'vm.ssh'>;

export function vmInfoHandlers(d: DaemonServices): InfoHandlers {
  const { supervisor: sup, store, layout } = d;
  const { resolveVm, view, waitState, bootWait } = vmAccess(d);
  return {
    'vm.list': async () => sup.ids().map(view),

    'vm.show': async (p) => {
      const id = resolveVm(p.vm);
      const f = vmFiles(layout, id);
      return { ...view(id), dir: f.dir, serialLog: f.serialLog, workDiskAllocatedBytes: allocated(existsSync(f.workOverlay) ? f.workOverlay : f.workDisk), rootDiskAllocatedBytes: allocated(existsSync(f.rootOverlay) ? f.rootOverlay : f.rootDisk), ...(await guestFields(d, id)) };
    },

    'vm.events': async (p) => store.events(resolveVm(p.vm)),

    'vm.logs': async (p, ctx) => {
      const rows = store.resolveVm(p.vm);
      if (rows.length !== 1) resolveVm(p.vm);
      const id = rows[0].id;
      // The tail only: the guest decides how much it writes to its console.
      if (p.serial) return { serial: (await readTail(vmFiles(layout, id).serialLog).catch(() => ({ text: '' }))).text };
      const existing = store.logs(id, p.afterSeq ?? 0);
      if (!p.follow) return existing;
      for (const r of existing) ctx.stream(r);
      await new Promise<void>((resolve) => {
        const off = sup.onLog((row) => {
          if (row.vmId === id) ctx.stream(row);
        });
        ctx.signal.addEventListener('abort', () => {
          off();
          resolve();
        });
      });
      return [];
    },

    'vm.ssh': async (p, ctx) => {
      const id = resolveVm(p.vm);
      let v = view(id);
      if (v.state === 'booting' && p.wait !== false) v = await waitState(id, ['running'], ctx, bootWait());
      if (v.state !== 'running') throw new BangerError('invalid_state', `vm ${v.name} is ${v.state}`, `banger vm start ${v.name}`);
      const f = vmFiles(layout, id);
      const key = await ensureUserKey(layout.keysDir);
      return {
        host: v.guestIp ?? '127.0.0.1',
        port: v.guestIp ? 22 : v.sshPort,
        user: 'root',
        identityFile: key.privateKeyPath,
        knownHostsFile: f.knownHosts,
        hostKeyAlias: `banger-${id}`,
      };
    },
  };
}

/** The bytes a file really takes on disk (sparse files take less than their size), or null when it is absent. */
function allocated(path: string): number | null {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return null;
  }
}
