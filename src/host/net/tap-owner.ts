/**
 * Who a TAP device belongs to. Two marks, both checked by the root helper before it touches a device:
 * - the kernel's: `ip tuntap add ... user UID group GID` records the owner (sysfs `owner`/`group`, -1 for none);
 *   only that uid may attach to the device. A TAP made for a root owner gets no user at all (-1): only a process
 *   with CAP_NET_ADMIN may attach, and no TAP is ever made "owned by uid 0".
 * - banger's: the name, `bgtap<tag><random>`, where the tag is derived from the owner's uid and state directory,
 *   so two owners (or two homes of one user) never claim each other's devices by name.
 */
import { createHash } from 'node:crypto';

const TAG_LENGTH = 4;

/** A short base36 mark for one owner (uid + state directory), part of the names of the TAPs made for it. */
export function ownerTag(uid: number, home: string): string {
  const h = createHash('sha256').update(`${uid}\0${home}`).digest();
  return h.readUIntBE(0, 6).toString(36).padStart(TAG_LENGTH, '0').slice(-TAG_LENGTH);
}

/** The kernel owner a TAP made for `uid` carries: the uid itself, or -1 (none) for root. */
export const kernelOwnerFor = (uid: number): number => (uid === 0 ? -1 : uid);
