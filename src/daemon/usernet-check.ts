/** `doctor`'s line on user networking: which isolation `--net user` guests get, and whether this host can give it. */
import type { DoctorCheck } from '../rpc/types.js';
import { errorMessage } from '../errors.js';
import { run, which } from '../host/exec/runner.js';
import type { UserNetBackend } from '../host/vmm/driver.js';

export async function userNetCheck(backend: UserNetBackend): Promise<DoctorCheck> {
  const name = 'user.net';
  if (backend === 'slirp') {
    return { name, status: 'warn', detail: 'slirp (config userNet): user-net guests reach the host\'s loopback through 10.0.2.2 and the host\'s addresses', fix: 'set config userNet "isolated" (needs slirp4netns)' };
  }
  if (backend === 'passt') {
    const bin = await which('passt');
    return bin
      ? { name, status: 'warn', detail: `passt --no-map-gw (${bin}): the host's loopback out of reach; this Debian's passt loses forwarded connections under load` }
      : { name, status: 'fail', detail: 'config userNet is "passt" but passt is not installed', fix: 'apt-get install passt, or set config userNet "isolated"' };
  }
  const slirp = await which('slirp4netns');
  if (!slirp) return { name, status: 'fail', detail: 'isolated user net needs slirp4netns, which is not installed: --net user VMs cannot start', fix: 'apt-get install slirp4netns' };
  try {
    await run('unshare', ['--user', '--map-root-user', '--net', '--mount', 'true'], { timeoutMs: 10_000 });
  } catch (e) {
    return { name, status: 'fail', detail: `isolated user net needs an unprivileged user namespace, and this host refused one: ${errorMessage(e)}`, fix: 'allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces), or use --net tap' };
  }
  return {
    name,
    status: 'ok',
    detail: `isolated: QEMU's slirp in its own user+net namespace, egress through slirp4netns --disable-host-loopback (${slirp}); the host's loopback, its addresses and private ranges refused; --egress none: slirp restrict=on`,
  };
}
