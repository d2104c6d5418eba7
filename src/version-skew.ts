/**
 * The CLI, the daemon and the root helper each run some release; after an update or a hand install they can
 * differ (an old daemon keeps its version until restarted). One pure comparison, shown by doctor and daemon status.
 */
import type { DoctorCheck } from './rpc/types.js';

export interface RunningRelease {
  version: string;
  commit?: string;
}

export interface Releases {
  cli?: RunningRelease;
  daemon: RunningRelease;
  /** undefined: no helper in use; null: a helper answered but is older than the release field. */
  helper?: RunningRelease | null;
}

const label = (r: RunningRelease): string => (r.commit ? `${r.version} (${r.commit})` : r.version);
const same = (a: RunningRelease, b: RunningRelease): boolean => a.version === b.version && (!a.commit || !b.commit || a.commit === b.commit);

export function versionCheck(r: Releases): DoctorCheck {
  const problems: string[] = [];
  const fixes: string[] = [];
  if (r.cli && !same(r.cli, r.daemon)) {
    problems.push(`the CLI is ${label(r.cli)} but the daemon runs ${label(r.daemon)}`);
    fixes.push('banger daemon stop && banger daemon start (VMs keep running and are adopted)');
  }
  if (r.helper === null || (r.helper && r.helper.version !== r.daemon.version)) {
    problems.push(`the root helper runs ${r.helper ? r.helper.version : 'an older release'} but the daemon runs ${r.daemon.version}`);
    fixes.push('sudo banger system install (then restart banger-roothelper), or restart the daemon if it runs the helper itself');
  }
  if (problems.length === 0) {
    const parts = [r.cli ? 'CLI' : undefined, 'daemon', r.helper ? 'root helper' : undefined].filter(Boolean).join(', ');
    return { name: 'versions', status: 'ok', detail: `${parts} run ${label(r.daemon)}` };
  }
  return { name: 'versions', status: 'warn', detail: problems.join('; '), fix: fixes.join('; ') };
}
