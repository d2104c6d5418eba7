import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { kernelOwnerFor } from '../host/net/tap-owner.js';
import { TAP_PREFIX } from '../host/net/net.js';
import { Files } from '../paths.js';
import { refusal, type Caller, type ValidatedRequest } from './protocol.js';

/**
 * What a caller may do, beyond a well-formed request: it acts only on its own objects. The caller is the owner
 * of the socket the request came in on (server.ts), never something the request says. Checks that need the
 * host (who the kernel says owns a TAP, whom a jail was recorded for) run inside the operations themselves,
 * right before the change (refuseForeignTap, removeJail's owner record).
 *
 *   TAPs        the name carries the owner's tag (bgtap<tag>…) and the kernel records the owner's uid
 *   jails       vmDir is one of the owner's VM directories; never for a root owner; recorded with the owner
 *   paths       inside the owner's state directory (protocol.ts validateRequest)
 *   the bridge  name, CIDR and NAT come from the helper's configuration, so a caller can only ensure it
 */
export async function authorize(v: ValidatedRequest, caller: Caller): Promise<void> {
  switch (v.verb) {
    case 'tap.create':
    case 'tap.delete':
      refuseUntaggedTap(v.verb, v.args.name, caller);
      return;
    case 'firewall.set':
    case 'firewall.clear':
      refuseUntaggedTap(v.verb, v.args.tap, caller);
      return;
    case 'firecracker.jail': {
      if (caller.uid === 0 || caller.gid === 0) {
        throw refusal(v.verb, 'this socket\'s owner is root, and the jailer never runs Firecracker as uid or gid 0', 'run the daemon as an unprivileged user with the installed helper (banger system install --owner USER)');
      }
      const vmsDir = resolve(await realpath(caller.stateDir), Files.vmsDir);
      if (resolve(v.args.vmDir, '..') !== vmsDir) throw refusal(v.verb, `vmDir ${JSON.stringify(v.args.vmDir)} is not one of this owner's VM directories (${vmsDir}/<id>)`);
      return;
    }
    default:
      return;
  }
}

/** A TAP name this owner may use: `bgtap` + the owner's tag + at least one more character. */
export function refuseUntaggedTap(verb: string, name: string, caller: Caller): void {
  const prefix = `${TAP_PREFIX}${caller.tag}`;
  if (!name.startsWith(prefix) || name.length === prefix.length) {
    throw refusal(verb, `TAP ${JSON.stringify(name)} is not this owner's: its name must start with ${JSON.stringify(prefix)} (this owner's tag)`, `the daemon names its TAPs with the tag the helper reports in ping (owner.tag)`);
  }
}

/** A TAP the kernel records for someone else (`owner`: its uid, -1 for none) is refused. */
export function refuseForeignTap(verb: string, name: string, owner: number, caller: Caller): void {
  const want = kernelOwnerFor(caller.uid);
  if (owner !== want) {
    const who = owner === -1 ? 'no user (a root-made device)' : Number.isNaN(owner) ? 'an owner that could not be read' : `uid ${owner}`;
    throw refusal(verb, `TAP ${JSON.stringify(name)} belongs to ${who}, not to this socket's owner (uid ${caller.uid})`);
  }
}
