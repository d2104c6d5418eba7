/**
 * Prepare sends the tree once (out of the pack, then the host's working-tree delta) and export streams into a
 * file under a cap and a timeout. The "guest" is this host (test/support/local-guest.ts).
 */
import { execFile } from 'node:child_process';
import { chmod, lstat, mkdir, readdir, readFile, readlink, rename, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import { createWriteStream } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Readable, Transform } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BangerError } from '../../src/errors.js';
import { shellQuote } from '../../src/host/exec/shell.js';
import { prepareWorkspace, type GuestExec } from '../../src/host/guest/workspace.js';
import { exportWorkspace, exportWorkspaceToFile } from '../../src/host/guest/workspace-export.js';
import { checkoutPlan, SLICE_BYTES, SLICE_FILES, SMALL_BLOB } from '../../src/host/guest/workspace-pack.js';
import { commitAll, git, gitdir, isolateGitConfig, tempDir } from '../support/git.js';
import { streamingLocalGuest } from '../support/local-guest.js';

let restoreGit: () => Promise<void>;
let tmp: string;
beforeAll(async () => {
  restoreGit = await isolateGitConfig();
  tmp = await tempDir('banger-ws-stream-');
});
afterAll(async () => {
  await restoreGit();
  await rm(tmp, { recursive: true, force: true });
});

/** Every path under `root` except .git (and `skip`): type, the owner's exec bit, and contents or link target. */
async function treeOf(root: string, skip: string[] = []): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (rel: string) => {
    for (const name of await readdir(join(root, rel))) {
      const p = rel ? `${rel}/${name}` : name;
      if (p === '.git' || skip.includes(p)) continue;
      const st = await lstat(join(root, p));
      if (st.isSymbolicLink()) out[p] = `link ${await readlink(join(root, p))}`;
      else if (st.isDirectory()) {
        out[p] = 'dir';
        await walk(p);
      } else out[p] = `file ${st.mode & 0o100 ? 'x' : '-'} ${(await readFile(join(root, p))).toString('base64')}`;
    }
  };
  await walk('');
  return out;
}

async function hostRepo(): Promise<string> {
  const dir = await gitdir('banger-host-', tmp);
  await mkdir(join(dir, 'dir'));
  await mkdir(join(dir, 'becomes-file'));
  await writeFile(join(dir, 'keep.txt'), 'keep\n');
  await writeFile(join(dir, 'edit.txt'), 'before\n');
  await writeFile(join(dir, 'gone.txt'), 'gone\n');
  await writeFile(join(dir, 'old-name.txt'), 'renamed content\n');
  await writeFile(join(dir, 'run.sh'), '#!/bin/sh\n');
  await writeFile(join(dir, 'becomes-dir'), 'a file now\n');
  await writeFile(join(dir, 'becomes-file', 'inner.txt'), 'inner\n');
  await writeFile(join(dir, 'dir', 'only.txt'), 'only\n');
  await writeFile(join(dir, 'untracked-later.txt'), 'was tracked\n');
  await writeFile(join(dir, '.gitignore'), 'ignored.log\n');
  await symlink('keep.txt', join(dir, 'link'));
  await commitAll(dir, 'base');
  return dir;
}

/** Every kind of working-tree change the delta must carry. */
async function changeEverything(dir: string): Promise<void> {
  await writeFile(join(dir, 'edit.txt'), 'after\n');
  await unlink(join(dir, 'gone.txt'));
  await rename(join(dir, 'old-name.txt'), join(dir, 'new-name.txt'));
  await chmod(join(dir, 'run.sh'), 0o755);
  await unlink(join(dir, 'becomes-dir'));
  await mkdir(join(dir, 'becomes-dir'));
  await writeFile(join(dir, 'becomes-dir', 'child.txt'), 'child\n');
  await rm(join(dir, 'becomes-file'), { recursive: true });
  await writeFile(join(dir, 'becomes-file'), 'a directory once\n');
  await unlink(join(dir, 'dir', 'only.txt')); // leaves an empty directory: git never has one, neither may the guest
  await unlink(join(dir, 'link'));
  await writeFile(join(dir, 'link'), 'a file, was a symlink\n');
  await writeFile(join(dir, 'staged.txt'), 'staged, never committed\n');
  await git(dir, 'add', 'staged.txt');
  await git(dir, 'rm', '-q', '--cached', 'untracked-later.txt');
  await writeFile(join(dir, 'ignored.log'), 'stays behind\n');
}

