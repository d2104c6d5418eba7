import { mkdtemp, rm, stat } from 'node:fs/promises';
import { once } from 'node:events';
import { createReadStream } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { execa } from 'execa';
import { BangerError } from '../../errors.js';

/**
 * The history of a prepare as finished packs with their indexes, made on the host.
 *
 * Measured under TCG (issue 13): `git index-pack` in the guest, which inflates and hashes every object again to
 * build the index, cost more than extracting the whole tree (10,000 files + 32 MiB: 71 s against 25 s for
 * `tar -x` of the same tree, at load 27). The host's `git pack-objects` writes a pack and its .idx in well
 * under a second; the guest stores both as they are and checks the tree out of them.
 *
 * One pack for the whole tree made the guest wait for its last byte before checking out a single file, while
 * `git archive | ssh tar -x` extracts as the bytes arrive: on a 2-vCPU TCG guest the checkout (11.1 s for
 * 10,000 files + 32 MiB at load 5, against 8.7 s for `tar -x` of the same tree from a file) then came on top
 * of the transfer instead of beside it. So HEAD's tree goes as a series of packs (checkoutPlan): the first
 * carries the commit and every tree, each carries the blobs of a slice of the paths, and the guest checks a
 * slice out while the next pack arrives. Each byte still crosses the link once (a blob goes in one pack only;
 * packs are self-contained, never thin); the .idx files add about 28 bytes an object.
 */
export interface HostPack {
  dir: string;
  /** The pack's checksum: the files are pack-<name>.pack and pack-<name>.idx. */
  name: string;
  packPath: string;
  idxPath: string;
  packBytes: number;
  idxBytes: number;
}

const GIT_ENV = { GIT_OPTIONAL_LOCKS: '0', LC_ALL: 'C' };

/** A slice of HEAD's tree: the objects its pack carries and the NUL-terminated paths the guest checks out of it. */
export interface CheckoutSlice {
  ids: string[];
  paths: Buffer;
}

/** A slice closes at this many blob bytes or this many files, whichever comes first. */
export const SLICE_BYTES = 4 * 2 ** 20;
export const SLICE_FILES = 2500;
/**
 * Blobs at most this big go first. Under TCG the guest checks a small file out in about 0.5 ms, longer than the
 * link takes to carry it (7 MB/s: 3.5 KB); a big one crosses the link more slowly than it is written. So the small
 * files go first and the guest checks them out while the big ones cross: in path order, then the big ones,
 * largest first, so the last to be written is the smallest. In path order alone, a 32 MiB file at the top of a
 * 10,000-file tree held the whole checkout back until it had arrived (issue 13).
 */
export const SMALL_BLOB = 64 * 2 ** 10;

interface TreeEntry {
  type: string;
  id: string;
  size: number;
  path: Buffer;
}

/**
 * HEAD's tree cut into slices, small files first (SMALL_BLOB): the first slice also carries the commit and every
 * tree (the guest reads the index from them before checking anything out). A blob at several paths goes in the
 * first slice that names it. `sent` is every object id the slices carry.
 */
export async function checkoutPlan(root: string, commit: string, signal?: AbortSignal): Promise<{ slices: CheckoutSlice[]; sent: Set<string> }> {
  const [entries, tree] = await Promise.all([
    lsTree(root, commit, signal),
    execa('git', ['-C', root, 'rev-parse', '--verify', `${commit}^{tree}`], { cancelSignal: signal, env: GIT_ENV, extendEnv: true }),
  ]);
  const sent = new Set<string>([commit, tree.stdout.trim()]);
  const first: string[] = [...sent];
  for (const e of entries) {
    if (e.type !== 'tree' || sent.has(e.id)) continue;
    first.push(e.id);
    sent.add(e.id);
  }
  // gitlinks are left out: the modes that check out a tree refuse submodules
  const blobs = entries.filter((e) => e.type === 'blob');
  const small = blobs.filter((e) => e.size <= SMALL_BLOB);
  const big = blobs.filter((e) => e.size > SMALL_BLOB).sort((a, b) => b.size - a.size);
  const slices: CheckoutSlice[] = [];
  let cur: { ids: string[]; paths: Buffer[]; bytes: number; files: number } = { ids: first, paths: [], bytes: 0, files: 0 };
  const close = () => {
    slices.push({ ids: cur.ids, paths: Buffer.concat(cur.paths) });
    cur = { ids: [], paths: [], bytes: 0, files: 0 };
  };
  for (const blob of [...small, ...big]) {
    if (!sent.has(blob.id)) {
      cur.ids.push(blob.id);
      sent.add(blob.id);
      cur.bytes += blob.size;
    }
    cur.paths.push(blob.path, Buffer.from([0]));
    if (++cur.files >= SLICE_FILES || cur.bytes >= SLICE_BYTES) close();
  }
  if (cur.ids.length > 0 || cur.paths.length > 0 || slices.length === 0) close();
  return { slices, sent };
}

