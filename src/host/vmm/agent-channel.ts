/**
 * The guest agent's channel for a running VM, by its VMM: QEMU's virtio-serial port (a Unix socket next to the QMP
 * socket), or Firecracker's vsock (its Unix socket, `CONNECT <port>`).
 */
import { dirname, join } from 'node:path';
import { BangerError } from '../../errors.js';
import { firecrackerVsockChannel, unixChannel, type AgentChannel } from '../guest/agent.js';
import { AGENT_VSOCK_PORT } from '../image/agent.js';
import { FirecrackerFiles, firecrackerId } from './firecracker/process.js';
import { agentSocketPath } from './qemu/qemu.js';

export function agentChannelOf(vmm: 'qemu' | 'firecracker', id: string, control: string): { channel: AgentChannel; transport: 'virtio-serial' | 'vsock' } {
  if (vmm === 'firecracker') {
    const uds = join(dirname(control), FirecrackerFiles.vsock(firecrackerId(id)));
    return { channel: firecrackerVsockChannel(uds, AGENT_VSOCK_PORT), transport: 'vsock' };
  }
  const sock = agentSocketPath(control);
  if (!sock) throw new BangerError('internal', `no agent socket for the QEMU control socket ${control}`);
  return { channel: unixChannel(sock), transport: 'virtio-serial' };
}