/** A local guest whose streamed stdin loses its last 4 bytes: the `end\n` after a delta. */
function endDroppingGuest(): GuestExec {
  return (command, opts = {}) => {
    if (!(opts.stdin instanceof Readable)) return streamingLocalGuest()(command, opts);
    const held: Buffer[] = [];
    const short = new Transform({
      transform(chunk: Buffer, _e, cb) {
        held.push(chunk);
        const all = Buffer.concat(held.splice(0));
        const keep = all.subarray(Math.max(0, all.length - 4));
        held.push(Buffer.from(keep));
        cb(null, all.subarray(0, all.length - keep.length));
      },
    });
    opts.stdin.pipe(short);
    return streamingLocalGuest()(command, { ...opts, stdin: short });
  };
}

describe('prepare sends the tree once', { timeout: 60_000 }, () => {
  it.each(['shallow', 'full_history'] as const)('%s: the guest tree equals the host working tree through every kind of change', async (mode) => {
    const host = await hostRepo();
    await changeEverything(host);
    const dest = join(tmp, `guest-${mode}`);
    const r = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: dest, mode, readOnly: false });
    await rm(join(host, 'dir'), { recursive: true }); // the host's empty directory is not part of git's view
    expect(await treeOf(dest)).toEqual(await treeOf(host, ['ignored.log']));
    expect(r.cache).toBe('off');
    // the index is HEAD's (staged changes arrive unstaged) and its stat data is fresh: status hashes nothing
    expect((await git(dest, 'diff', '--cached', '--name-only')).trim()).toBe('');
    await git(dest, 'fsck', '--no-progress');
  });

  it('a stream cut after the delta\'s tar (a whole archive, but no end line) fails, and nothing is put in place', async () => {
    const host = await hostRepo();
    await changeEverything(host);
    const dest = join(tmp, 'cut-delta');
    // the guest's stdin loses its last 4 bytes (the "end\n" after the delta): tar alone would not notice
    const cut = endDroppingGuest();
    const err = await prepareWorkspace(cut, { source: host, guestPath: dest, mode: 'shallow', readOnly: false }).catch((e) => e);
    expect(err).toBeInstanceOf(BangerError);
    expect(err.message).toMatch(/the delta was cut short/);
    await expect(lstat(dest)).rejects.toThrow(/ENOENT/);
  });

  it.each([
    ['a plain tar, cut before its end line', 'none', /the tree was cut short/],
    ["zstd's frame, cut before its checksum", 'zstd', /premature end/],
  ] as const)('full_copy: %s, fails, and nothing is put in place', async (_what, compression, message) => {
    const host = await hostRepo();
    const dest = join(tmp, `cut-full-copy-${compression}`);
    const err = await prepareWorkspace(endDroppingGuest(), { source: host, guestPath: dest, mode: 'full_copy', readOnly: false, compression }).catch((e) => e);
    expect(err).toBeInstanceOf(BangerError);
    expect(err.message).toMatch(message);
    await expect(lstat(dest)).rejects.toThrow(/ENOENT/);
    const whole = join(tmp, `whole-full-copy-${compression}`);
    await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: whole, mode: 'full_copy', readOnly: false, compression });
    expect(await treeOf(whole)).toEqual(await treeOf(host));
  });

  it("a slice whose paths the relay cannot read fails the prepare (the checkout alone would end well), and nothing is put in place", async () => {
    const host = await hostRepo();
    const bin = join(tmp, 'failing-cat');
    await mkdir(bin, { recursive: true });
    // `cat` of a slice's path file fails; every other cat is the real one
    await writeFile(join(bin, 'cat'), '#!/bin/sh\nfor a in "$@"; do case "$a" in *banger-paths-*) exit 1 ;; esac; done\nexec /bin/cat "$@"\n');
    await chmod(join(bin, 'cat'), 0o755);
    const guest: GuestExec = (command, opts) => streamingLocalGuest()(`PATH=${shellQuote([bin])}:"$PATH"; export PATH; ${command}`, opts);
    const dest = join(tmp, 'relay-failed');
    const err = await prepareWorkspace(guest, { source: host, guestPath: dest, mode: 'shallow', readOnly: false }).catch((e) => e);
    expect(err).toBeInstanceOf(BangerError);
    expect(err.message).toMatch(/checking the tree out of the packs failed/);
    await expect(lstat(dest)).rejects.toThrow(/ENOENT/);
  });

  it('bytesSent: the file contents cross once (a 4 MiB file does not count twice)', async () => {
    const host = await gitdir('banger-host-', tmp);
    const big = Buffer.alloc(4 * 2 ** 20);
    for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((i * 2654435761) >>> 0, i); // incompressible enough
    await writeFile(join(host, 'big.bin'), big);
    await commitAll(host, 'big');
    const r = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: join(tmp, 'guest-bytes'), mode: 'shallow', readOnly: false });
    expect(r.bytesSent).toBeLessThan(1.5 * big.length);
    expect(r.bytesSent).toBeGreaterThan(0);
  });
});

