import { mkdtemp, rm, stat } from 'node:fs/promises';
import { once } from 'node:events';
import { createReadStream } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { execa } from 'execa';
import { BangerError } from '../../errors.js';

/**
 * The history of a prepare as a finished pack with its index, made on the host.
 *
 * Measured under TCG (issue 13): `git index-pack` in the guest, which inflates and hashes every object again to
 * build the index, cost more than extracting the whole tree (10,000 files + 32 MiB: 71 s against 25 s for
 * `tar -x` of the same tree, at load 27). The host's `git pack-objects <base>` writes the pack and its .idx
 * in well under a second; the guest stores both as they are and checks the tree out of them.
 * The pack still crosses the link once (the .idx adds about 28 bytes an object).
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

/** `git rev-list --objects [--no-walk] --stdin < revs | git pack-objects <tmp>/pack`, into a new temp dir. */
export async function buildHostPack(root: string, revs: string[], opts: { noWalk: boolean; signal?: AbortSignal }): Promise<HostPack> {
  const dir = await mkdtemp(join(tmpdir(), 'banger-pack-'));
  try {
    const common = { cancelSignal: opts.signal, env: GIT_ENV, extendEnv: true, reject: false } as const;
    const revList = execa('git', ['-C', root, 'rev-list', '--objects', ...(opts.noWalk ? ['--no-walk'] : []), '--stdin'], {
      ...common, input: revs.join('\n') + '\n', stdout: 'pipe', stderr: 'pipe', buffer: { stdout: false, stderr: true },
    });
    const pack = execa('git', ['-C', root, 'pack-objects', '-q', join(dir, 'pack')], { ...common, stdin: 'pipe', stdout: 'pipe', stderr: 'pipe' });
    revList.stdout!.pipe(pack.stdin!);
    pack.stdin!.on('error', () => {});
    const [r, p] = await Promise.all([revList, pack]);
    for (const [what, x] of [['git rev-list', r], ['git pack-objects', p]] as const) {
      if (x.failed || x.exitCode !== 0) {
        if (opts.signal?.aborted) throw opts.signal.reason;
        throw new BangerError('host', `${what} failed (exit ${x.exitCode ?? x.signal}): ${String(x.stderr ?? '').trim().split('\n').pop()}`);
      }
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

/** The header line the guest reads before the pack: `<name> <pack bytes> <idx bytes>\n`. */
export function packHeader(p: HostPack): Buffer {
  return Buffer.from(`${p.name} ${p.packBytes} ${p.idxBytes}\n`);
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

/** Append the pack's header line, the pack and then its index to `out`. */
export async function appendPack(out: Writable, p: HostPack, signal: AbortSignal): Promise<void> {
  out.write(packHeader(p));
  for (const file of [p.packPath, p.idxPath]) await appendTo(out, createReadStream(file), signal);
}
