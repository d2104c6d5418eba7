/** How VMs and their log rows look on a terminal. */
import type { LogRow, VmView } from '../../rpc/types.js';
import { c, fmtBytes, fmtMs, stateColor, table } from '../output.js';

const address = (v: VmView) => v.guestIp ?? (v.sshPort ? `127.0.0.1:${v.sshPort}` : '-');

export function vmSummary(v: VmView): string {
  const lines = [
    `${c.bold(v.name)} ${c.dim(v.id)} ${stateColor(v.state)}`,
    `  image ${v.image}, ${v.vmm}/${v.accel}, net ${v.net} ${address(v)}, ${v.vcpus} vcpu, ${v.memoryMiB} MiB, disk ${fmtBytes(v.diskBytes)}${v.pid ? `, pid ${v.pid}` : ''}`,
  ];
  if (v.isolation) lines.push(`  isolation: egress ${v.isolation.egress}, peers ${v.isolation.allowPeers ? 'allowed' : 'refused'}, allow ${v.isolation.allow.length ? v.isolation.allow.join(' ') : 'none'}`);
  if (v.publish?.length) lines.push(`  published ${v.publish.map((p) => `${p.replace(/:(\d+)$/, ' → guest $1')}`).join(', ')}${v.state === 'running' ? '' : c.dim(' (open while running)')}`);
  if (v.error) lines.push(`  ${c.red('error')} while ${v.error.stage}: ${v.error.message}`);
  if (v.stopReason && v.state === 'stopped') lines.push(`  ${c.dim(`stopped: ${v.stopReason}`)}`);
  return lines.join('\n');
}

export function vmTable(vms: VmView[]): string {
  if (!vms.length) return 'no VMs (banger vm run -- uname -a)';
  return table([
    ['NAME', 'ID', 'STATE', 'IMAGE', 'VMM', 'NET', 'ADDRESS', 'CPU', 'MEM', 'DISK'],
    ...vms.map((v) => [c.bold(v.name), v.id, stateColor(v.state), v.image, `${v.vmm}/${v.accel}`, v.net, address(v), String(v.vcpus), `${v.memoryMiB}M`, fmtBytes(v.diskBytes)]),
  ]);
}

export function logLine(r: LogRow): string {
  const mark = r.status === 'done' ? c.green('done ') : r.status === 'error' ? c.red('error') : r.status === 'start' ? c.dim('start') : c.blue('info ');
  return `${c.dim(r.time)} ${mark} ${r.stage}${r.durationMs !== null && r.durationMs !== undefined ? ` ${c.bold(fmtMs(r.durationMs))}` : ''}${r.message ? ` ${r.message}` : ''}`;
}