describe('a tree larger than one pack', { timeout: 120_000 }, () => {
  it.each(['shallow', 'full_history'] as const)('%s: every slice is checked out, the index matches, the history is whole and each byte crosses once', async (mode) => {
    const host = await gitdir('banger-host-', tmp);
    // More files than SLICE_FILES and a blob past SLICE_BYTES: several packs, the big one alone.
    for (let d = 0; d < SLICE_FILES * 2 / 500 + 1; d++) {
      await mkdir(join(host, `d${d}`));
      await Promise.all(Array.from({ length: 500 }, (_, f) => writeFile(join(host, `d${d}`, `f${f}.txt`), `file ${d}/${f}\n`)));
    }
    await writeFile(join(host, 'same-a.txt'), 'one blob at two paths, in different slices\n');
    await writeFile(join(host, 'zz-same-b.txt'), 'one blob at two paths, in different slices\n');
    const big = Buffer.alloc(SLICE_BYTES + 1024);
    for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((i * 2654435761) >>> 0, i);
    await writeFile(join(host, 'm-big.bin'), big);
    await commitAll(host, 'first');
    await writeFile(join(host, 'd0', 'f0.txt'), 'second commit\n');
    await commitAll(host, 'second');
    const dest = join(tmp, `guest-sliced-${mode}`);
    const r = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: dest, mode, readOnly: false });
    expect(await treeOf(dest)).toEqual(await treeOf(host));
    expect((await git(dest, 'status', '--porcelain')).trim()).toBe('');
    expect((await readdir(join(dest, '.git'))).filter((n) => n.startsWith('banger-') && n !== 'banger-workspace')).toEqual([]);
    expect((await readdir(join(dest, '.git', 'objects', 'pack'))).filter((n) => n.endsWith('.pack')).length).toBeGreaterThan(2);
    await git(dest, 'fsck', '--no-progress');
    expect((await git(dest, 'rev-list', '--count', 'HEAD')).trim()).toBe(mode === 'shallow' ? '1' : '2');
    expect(r.bytesSent).toBeLessThan(1.5 * big.length);
  });

  it('the plan sends the small files first, in path order, then the big ones largest first; each object once', async () => {
    const host = await gitdir('banger-host-', tmp);
    await writeFile(join(host, 'a-big.bin'), Buffer.alloc(SMALL_BLOB * 3, 1));
    await writeFile(join(host, 'b-bigger.bin'), Buffer.alloc(SMALL_BLOB * 5, 2));
    await writeFile(join(host, 'c.txt'), 'small\n');
    await mkdir(join(host, 'd'));
    await writeFile(join(host, 'd', 'e.txt'), 'small too\n');
    await writeFile(join(host, 'd', 'same-as-c.txt'), 'small\n');
    const head = await commitAll(host, 'plan');
    const { slices, sent } = await checkoutPlan(host, head);
    const paths = slices.flatMap((s) => s.paths.toString('utf8').split('\0').filter(Boolean));
    expect(paths).toEqual(['c.txt', 'd/e.txt', 'd/same-as-c.txt', 'b-bigger.bin', 'a-big.bin']);
    const ids = slices.flatMap((s) => s.ids);
    expect(new Set(ids).size).toBe(ids.length);
    expect(new Set(ids)).toEqual(sent);
    const commitAndTrees = [head, ...(await Promise.all(['HEAD^{tree}', 'HEAD:d'].map((r) => git(host, 'rev-parse', r)))).map((t) => t.trim())];
    expect(slices[0].ids).toEqual(expect.arrayContaining(commitAndTrees));
  });
});