/** `git ls-tree -r -t -l` of a commit: every tree and blob, with its size (0 for trees). */
async function lsTree(root: string, commit: string, signal?: AbortSignal): Promise<TreeEntry[]> {
  const r = await execa('git', ['-C', root, 'ls-tree', '-r', '-t', '-z', '-l', '--full-tree', commit], {
    cancelSignal: signal, env: GIT_ENV, extendEnv: true, reject: false, encoding: 'buffer', maxBuffer: 2 ** 30,
  });
  if (r.failed || r.exitCode !== 0) {
    if (signal?.aborted) throw signal.reason;
    throw new BangerError('host', `git ls-tree failed (exit ${r.exitCode ?? r.signal}): ${Buffer.from(r.stderr as Uint8Array).toString('utf8').trim()}`);
  }
  const out = Buffer.from(r.stdout as Uint8Array);
  const entries: TreeEntry[] = [];
  for (let start = 0; start < out.length; ) {
    let end = out.indexOf(0, start);
    if (end < 0) end = out.length;
    const entry = out.subarray(start, end);
    start = end + 1;
    const tab = entry.indexOf(9);
    // "<mode> <type> <id> <size, padded>\t<path>"
    const [, type, id, size] = entry.subarray(0, tab).toString('latin1').split(/ +/);
    entries.push({ type, id, size: Number(size) || 0, path: entry.subarray(tab + 1) });
  }
  return entries;
}

/**
 * Everything `git rev-list --objects [--no-walk] <revs>` names that `sent` does not hold: the history the
 * slices of the checked-out tree leave out (ids with their names, for pack-objects' delta heuristics).
 */
export async function restOfHistory(root: string, revs: string[], sent: Set<string>, opts: { noWalk: boolean; signal?: AbortSignal }): Promise<string[]> {
  const r = await execa('git', ['-C', root, 'rev-list', '--objects', ...(opts.noWalk ? ['--no-walk'] : []), '--stdin'], {
    cancelSignal: opts.signal, env: GIT_ENV, extendEnv: true, reject: false, input: revs.join('\n') + '\n', maxBuffer: 2 ** 31,
  });
  if (r.failed || r.exitCode !== 0) {
    if (opts.signal?.aborted) throw opts.signal.reason;
    throw new BangerError('host', `git rev-list failed (exit ${r.exitCode ?? r.signal}): ${String(r.stderr ?? '').trim().split('\n').pop()}`);
  }
  return r.stdout.split('\n').filter((l) => l !== '' && !sent.has(l.split(' ', 1)[0]));
}

/** `git pack-objects <tmp>/pack` of the objects named one a line in `lines`, into a new temp dir. */
export async function packObjects(root: string, lines: string[], signal?: AbortSignal): Promise<HostPack> {
  const dir = await mkdtemp(join(tmpdir(), 'banger-pack-'));
  try {
    const p = await execa('git', ['-C', root, 'pack-objects', '-q', join(dir, 'pack')], {
      cancelSignal: signal, env: GIT_ENV, extendEnv: true, reject: false, input: lines.join('\n') + '\n',
    });
    if (p.failed || p.exitCode !== 0) {
      if (signal?.aborted) throw signal.reason;
      throw new BangerError('host', `git pack-objects failed (exit ${p.exitCode ?? p.signal}): ${String(p.stderr ?? '').trim().split('\n').pop()}`);
    }
    const name = String(p.stdout).trim();
    if (!/^[0-9a-f]{40,64}$/.test(name)) throw new BangerError('host', `git pack-objects printed no pack name (got ${JSON.stringify(name.slice(0, 80))})`);
    const packPath = join(dir, `pack-${name}.pack`);
    const idxPath = join(dir, `pack-${name}.idx`);
    const [ps, is] = await Promise.all([stat(packPath), stat(idxPath)]);
    return { dir, name, packPath, idxPath, packBytes: ps.size, idxBytes: is.size };
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
}

export async function removeHostPack(pack: HostPack | undefined): Promise<void> {
  if (pack) await rm(pack.dir, { recursive: true, force: true });
}

/** Append `src` to `out` (never ended nor destroyed here, whatever happens), with backpressure; stops on `signal`. */
export async function appendTo(out: Writable, src: Readable, signal: AbortSignal): Promise<void> {
  try {
    for await (const chunk of src) {
      signal.throwIfAborted();
      if (!out.write(chunk)) await once(out, 'drain', { signal });
    }
  } finally {
    src.destroy();
  }
}

/** Append `<name> <pack bytes> <idx bytes> <paths bytes>\n`, the pack, its index and the paths to check out of it. */
export async function appendPack(out: Writable, p: HostPack, paths: Buffer, signal: AbortSignal): Promise<void> {
  out.write(Buffer.from(`${p.name} ${p.packBytes} ${p.idxBytes} ${paths.length}\n`));
  for (const file of [p.packPath, p.idxPath]) await appendTo(out, createReadStream(file), signal);
  if (!out.write(paths)) await once(out, 'drain', { signal });
}