describe('incremental re-prepare', { timeout: 90_000 }, () => {
  it.each(['shallow', 'full_history'] as const)('%s: a new commit with renames, deletions, mode changes and a file turned directory, plus new uncommitted work: only the difference crosses', async (mode) => {
    const host = await hostRepo();
    const big = Buffer.alloc(2 ** 20);
    for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((i * 2654435761) >>> 0, i);
    await writeFile(join(host, 'big.bin'), big);
    await commitAll(host, 'big');
    await writeFile(join(host, 'edit.txt'), 'uncommitted at the first prepare\n');
    const dest = join(tmp, `inc-${mode}`);
    const guest = streamingLocalGuest();
    const first = await prepareWorkspace(guest, { source: host, guestPath: dest, mode, readOnly: false });
    expect(first.incremental).toBe(false);
    // the guest's own leftovers go (a fresh prepare would not have them), its ignored files stay
    await writeFile(join(dest, 'guest-junk.txt'), 'junk\n');
    await writeFile(join(dest, 'keep.txt'), 'edited in the guest\n');
    await changeEverything(host);
    await commitAll(host, 'second');
    await rm(join(host, 'dir'), { recursive: true, force: true });
    await writeFile(join(host, 'keep.txt'), 'uncommitted on the host\n');
    await writeFile(join(host, 'fresh-untracked.txt'), 'new\n');
    const second = await prepareWorkspace(guest, { source: host, guestPath: dest, mode, readOnly: false });
    expect(second.incremental).toBe(true);
    expect(await treeOf(dest, ['ignored.log'])).toEqual(await treeOf(host, ['ignored.log']));
    expect((await git(dest, 'rev-parse', 'HEAD')).trim()).toBe((await git(host, 'rev-parse', 'HEAD')).trim());
    expect((await git(dest, 'symbolic-ref', '--short', 'HEAD')).trim()).toBe('main');
    expect((await git(dest, 'diff', '--cached', '--name-only')).trim()).toBe('');
    await git(dest, 'fsck', '--no-progress');
    expect(second.bytesSent).toBeLessThan(first.bytesSent / 4); // big.bin did not cross again
    // and export still works against the new HEAD
    const x = await exportWorkspace(guest, { guestPath: dest, baseCommit: second.headCommit });
    expect(x.changedFiles.sort()).toEqual(['fresh-untracked.txt', 'keep.txt']);
  });
});

describe('re-prepare from the marker the daemon remembers', { timeout: 90_000 }, () => {
  it('one guest command when the guest still holds it; the usual way when it does not; never over the guest\'s own commits', async () => {
    const host = await hostRepo();
    const dest = join(tmp, 'remembered');
    const first = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: dest, mode: 'shallow', readOnly: false });
    await changeEverything(host);
    await commitAll(host, 'second');
    await writeFile(join(host, 'keep.txt'), 'uncommitted again\n');
    await writeFile(join(dest, 'guest-junk.txt'), 'junk\n'); // the guest's leftovers go, as in any re-prepare
    const commands: string[] = [];
    const counting: GuestExec = (c, o) => (commands.push(c), streamingLocalGuest()(c, o));
    const second = await prepareWorkspace(counting, { source: host, guestPath: dest, mode: 'shallow', readOnly: false, lastMarker: first.resumePoint!.marker });
    expect(commands).toHaveLength(1);
    expect(second).toMatchObject({ incremental: true, previousHead: first.headCommit });
    await rm(join(host, 'dir'), { recursive: true, force: true });
    expect(await treeOf(dest, ['ignored.log'])).toEqual(await treeOf(host, ['ignored.log']));
    await git(dest, 'fsck', '--no-progress');
    // a stale marker (not what the guest holds): the usual first command, then the update
    commands.length = 0;
    await writeFile(join(host, 'keep.txt'), 'and again\n');
    const third = await prepareWorkspace(counting, { source: host, guestPath: dest, mode: 'shallow', readOnly: false, lastMarker: first.resumePoint!.marker });
    expect(commands.length).toBeGreaterThan(1);
    expect(await readFile(join(dest, 'keep.txt'), 'utf8')).toBe('and again\n');
    // the guest committed: its marker still matches, its HEAD does not; refused as before, the commit kept
    await git(dest, '-c', 'user.name=g', '-c', 'user.email=g@x', 'commit', '-qam', 'guest work');
    const guestHead = (await git(dest, 'rev-parse', 'HEAD')).trim();
    const err = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: dest, mode: 'shallow', readOnly: false, lastMarker: third.resumePoint!.marker }).catch((e) => e);
    expect(err).toBeInstanceOf(BangerError);
    expect(err.message).toMatch(/already holds a git repository/);
    expect((await git(dest, 'rev-parse', 'HEAD')).trim()).toBe(guestHead);
  });
});

describe('resume (the workspace cache\'s hit)', { timeout: 90_000 }, () => {
  /** A cached work disk's workspace: what a prepare with every kind of change left, copied whole; and the host's new delta. */
  async function cachedWorkspace(name: string) {
    const host = await hostRepo();
    await changeEverything(host); // the delta the cached workspace holds, files become directories and back
    const cached = join(tmp, `${name}-cached`);
    const first = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: cached, mode: 'shallow', readOnly: false });
    const clone = join(tmp, `${name}-clone`);
    await promisify(execFile)('cp', ['-a', cached, clone]);
    // the host's work since: all of that undone, other changes made
    await git(host, 'reset', '-q', '--hard');
    await git(host, 'clean', '-fdq');
    await writeFile(join(host, 'keep.txt'), 'changed at the hit\n');
    await unlink(join(host, 'run.sh'));
    await writeFile(join(host, 'edit.txt'), 'after\n'); // the same change as before
    await mkdir(join(host, 'brand'));
    await writeFile(join(host, 'brand', 'new.txt'), 'untracked at the hit\n');
    const fresh = join(tmp, `${name}-fresh`);
    await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: fresh, mode: 'shallow', readOnly: false });
    return { host, clone, fresh, point: first.resumePoint! };
  }
  const counting = (commands: string[]): GuestExec => (c, o) => (commands.push(c), streamingLocalGuest()(c, o));
  const status = (dir: string) => git(dir, 'status', '--porcelain=v1', '--untracked-files=all');

  it('from one delta over HEAD to another in one guest command: the tree and status equal a fresh prepare\'s', async () => {
    const { host, clone, fresh, point } = await cachedWorkspace('resume');
    expect(point.marker).toContain(host);
    const commands: string[] = [];
    const r = await prepareWorkspace(counting(commands), { source: host, guestPath: clone, mode: 'shallow', readOnly: false, resume: point });
    expect(commands).toHaveLength(1);
    expect(r).toMatchObject({ incremental: true, previousHead: r.headCommit });
    expect(r.bytesSent).toBeLessThan(12 * 1024); // the lists and one tar record (10 KiB) of the new files
    expect(await treeOf(clone)).toEqual(await treeOf(fresh));
    expect(await status(clone)).toBe(await status(fresh));
    expect((await git(clone, 'diff', '--cached', '--name-only')).trim()).toBe('');
    // and it resumes from there in turn: the result's own resume point
    expect(r.resumePoint?.marker).toBe((await readFile(join(clone, '.git', 'banger-workspace'), 'utf8')).trim());
  });

  it('a workspace that is not the one the resume point names (another marker): nothing touched, a normal re-prepare instead', async () => {
    const { host, clone, fresh, point } = await cachedWorkspace('mismatch');
    const before = await treeOf(clone);
    const commands: string[] = [];
    let afterFirst: Record<string, string> | undefined;
    const watching: GuestExec = async (c, o) => {
      commands.push(c);
      const r = await streamingLocalGuest()(c, o);
      if (commands.length === 1) afterFirst = await treeOf(clone);
      return r;
    };
    const r = await prepareWorkspace(watching, { source: host, guestPath: clone, mode: 'shallow', readOnly: false, resume: { ...point, marker: point.marker.replace('"preparedAt":"', '"preparedAt":"1') } });
    expect(commands.length).toBeGreaterThan(1);
    expect(afterFirst).toEqual(before); // the resume command changed nothing
    expect(r.incremental).toBe(true);
    expect(await treeOf(clone)).toEqual(await treeOf(fresh));
  });

  it('a parent the old delta made a symlink: its target\'s files are not removed through it', async () => {
    const host = await gitdir('banger-host-', tmp);
    await mkdir(join(host, 'lib'));
    await mkdir(join(host, 'vendor'));
    await writeFile(join(host, 'lib', 'f'), 'lib\n');
    await writeFile(join(host, 'vendor', 'f'), 'vendor\n');
    await commitAll(host, 'base');
    await rm(join(host, 'lib'), { recursive: true });
    await symlink('vendor', join(host, 'lib')); // the delta: lib/f deleted, the link lib sent
    const cached = join(tmp, 'symlinked-cached');
    const first = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: cached, mode: 'shallow', readOnly: false });
    const clone = join(tmp, 'symlinked-clone');
    await promisify(execFile)('cp', ['-a', cached, clone]);
    const r = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: clone, mode: 'shallow', readOnly: false, resume: first.resumePoint });
    expect(r.resumed).toBe(true);
    expect(await readFile(join(clone, 'vendor', 'f'), 'utf8')).toBe('vendor\n');
    expect(await treeOf(clone)).toEqual(await treeOf(cached));
  });

  it('a resume cut short leaves the path marked interrupted: the next prepare neither resumes nor updates it, and says so', async () => {
    const { host, clone, point } = await cachedWorkspace('cut-resume');
    const dropEnd = endDroppingGuest();
    const cut = await prepareWorkspace(dropEnd, { source: host, guestPath: clone, mode: 'shallow', readOnly: false, resume: point }).catch((e) => e);
    expect(cut.message).toMatch(/the delta was cut short/);
    expect((await readFile(join(clone, '.git', 'banger-workspace'), 'utf8')).trim()).toBe('interrupted');
    const again = await prepareWorkspace(streamingLocalGuest(), { source: host, guestPath: clone, mode: 'shallow', readOnly: false, resume: point }).catch((e) => e);
    expect(again).toBeInstanceOf(BangerError);
    expect(again.message).toMatch(/last update was cut short/);
    expect(again.hint).toMatch(/--replace/);
  });

  it('resumeWhen false (the caller\'s check failed): declined before the guest changes anything, a normal re-prepare instead; a repository that fails inspection fails as such', async () => {
    const { host, clone, fresh, point } = await cachedWorkspace('declined');
    const commands: string[] = [];
    const r = await prepareWorkspace(counting(commands), { source: host, guestPath: clone, mode: 'shallow', readOnly: false, resume: point, resumeWhen: Promise.resolve(false) });
    expect(commands.length).toBeGreaterThan(1);
    expect(await treeOf(clone)).toEqual(await treeOf(fresh));
    expect(r.resumePoint?.marker).not.toBe(point.marker);
    const notRepo = await tempDir('banger-not-repo-', tmp);
    const err = await prepareWorkspace(streamingLocalGuest(), { source: notRepo, guestPath: clone, mode: 'shallow', readOnly: false, resume: r.resumePoint }).catch((e) => e);
    expect(err).toBeInstanceOf(BangerError);
    expect(err.message).toMatch(/is not a git repository/);
    expect(await treeOf(clone)).toEqual(await treeOf(fresh));
  });
});

describe('export to a file, bounded', { timeout: 120_000 }, () => {
  async function guestRepoWithWork(): Promise<string> {
    const dir = await hostRepo();
    await changeEverything(dir);
    await writeFile(join(dir, 'binary.bin'), Buffer.from([0, 1, 2, 255, 254, 0, 10]));
    return dir;
  }

  it('writes exactly exportWorkspace\'s patch, replacing an existing file', async () => {
    const repo = await guestRepoWithWork();
    const guest = streamingLocalGuest();
    const output = join(tmp, 'same.patch');
    await writeFile(output, 'old content');
    const streamed = await exportWorkspaceToFile(guest, { guestPath: repo, outputPath: output, maxBytes: 2 ** 30, timeoutMs: 60_000 });
    const whole = await exportWorkspace(guest, { guestPath: repo });
    expect(await readFile(output)).toEqual(whole.patch);
    expect(streamed.patchBytes).toBe(whole.patch.length);
    expect(streamed.changedFiles).toEqual(whole.changedFiles);
    expect(streamed.baseCommit).toBe(whole.baseCommit);
    expect(streamed.hasChanges).toBe(true);
  });

  it('over the cap: the named error, the output path untouched, no temp file left', async () => {
    const repo = await guestRepoWithWork();
    const dir = await tempDir('banger-out-', tmp);
    const output = join(dir, 'capped.patch');
    await writeFile(output, 'previous patch');
    const err = await exportWorkspaceToFile(streamingLocalGuest(), { guestPath: repo, outputPath: output, maxBytes: 64, timeoutMs: 60_000 }).catch((e) => e);
    expect(err).toBeInstanceOf(BangerError);
    expect(err.message).toMatch(/^PatchTooLarge: .*maxPatchBytes \(64 bytes\)/);
    expect(await readFile(output, 'utf8')).toBe('previous patch');
    expect(await readdir(dir)).toEqual(['capped.patch']);
  });

  it('a guest that never finishes: a timeout error, nothing written', async () => {
    const dir = await tempDir('banger-out-', tmp);
    const hung: GuestExec = (_command, opts = {}) => streamingLocalGuest()('printf "BANGER-EXPORT 1 "; sleep 60', opts);
    const err = await exportWorkspaceToFile(hung, { guestPath: '/nowhere', outputPath: join(dir, 'p.patch'), maxBytes: 2 ** 30, timeoutMs: 1500 }).catch((e) => e);
    expect(err).toBeInstanceOf(BangerError);
    expect((err as BangerError).kind).toBe('timeout');
    expect(await readdir(dir)).toEqual([]);
  });

  it('a 256 MiB change grows the exporting process\'s peak RSS by less than 64 MiB', async () => {
    const repo = await gitdir('banger-big-', tmp);
    await writeFile(join(repo, 'seed.txt'), 'seed\n');
    await commitAll(repo, 'seed');
    const warm = await gitdir('banger-warm-', tmp);
    await writeFile(join(warm, 'a.txt'), 'a\n');
    await commitAll(warm, 'a');
    await writeFile(join(warm, 'a.txt'), 'b\n');
    // 256 MiB of text lines, written in pieces (the test itself never holds it)
    const line = `${'x'.repeat(1023)}\n`;
    const chunk = line.repeat(1024); // 1 MiB
    const ws = createWriteStream(join(repo, 'huge.txt'));
    for (let i = 0; i < 256; i++) if (!ws.write(chunk)) await new Promise<void>((r) => ws.once('drain', () => r()));
    await new Promise<void>((res, rej) => ws.end((e?: Error | null) => (e ? rej(e) : res())));
    const output = join(tmp, 'huge.patch');
    const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', join(import.meta.dirname, '..', 'support', 'export-rss-child.ts'), repo, output, warm], {
      maxBuffer: 1 << 20,
      env: process.env,
    });
    const r = JSON.parse(stdout) as { before: number; after: number; patchBytes: number };
    expect(r.patchBytes).toBeGreaterThan(256 * 2 ** 20);
    expect((await lstat(output)).size).toBe(r.patchBytes);
    expect(r.after - r.before).toBeLessThan(64 * 2 ** 20);
    await rm(output);
  });
});
