import { open, readFile, rename, stat, unlink } from 'node:fs/promises';
import type { PrepareResult } from '../../rpc/types.js';
import { randomBytes } from 'node:crypto';
import { basename, dirname, isAbsolute, join, posix, resolve } from 'node:path';
import { PassThrough, Readable, Transform, Writable } from 'node:stream';
import { execa } from 'execa';
import { BangerError, errorMessage } from '../../errors.js';
import { run, type Runner } from '../exec/runner.js';
import { shellQuote } from '../exec/shell.js';
import { HOST_GIT_ENV, hostGit, hostGitPaths, inspectRepo, unquoteGitPath, worktreeDelta, type RepoInfo, type WorktreeDelta } from './host-repo.js';
import { appendPack, appendTo, checkoutPlan, packObjects, removeHostPack, restOfHistory, type HostPack } from './workspace-pack.js';

/**
 * Workspaces: copy a host git repository into a guest and get the guest's work back as a patch.
 *
 * prepare streams everything through the guest's stdin (git pack-objects for history, tar for the working
 * tree) — never a whole-repo file on the host. It builds the repository in a staging directory next to the
 * guest path and moves it into place at the end, so an interrupted prepare never leaves a half-made workspace
 * at the guest path (the next prepare of the same path removes the stale staging directory).
 *
 * export runs one guest script that never writes to the repository: a temporary index and a temporary object
 * directory (with the repository's objects as an alternate) live in a temp dir that a trap removes.
 *
 * Every guest command is `sh -c <constant script> banger <values...>`, built with shellQuote: the scripts
 * below are fixed text and every value reaches them only as a quoted positional parameter.
 */

// ---------------------------------------------------------------------------------------------------------
// The guest

export interface GuestExecResult {
  exitCode: number;
  stdout: Buffer;
  stderr: Buffer;
}

/** Run a command in the guest (through a POSIX shell, as root). The lead wires it to ssh2. */
export interface GuestExec {
  (
    command: string,
    opts?: {
      stdin?: NodeJS.ReadableStream | Buffer | string;
      signal?: AbortSignal;
      /** Where stdout goes (piped with backpressure, not ended); the result's stdout is then empty. */
      stdout?: NodeJS.WritableStream;
      /** Where stderr goes, likewise. */
      stderr?: NodeJS.WritableStream;
    },
  ): Promise<GuestExecResult>;
}

export const WORKSPACE_MODES = ['shallow', 'full_history', 'full_copy'] as const;
export type WorkspaceMode = (typeof WORKSPACE_MODES)[number];

export interface PrepareOptions {
  /** Host directory inside the repository; resolved against the process's cwd when relative. */
  source: string;
  /** Absolute guest path. prepare only requires it absolute; the /root rule is validateGuestPath's. */
  guestPath: string;
  /** A new branch the guest checks out at the base. */
  branch?: string;
  /** A revision (branch, tag, sha, HEAD~2, ...) to base the guest on instead of HEAD. */
  from?: string;
  mode: WorkspaceMode;
  readOnly: boolean;
  /** Replace whatever is at guestPath. */
  replace?: boolean;
  /**
   * How full_copy's tar crosses the link: zstd needs zstd on both ends (the host's tar runs `zstd -1`, the guest's
   * tar `zstd -d`); absent: none. See LinkCompression.
   */
  compression?: LinkCompression;
  /**
   * Where a plain prepare of this same source, HEAD and mode left the guest path, when the caller knows the path
   * holds exactly that (the workspace cache's hit: a work disk cloned from one stored right after that prepare).
   * The guest checks the marker; on a match only the difference between the two deltas crosses, in one guest
   * command that starts no git process unless files must come back from HEAD. Otherwise a normal prepare runs.
   * That command starts at once, while the host inspects the repository; with `resumeWhen` it changes nothing
   * until the caller's own check (run alongside) resolves true.
   */
  resume?: ResumePoint;
  resumeWhen?: Promise<boolean>;
  /**
   * The marker this path's last prepare wrote, as the caller remembers it (the daemon, per VM and path). When it
   * names a plain workspace of this source and mode, the in-place update runs at once, in one guest command that
   * first checks the guest still holds that marker at that HEAD; otherwise (or when it does not) as usual.
   */
  lastMarker?: string;
}

/** What a plain prepare left at the guest path: HEAD's tree with the host's delta over it, and its marker. */
export interface ResumePoint {
  /** The content of the workspace's .git/banger-workspace (one line of JSON, preparedAt included). */
  marker: string;
  delta: WorktreeDelta;
}

/**
 * Compression on the link, chosen by end-to-end measurement under TCG (npm run bench -- --only prepare: `git
 * archive | C | ssh 'C -d | tar -x'`, one guest, side by side). zstd -1 against none: 1.58x and 1.77x the
 * throughput on a generated 10,000-file repository and on this project's; lz4 1.20x and 1.75x; gzip -1 1.06x and
 * 2.05x (its inflate and CRC cost the guest's emulated CPU). zstd is used for full_copy's tar. The packs of
 * shallow and full_history are zlib-compressed object by object already, and their delta is usually small.
 */
export type LinkCompression = 'zstd' | 'none';

export interface WorkspaceProgress {
  /** inspect | check | history | refs | tree | finish */
  stage: string;
  /** Bytes pushed into the guest's stdin so far in this stage (streaming stages only). */
  bytes?: number;
}

export interface PrepareContext {
  signal?: AbortSignal;
  onProgress?: (p: WorkspaceProgress) => void;
  runner?: Runner;
}

/** The wire's prepare result (src/rpc/types.ts); the VM id is filled in by the caller that knows the VM. */
export type WorkspacePrepareResult = Omit<PrepareResult, 'vmId'> & {
  vmId?: string;
  /** An incremental re-prepare: the guest workspace's HEAD before it (the workspace cache checks a hit with it). */
  previousHead?: string;
  /** A plain prepare's resume point (stored with a cached work disk). */
  resumePoint?: ResumePoint;
  /** The prepare went from `resume` (one guest command), not a full or incremental one. */
  resumed?: boolean;
};

export interface ExportOptions {
  guestPath: string;
  /** A revision in the guest; default the guest's HEAD. */
  baseCommit?: string;
}

export interface WorkspaceExportResult {
  guestPath: string;
  /** The base actually used, resolved to a commit sha in the guest. */
  baseCommit: string;
  /** Exactly the bytes of `git diff --binary` (apply with `git apply`; it carries binary hunks). */
  patch: Buffer;
  changedFiles: string[];
  hasChanges: boolean;
}

// ---------------------------------------------------------------------------------------------------------
// Validation (the RPC layer calls these; prepare/export call the ones that do not depend on /root)

const CONTROL_RE = /[\x00-\x1f\x7f]/;

/** A guest path: absolute, under /root, no `..`, no control characters. Returns it normalised. */
export function validateGuestPath(p: unknown): string {
  const hint = 'a guest path is an absolute path under /root, e.g. /root/repo';
  if (typeof p !== 'string' || p === '') throw new BangerError('usage', 'the guest path is empty', hint);
  if (CONTROL_RE.test(p)) throw new BangerError('usage', `guest path ${JSON.stringify(p)} contains control characters`, hint);
  if (!p.startsWith('/')) throw new BangerError('usage', `guest path ${JSON.stringify(p)} is not absolute`, hint);
  if (p.split('/').includes('..')) throw new BangerError('usage', `guest path ${JSON.stringify(p)} contains '..'`, hint);
  const norm = normalizeAbsolute(p);
  if (!norm.startsWith('/root/')) throw new BangerError('usage', `guest path ${JSON.stringify(p)} is not under /root`, hint);
  return norm;
}

function normalizeAbsolute(p: string): string {
  let norm = posix.normalize(p);
  while (norm.length > 1 && norm.endsWith('/')) norm = norm.slice(0, -1);
  return norm;
}

/** git check-ref-format's rules, plus no leading '-'. Returns the name. */
export function validateRefName(r: unknown, what = 'ref name'): string {
  const fail = (why: string): never => {
    throw new BangerError(
      'usage',
      `invalid ${what} ${JSON.stringify(r)}: ${why}`,
      'git ref names may not contain spaces, control characters, ~ ^ : ? * [ \\, "..", "@{", "//", may not start with "-", ' +
        '"/" or ".", and may not end with "/", "." or ".lock"',
    );
  };
  if (typeof r !== 'string' || r === '') return fail('empty');
  if (r.length > 255) fail('longer than 255 characters');
  if (r.startsWith('-')) fail("starts with '-'");
  if (/[\x00-\x20\x7f~^:?*[\\]/.test(r)) fail('contains a space, a control character or one of ~ ^ : ? * [ \\');
  if (r.includes('..')) fail("contains '..'");
  if (r.includes('@{')) fail("contains '@{'");
  if (r === '@') fail("is '@'");
  if (r.startsWith('/') || r.endsWith('/') || r.includes('//')) fail("has an empty '/' component");
  if (r.endsWith('.')) fail("ends with '.'");
  for (const c of r.split('/')) {
    if (c.startsWith('.')) fail("has a component starting with '.'");
    if (c.endsWith('.lock')) fail("has a component ending with '.lock'");
  }
  return r;
}

/**
 * A new branch name: git's ref-name rules, not "HEAD", and only letters, digits and . _ / + , = @ % -
 * (no shell metacharacters: values are always quoted, but a branch called `$(x)` only ever means trouble).
 */
export function validateBranchName(b: unknown): string {
  const name = validateRefName(b, 'branch name');
  if (name === 'HEAD') throw new BangerError('usage', 'invalid branch name "HEAD"', 'pick another branch name');
  if (!/^[\p{L}\p{N}._/+,=@%-]+$/u.test(name)) {
    throw new BangerError(
      'usage',
      `invalid branch name ${JSON.stringify(name)}: only letters, digits and . _ / + , = @ % - are allowed`,
      'pick a branch name without shell metacharacters, e.g. agent/fix-123',
    );
  }
  return name;
}

/**
 * A revision expression (`main`, `v1.2`, a sha, `HEAD~2`, `origin/main^{commit}`): no leading '-' (it would be
 * an option), no control characters, at most 255 characters. Whether it names a commit is checked by git.
 */
export function validateRevision(r: unknown, what = 'revision'): string {
  const hint = 'give a branch, a tag or a commit sha';
  if (typeof r !== 'string' || r === '') throw new BangerError('usage', `the ${what} is empty`, hint);
  if (r.length > 255) throw new BangerError('usage', `the ${what} is longer than 255 characters`, hint);
  if (r.startsWith('-')) throw new BangerError('usage', `invalid ${what} ${JSON.stringify(r)}: starts with '-'`, hint);
  if (CONTROL_RE.test(r)) throw new BangerError('usage', `invalid ${what} ${JSON.stringify(r)}: contains control characters`, hint);
  return r;
}

function splitNul(buf: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let start = 0;
  for (;;) {
    const i = buf.indexOf(0, start);
    if (i < 0) {
      if (start < buf.length) out.push(buf.subarray(start));
      return out;
    }
    if (i > start) out.push(buf.subarray(start, i));
    start = i + 1;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Guest scripts. Fixed text; values arrive as positional parameters ($1...). Exit codes of our own:
//   3 not a repository / no such directory, 4 base does not resolve, 10 guest path taken,
//   11 host changes do not apply on `from`, 12 branch exists, 127 a tool is missing.

const preamble = (tools: string) => `set -eu
unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES GIT_COMMON_DIR GIT_NAMESPACE GIT_CEILING_DIRECTORIES GIT_SHALLOW_FILE || :
for tool in ${tools}; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is not installed in the guest" >&2; exit 127; }
done
`;
const PREAMBLE = preamble('git tar');

/** Describe what holds $dest on stdout ("repo <sha>" | "nonempty") and exit 10 when it may not be replaced. */
const DEST_CHECK = `
if [ -e "$dest" ] || [ -h "$dest" ]; then
  if [ -d "$dest" ] && [ ! -h "$dest" ] && [ -z "$(ls -A -- "$dest")" ]; then :
  elif [ "$replace" = 1 ]; then :
  elif [ -e "$dest/.git" ]; then
    printf 'repo %s\\n' "$(git -C "$dest" rev-parse -q --verify HEAD 2>/dev/null || echo unknown)"
    [ ! -f "$dest/.git/banger-workspace" ] || { printf 'marker '; head -c 4096 -- "$dest/.git/banger-workspace"; }
    exit 10
  else
    echo nonempty; exit 10
  fi
fi
`;

/** Refuse a taken guest path, clear a stale staging dir (ENTER_STAGE: make it anew, enter it). Needs $dest $stage $replace. */
const CLEAR_STAGE = `${DEST_CHECK}
if [ -e "$stage" ] || [ -h "$stage" ]; then rm -rf -- "$stage"; fi
`;
const ENTER_STAGE = `${CLEAR_STAGE}mkdir -p -- "$stage"
cd -- "$stage"
`;

/**
 * $1 dest, $2 stage, $3 replace, $4 full_copy (0|1), $5 host HEAD sha, $6 base sha, $7 branch to check out at
 * the base when it differs from HEAD ('' = detached), $8 new branch ('' = none), $9 readOnly (0|1), $10 marker,
 * $11 the host's current branch ('' = detached), $12.. shallow commits.
 * `git update-ref --stdin` commands on stdin, or in the file $refs when it is set (not read for full_copy).
 * The end of FULL_COPY_SCRIPT and of PACKED_SCRIPT. A plain full copy (no --from) keeps the host's index as it is,
 * unrefreshed, like `tar c | ssh tar x`: the copied stat data never matches the guest's files, so a refresh
 * re-hashes every file in the guest (not measured on its own); git's first command in the guest does it.
 */
const FINISH_BODY = `dest=$1 stage=$2 replace=$3 fullcopy=$4 head=$5 base=$6 target=$7 newbranch=$8 readonly=$9
shift 9
marker=$1 headbranch=$2
shift 2
cd -- "$stage"
if [ "$fullcopy" = 0 ]; then
  : > .git/shallow
  for c in "$@"; do printf '%s\\n' "$c" >> .git/shallow; done
  [ -s .git/shallow ] || rm -f .git/shallow
  git update-ref --stdin < "\${refs:-/dev/stdin}"
  [ -z "\${inbox:-}" ] || rm -f -- $inbox
  IFS= read -r symref < .git/HEAD || symref=
  if [ -z "$headbranch" ]; then git update-ref --no-deref HEAD "$head"
  elif [ "$symref" != "ref: refs/heads/$headbranch" ]; then git symbolic-ref HEAD "refs/heads/$headbranch"; fi
fi
[ "$base" = "$head" ] || git update-index -q --refresh >/dev/null 2>&1 || :
if [ "$base" != "$head" ]; then
  before=$(git rev-parse -q --verify refs/stash || :)
  git -c user.name=banger -c user.email=banger@localhost -c commit.gpgsign=false stash push -q -u >/dev/null
  after=$(git rev-parse -q --verify refs/stash || :)
  if [ -n "$target" ]; then git checkout -q "$target" --; else git checkout -q --detach "$base" --; fi
  if [ "$after" != "$before" ]; then
    if ! git stash pop -q >/dev/null 2>.git/banger-pop.err; then
      echo "the host's uncommitted changes do not apply cleanly on top of $base:" >&2
      git diff --name-only --diff-filter=U >&2 || :
      cat .git/banger-pop.err >&2 || :
      exit 11
    fi
    rm -f .git/banger-pop.err
  fi
fi
if [ -n "$newbranch" ]; then
  if git show-ref -q --verify "refs/heads/$newbranch"; then echo "branch $newbranch already exists in the repository" >&2; exit 12; fi
  git checkout -q -b "$newbranch"
fi
printf '%s\\n' "$marker" > .git/banger-workspace
${DEST_CHECK}
if [ -e "$dest" ] || [ -h "$dest" ]; then
  if [ -f "$dest/.git/banger-workspace" ]; then
    umount -- "$dest/.git" 2>/dev/null || :
    umount -- "$dest" 2>/dev/null || :
  fi
  rm -rf -- "$dest"
fi
mv -- "$stage" "$dest"
mounted=0
if [ "$readonly" = 1 ]; then
  (cd -- "$dest" && find . -path ./.git -prune -o ! -type l -exec chmod a-w {} +)
  if mount --bind "$dest" "$dest" 2>/dev/null; then
    if mount -o remount,bind,ro "$dest" 2>/dev/null && mount --bind "$dest/.git" "$dest/.git" 2>/dev/null &&
       mount -o remount,bind,rw "$dest/.git" 2>/dev/null; then
      mounted=1
    else
      umount -- "$dest/.git" 2>/dev/null || :
      umount -- "$dest" 2>/dev/null || :
    fi
  fi
fi
echo "banger-prepared mounted=$mounted"
`;
/**
 * The host's working-tree delta on top of a checked-out tree, in $stage. stdin: `<n> <tar>\n`, n bytes of
 * NUL-terminated paths the host deleted (or replaced by a directory), then, when tar is 1, a tar of the host's
 * changed and untracked files, then `end\n` (DELTA_END). `read` takes the first line byte by byte and `head -c` reads no more than n bytes,
 * so the tar starts where it should. Directories the deletions leave empty go too (git's checkout never has empty
 * directories). An empty part starts no process (each costs about 60 ms under TCG). No index refresh: the files
 * the tar wrote are the only ones whose stat data the index does not have, and git status hashes just those.
 */
const REMOVE_N_PATHS = `if [ "$n" -gt 0 ]; then
  head -c "$n" > .git/banger-deleted
  xargs -0 rm -rf -- < .git/banger-deleted
  xargs -0 dirname -z -- < .git/banger-deleted | xargs -0 rmdir -p --ignore-fail-on-non-empty -- 2>/dev/null || :
  rm -f .git/banger-deleted
fi
`;
/**
 * Written over the marker before an in-place change begins (resume, incremental): a change cut short leaves this,
 * which no marker matches, so the next prepare neither resumes nor updates from a state it does not know; it
 * names the path as interrupted, and --replace starts over.
 */
const INTERRUPTED = 'interrupted';
const MARK_INTERRUPTED = `printf '%s\\n' ${INTERRUPTED} > .git/banger-workspace
`;
/**
 * The `end` line after a tar: GNU tar reads whole 10 KiB records and stops at the one that ends the archive (the
 * host's tar pads to records), so the line comes next; a stream cut anywhere before it fails here, even at a tar
 * header, where tar itself would end without complaint.
 */
const endLine = (what: string) => `IFS= read -r trailer || trailer=
[ "$trailer" = end ] || { echo "${what} was cut short" >&2; exit 1; }
`;
const DELTA_END = endLine('the delta');
const TREE_END = endLine('the tree');
const APPLY_DELTA = `[ "$incremental" = 0 ] || git clean -fdq
IFS=' ' read -r n withtar
case "$n$withtar" in *[!0-9]*|'') echo "malformed delta header" >&2; exit 1 ;; esac
${REMOVE_N_PATHS}[ "$withtar" = 0 ] || tar -x -f - --no-same-owner
${DELTA_END}[ "$incremental" = 0 ] || printf '%s\\n' "$marker" > .git/banger-workspace
`;
/**
 * From one delta over HEAD to another, in the workspace a plain prepare left (ResumePoint): $1 dest, $2 the marker
 * it must hold (else exit 13, nothing touched). stdin: `<n> <r> <tar 0|1>\n`, the new marker's line, n bytes of
 * NUL-terminated paths to remove (with the directories they leave empty), r bytes of paths to check out of the
 * index again (HEAD's files the old delta had changed or deleted), then, when tar is 1, a tar of the new delta's
 * files, then `end\n`. stdin's end before the first line also exits 13 untouched (the host declined). No git process unless
 * r > 0; no walk of the tree.
 */
const RESUME_SCRIPT = `${PREAMBLE}dest=$1 expected=$2
cd -- "$dest" 2>/dev/null || exit 13
IFS= read -r have < .git/banger-workspace 2>/dev/null || exit 13
[ "$have" = "$expected" ] || exit 13
IFS=' ' read -r n restore withtar || exit 13
case "$n$restore$withtar" in *[!0-9]*|'') echo "malformed resume header" >&2; exit 1 ;; esac
IFS= read -r marker || { echo "malformed resume header" >&2; exit 1; }
${MARK_INTERRUPTED}${REMOVE_N_PATHS}[ "$restore" = 0 ] || head -c "$restore" | git checkout-index -f -u -z --stdin
[ "$withtar" = 0 ] || tar -x -f - --no-same-owner
${DELTA_END}printf '%s\\n' "$marker" > .git/banger-workspace
`;

/** One pack as the host made it, with its index, into objects/pack (the idx written aside and moved in whole: git ignores a pack without one). */
const RECEIVE_PACK = `case "$name" in *[!0-9a-f]*|'') echo "malformed pack header" >&2; exit 1 ;; esac
  case "$packbytes$idxbytes$pathbytes" in *[!0-9]*|'') echo "malformed pack header" >&2; exit 1 ;; esac
  head -c "$packbytes" > ".git/objects/pack/pack-$name.pack"
  head -c "$idxbytes" > .git/banger-idx
  mv -- .git/banger-idx ".git/objects/pack/pack-$name.idx"`;

/**
 * An in-place re-prepare in one guest command, in the workspace itself: $1 dest, $2 the marker it must hold and $3
 * the HEAD it must be at (else exit 13, nothing touched: the guest's own commits are never reset away), $4 the new
 * HEAD, $5 its branch ('' = detached), $6 the new marker, then shallow commits to add, `--`, and ref/sha pairs to
 * set. stdin: the packs of the objects the guest lacks as PACKED_SCRIPT
 * takes them (no paths), `end\n`, then APPLY_DELTA's stdin. The tree is reset to the new HEAD (git writes only the
 * files that differ), untracked non-ignored files go, and the delta goes on top. No index-pack: the host made the
 * pack's index.
 */
const INCREMENTAL_SCRIPT = `${PREAMBLE}dest=$1 expected=$2 oldhead=$3 head=$4 headbranch=$5 marker=$6 incremental=1
shift 6
cd -- "$dest" 2>/dev/null || exit 13
IFS= read -r have < .git/banger-workspace 2>/dev/null || exit 13
[ "$have" = "$expected" ] || exit 13
IFS= read -r now < .git/HEAD || exit 13
case "$now" in
  'ref: '*) if [ -f ".git/\${now#ref: }" ]; then IFS= read -r now < ".git/\${now#ref: }"; else now=$(git rev-parse -q --verify HEAD || :); fi ;;
esac
[ "$now" = "$oldhead" ] || exit 13
${MARK_INTERRUPTED}ended=0
while IFS=' ' read -r name packbytes idxbytes pathbytes; do
  if [ "$name" = end ]; then ended=1; break; fi
  ${RECEIVE_PACK}
done
[ "$ended" = 1 ] || { echo "the history was cut short" >&2; exit 1; }
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do printf '%s\\n' "$1" >> .git/shallow; shift; done
[ ! -f .git/shallow ] || { sort -u .git/shallow > .git/shallow.new && mv .git/shallow.new .git/shallow; }
[ "$#" -eq 0 ] || shift
[ "$#" -eq 0 ] || { while [ "$#" -ge 2 ]; do printf 'update %s %s\\n' "$1" "$2"; shift 2; done | git update-ref --stdin; }
IFS= read -r symref < .git/HEAD || symref=
if [ -z "$headbranch" ]; then git update-ref --no-deref HEAD "$head"
elif [ "$symref" != "ref: refs/heads/$headbranch" ]; then git symbolic-ref HEAD "refs/heads/$headbranch"; fi
git -c checkout.workers=1 read-tree --reset -u "$head"
${APPLY_DELTA}`;

/**
 * PACKED_SCRIPT's checkout, in the background: one `checkout-index --stdin` for every slice, fed the paths of each
 * slice whose pack is in (its number arrives on the fifo .git/banger-slices once the pack and the path file are
 * written). The receiving loop never waits for the checkout: a fifo of paths would hold 64 KiB, and with the small
 * files first the checkout runs seconds behind the link.
 */
const CHECKOUT_SLICES = `(while IFS= read -r n; do
      cat -- ".git/banger-paths-$n" || { : > .git/banger-relay-failed; exit 1; }
    done < .git/banger-slices | { git read-tree "$head" && exec git -c checkout.workers=1 checkout-index -f -u -z --stdin; })`;

/**
 * A fresh shallow/full_history prepare in one guest command: $1 dest, $2 stage, $3 replace (0|1), $4 object
 * format, $5 the commit to check out, $6.. FINISH_BODY's arguments. stdin (not read when the path is taken):
 * packs made on the host (see workspace-pack.ts: no index-pack in the guest), each as
 * `<name> <pack bytes> <idx bytes> <paths bytes>\n`, the pack, its .idx and the NUL-terminated paths to check out
 * of it; then `end\n`; then `<n>\n` and n bytes of `git update-ref --stdin` commands; then APPLY_DELTA's stdin.
 * Each pack goes into objects/pack, then its .idx, written aside and moved in whole (git ignores a pack without
 * one); then its paths go to one `checkout-index -u --stdin` (CHECKOUT_SLICES; it records their stat data in the
 * index), started after the first pack with the index read from it (`read-tree`, no checkout). It checks a pack's
 * paths out while the next packs arrive; a path whose pack it has not seen yet makes git look in objects/pack
 * again. A stream cut short among the packs ends without the `end` line and fails here, its staging repository
 * never moved into place; the delta's tar after it has its own `end` line (DELTA_END).
 * Under TCG each git process costs 0.06-0.2 s before it does anything, so there are as few as the work needs:
 * one checkout for all the packs (not one per pack), an `init` that makes the directory, copies no templates and
 * sets HEAD's branch, and no index refresh (the checkout recorded every file's stat data). The same goes for the
 * small tools: about 60 ms each.
 * Checkouts run with checkout.workers=1 (no parallel checkout): in a 2-vCPU TCG guest (host load about 4), checking
 * 10,000 files + 32 MiB out of a pack took 17.9 s and 12.6 s with checkout.workers=0 (a worker a CPU, the blobs
 * piped to them) against 10.2 s and 8.4 s with 1 (tar -x of the same tree: 8.5 s and 6.1 s).
 */
const PACKED_SCRIPT = `${PREAMBLE}dest=$1 stage=$2 replace=$3 format=$4 head=$5 incremental=0 marker=
shift 5
${CLEAR_STAGE}
# FINISH_BODY's 11th argument, after the shift: the host's current branch
initbranch=\${11} fmt=
[ "$format" = sha1 ] || fmt=$format
git init -q --template= \${initbranch:+-b "$initbranch"} \${fmt:+--object-format="$fmt"} -- "$stage" >/dev/null
cd -- "$stage"
mkfifo .git/banger-slices
checkout=
ended=0
slice=0
while IFS=' ' read -r name packbytes idxbytes pathbytes; do
  if [ "$name" = end ]; then ended=1; break; fi
  ${RECEIVE_PACK}
  head -c "$pathbytes" > ".git/banger-paths-$slice"
  if [ -z "$checkout" ]; then
    ${CHECKOUT_SLICES} &
    checkout=$!
    exec 3> .git/banger-slices
  fi
  echo "$slice" >&3
  slice=$((slice + 1))
done
[ -z "$checkout" ] || exec 3>&-
[ "$ended" = 1 ] || { echo "the history was cut short" >&2; exit 1; }
[ -n "$checkout" ] || { echo "no packs came" >&2; exit 1; }
IFS= read -r n
case "$n" in *[!0-9]*|'') echo "malformed ref list" >&2; exit 1 ;; esac
head -c "$n" > .git/banger-refs
wait "$checkout" && [ ! -e .git/banger-relay-failed ] || { echo "checking the tree out of the packs failed" >&2; exit 1; }
${APPLY_DELTA}refs=.git/banger-refs inbox='.git/banger-refs .git/banger-slices .git/banger-paths-*'
${FINISH_BODY}`;

/**
 * full_copy in one guest command: $1 dest, $2 stage, $3 replace (0|1), $4 zstd (0|1), $5.. FINISH_BODY's. stdin: a
 * tar of the directory, then `end\n` (TREE_END); or, when $4 is 1, the tar through zstd and nothing after it (zstd
 * reads to the end of its input, and its frame's checksum already fails a stream cut short).
 */
const FULL_COPY_SCRIPT = `${PREAMBLE}dest=$1 stage=$2 replace=$3 unzstd=$4
shift 4
${ENTER_STAGE}
if [ "$unzstd" = 0 ]; then tar -x -f - --no-same-owner
${TREE_END}elif command -v zstd >/dev/null 2>&1; then tar -x --zstd -f - --no-same-owner
else echo "zstd is not installed in the guest" >&2; exit 127; fi
${FINISH_BODY}`;

/** $1 stage. Best-effort removal after a failed prepare. */
const CLEANUP_SCRIPT = `stage=$1
rm -rf -- "$stage"
`;

/** $1 guest path, $2 base ('' = HEAD). One run, writes nothing to the repository. Output framed, see parseExport. */
const EXPORT_SCRIPT = `${preamble('git')}repo=$1 base=$2
cd -- "$repo" 2>/dev/null || { echo "$repo does not exist in the guest" >&2; exit 3; }
here=$(pwd -P)
GIT_CEILING_DIRECTORIES=$(dirname -- "$here"); export GIT_CEILING_DIRECTORIES
top=$(git rev-parse --show-toplevel 2>/dev/null) || { echo "$repo is not a git repository" >&2; exit 3; }
[ "$top" = "$here" ] || { echo "$repo is not the top of a git working tree" >&2; exit 3; }
[ -n "$base" ] || base=HEAD
sha=$(git rev-parse -q --verify "$base^{commit}") || { echo "$base does not name a commit in $repo" >&2; exit 4; }
objects=$(cd -- "$(git rev-parse --git-path objects)" && pwd -P)
tmp=$(mktemp -d "\${TMPDIR:-/tmp}/banger-export.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -- "$tmp/objects"
GIT_INDEX_FILE=$tmp/index GIT_OBJECT_DIRECTORY=$tmp/objects GIT_ALTERNATE_OBJECT_DIRECTORIES=$objects
export GIT_INDEX_FILE GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES
git read-tree "$sha"
git add -A
d() { git -c diff.noprefix=false -c diff.mnemonicPrefix=false -c core.quotePath=false diff --cached --no-renames --no-color --no-ext-diff --no-textconv --submodule=short "$@"; }
d --name-only -z "$sha" -- > "$tmp/names"
n=$(wc -c < "$tmp/names" | tr -d ' ')
printf 'BANGER-EXPORT 1 %s %s\\n' "$sha" "$n"
cat -- "$tmp/names"
d --binary --src-prefix=a/ --dst-prefix=b/ "$sha" --
`;

function guestCommand(script: string, args: string[]): string {
  return shellQuote(['sh', '-c', script, 'banger', ...args]);
}

// ---------------------------------------------------------------------------------------------------------
// Running guest steps and host streams

function abortError(signal: AbortSignal | undefined, what: string): BangerError {
  const reason = signal?.reason;
  const detail =
    reason instanceof Error && reason.name !== 'AbortError' ? `: ${reason.message}` : typeof reason === 'string' ? `: ${reason}` : '';
  return new BangerError('aborted', `${what} aborted${detail}`, undefined, { cause: reason });
}

function tail(s: string | Buffer, lines = 12, maxChars = 2000): string {
  const t = (Buffer.isBuffer(s) ? s.toString('utf8') : s).trim().split('\n').slice(-lines).join('\n');
  return t.length > maxChars ? `…${t.slice(-maxChars)}` : t;
}

/** Await `p`, but reject as soon as `signal` aborts (an exec that ignores its signal cannot hang us). */
function raceAbort<T>(p: Promise<T>, signal: AbortSignal | undefined, what: string): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((res, rej) => {
    const onAbort = () => rej(abortError(signal, what));
    if (signal.aborted) return onAbort();
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => (signal.removeEventListener('abort', onAbort), res(v)),
      (e) => (signal.removeEventListener('abort', onAbort), rej(e)),
    );
  });
}

async function execGuest(
  exec: GuestExec,
  what: string,
  command: string,
  opts: Parameters<GuestExec>[1] & { signal?: AbortSignal },
): Promise<GuestExecResult> {
  if (opts.signal?.aborted) throw abortError(opts.signal, what);
  const p = exec(command, opts);
  p.catch(() => {});
  try {
    return await raceAbort(p, opts.signal, what);
  } catch (e) {
    if (opts.signal?.aborted) throw abortError(opts.signal, what);
    if (e instanceof BangerError) throw e;
    throw new BangerError('host', `${what}: the guest command failed: ${errorMessage(e)}`, undefined, { cause: e });
  }
}

function guestStepError(what: string, r: GuestExecResult): BangerError {
  const err = tail(r.stderr);
  if (r.exitCode === 127) {
    return new BangerError('host', `${what}: ${err || 'a command is missing in the guest'}`, 'the guest image needs git and tar');
  }
  return new BangerError('host', `${what} failed in the guest (exit ${r.exitCode})${err ? `: ${err}` : ''}`);
}

interface HostStream {
  label: string;
  stdout: Readable;
  stdin?: Writable;
  done: Promise<{ ok: boolean; description: string }>;
  running(): boolean;
  kill(): void;
}

/** Start a host process whose stdout is streamed (the host layer's one use of execa outside the runner). */
function startHostStream(
  label: string,
  file: string,
  args: string[],
  opts: { signal?: AbortSignal; input?: Buffer; pipeStdin?: boolean },
): HostStream {
  const child = execa(file, args, {
    cancelSignal: opts.signal,
    env: HOST_GIT_ENV,
    extendEnv: true,
    reject: false,
    ...(opts.input !== undefined ? { input: opts.input } : { stdin: opts.pipeStdin ? 'pipe' : 'ignore' }),
    stdout: 'pipe',
    stderr: 'pipe',
    buffer: { stdout: false, stderr: true },
    encoding: 'buffer',
  });
  let finished = false;
  const done = child.then((r) => {
    finished = true;
    const stderr = tail(Buffer.from(r.stderr as Uint8Array));
    const ok = !r.failed && r.exitCode === 0;
    const how = r.exitCode !== undefined ? `exit ${r.exitCode}` : r.signal ? `killed by ${r.signal}` : r.shortMessage;
    return { ok, description: `${label} failed (${how})${stderr ? `: ${stderr}` : ''}` };
  });
  child.stdin?.on('error', () => {});
  child.stdout!.on('error', () => {});
  return {
    label,
    stdout: child.stdout!,
    stdin: child.stdin ?? undefined,
    done,
    running: () => !finished,
    kill: () => void child.kill(),
  };
}

/**
 * Stream `source` into a guest command's stdin, counting bytes. Host processes that feed it are killed when the
 * guest command fails or the signal aborts, and always awaited: nothing is left running on the host.
 * A host process's failure wins over the guest's (the guest's is then only its consequence); the guest's exit
 * status is the caller's to judge.
 */
async function streamToGuest(
  exec: GuestExec,
  what: string,
  stageName: string | (() => string),
  command: string,
  procs: HostStream[],
  source: Readable,
  ctx: PrepareContext,
): Promise<{ bytes: number; result: GuestExecResult }> {
  const { signal, onProgress } = ctx;
  const stage = typeof stageName === 'string' ? () => stageName : stageName;
  let bytes = 0;
  let last = 0;
  const counter = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      bytes += chunk.length;
      const now = Date.now();
      if (onProgress && now - last >= 100) {
        last = now;
        onProgress({ stage: stage(), bytes });
      }
      cb(null, chunk);
    },
  });
  counter.on('error', () => {});
  source.pipe(counter);
  let result: GuestExecResult | undefined;
  let failure: unknown;
  try {
    result = await execGuest(exec, what, command, { stdin: counter, signal });
  } catch (e) {
    failure = e;
  }
  source.unpipe(counter);
  counter.destroy();
  const killed = new Set<HostStream>();
  if (failure !== undefined || result?.exitCode !== 0) {
    for (const p of procs) {
      if (p.running()) {
        killed.add(p);
        p.kill();
      }
    }
  }
  // Whatever the guest left unread is drained so a host process never blocks on a full pipe.
  source.resume();
  const outcomes = await Promise.all(procs.map((p) => p.done));
  if (signal?.aborted) throw abortError(signal, what);
  procs.forEach((p, i) => {
    if (!killed.has(p) && !outcomes[i].ok) throw new BangerError('host', `${what}: ${outcomes[i].description}`);
  });
  if (failure !== undefined) throw failure;
  if (result!.exitCode === 0) onProgress?.({ stage: stage(), bytes });
  return { bytes, result: result! };
}

// ---------------------------------------------------------------------------------------------------------
// prepare

/**
 * Copy a host repository into the guest at `guestPath`.
 *
 * shallow / full_history: the commits (HEAD's, plus `from`'s, as shallow commits; or everything under refs/heads,
 * refs/tags and refs/remotes) go over as packs made on the host with their indexes: HEAD's tree in slices, each
 * checked out in the guest (`checkout-index -u` after a `read-tree` of HEAD) while the next arrives, then the
 * rest of the history; then the host's changed and untracked non-ignored files as one tar over the checkout;
 * then refs and HEAD are set (the host's current branch name, or detached); the index, with every file's stat
 * data from the checkout, equals HEAD, so the host's uncommitted edits, deletions, mode changes and untracked files show in the guest as
 * uncommitted changes. Ignored files stay behind. Staged-but-uncommitted changes on the host arrive unstaged; an
 * untracked nested repository arrives as an empty directory. One guest command in all, full_copy's too.
 *
 * full_copy: the repository directory as it is (.git, ignored files and submodules included) as one tar,
 * zstd-compressed when `compression` says so.
 *
 * from: resolved on the host (never silently HEAD). When it differs from HEAD, the guest stashes the host's
 * uncommitted state (`git stash -u`), checks out `from` (its branch when `from` names a local branch, else
 * detached) and pops the stash: a three-way merge, so the host's changes land on top of `from`; if they do not
 * apply cleanly the prepare fails with a conflict naming the files.
 * branch: a new branch of that name at the base, checked out (an existing branch of that name is a conflict).
 *
 * readOnly: everything outside .git loses its write bits (`chmod a-w`; non-root users cannot write). root
 * ignores mode bits, so where `mount` works the path is also bind-mounted read-only with .git bind-mounted
 * read-write on top (git status/commit and export keep working): root's writes then fail with EROFS until it
 * runs `umount` or `mount -o remount,rw` (it can), and a guest reboot drops the mount (the mode bits stay).
 * readOnlyMount in the result says whether the mount is in place.
 *
 * A guestPath that exists and is not an empty directory is a conflict unless `replace` (which removes it,
 * unmounting a previous read-only workspace first). Abort via ctx.signal kills the host's git/tar and
 * rejects with kind 'aborted'; a staging directory `.<name>.banger-staging` may then remain next to the
 * guest path and is removed by the next prepare of that path.
 */
export async function prepareWorkspace(
  exec: GuestExec,
  opts: PrepareOptions,
  ctx: PrepareContext = {},
): Promise<WorkspacePrepareResult> {
  const { signal } = ctx;
  const runner = ctx.runner ?? run;
  const where = checkPrepareOptions(opts);
  if (signal?.aborted) throw abortError(signal, PREPARE);
  try {
    ctx.onProgress?.({ stage: 'inspect' });
    const prepared = preparation(exec, opts, ctx, runner, where);
    const plainNow = !opts.replace && !opts.readOnly && where.from === undefined && where.newBranch === undefined && opts.mode !== 'full_copy';
    const resumed = opts.resume && plainNow ? resumeWorkspace(exec, where.dest, opts.resume, prepared, opts.resumeWhen ?? Promise.resolve(true), ctx) : undefined;
    const r = await resumed; // settles after `prepared` (it waits for it)
    if (r) return r;
    const p = await prepared;
    try {
      return opts.mode === 'full_copy' ? await prepareFullCopy(p) : await preparePacked(p);
    } catch (e) {
      // Best effort: the staging dir goes away, unless we were aborted (the connection may be gone; the next
      // prepare of this path removes it anyway) or the path was taken (then we never made one).
      const taken = e instanceof BangerError && e.kind === 'conflict' && /^guest path /.test(e.message);
      if (!taken && !signal?.aborted) {
        await exec(guestCommand(CLEANUP_SCRIPT, [p.stagePath]), { signal }).catch(() => {});
      }
      throw e;
    }
  } catch (e) {
    if (signal?.aborted) throw abortError(signal, PREPARE);
    throw e;
  }
}

const PREPARE = 'workspace prepare';

/** The repository inspected, the mode checked against it and the base resolved: all a prepare needs from the host first. */
async function preparation(exec: GuestExec, opts: PrepareOptions, ctx: PrepareContext, runner: Runner, where: ReturnType<typeof checkPrepareOptions>): Promise<Prepare> {
  const repo = await inspectRepo(opts.source, { runner, signal: ctx.signal });
  await checkModeFits(opts.mode, repo);
  const base = await resolveBase(runner, repo, where.from, ctx.signal);
  return { exec, opts, ctx, runner, repo, ...where, ...base, preparedAt: new Date().toISOString(), sourcePath: resolve(opts.source) };
}

/** One prepare, its options checked and its repository inspected. */
interface Prepare {
  exec: GuestExec;
  opts: PrepareOptions;
  ctx: PrepareContext;
  runner: Runner;
  repo: RepoInfo;
  dest: string;
  stagePath: string;
  newBranch?: string;
  from?: string;
  baseCommit: string;
  fromBranch: string | null;
  preparedAt: string;
  sourcePath: string;
}

/** The mode, the guest path (normalized, and the staging dir beside it), the new branch and the base revision. */
function checkPrepareOptions(opts: PrepareOptions) {
  if (!(WORKSPACE_MODES as readonly string[]).includes(opts.mode)) {
    throw new BangerError('usage', `unknown workspace mode ${JSON.stringify(opts.mode)}`, `use one of ${WORKSPACE_MODES.join(', ')}`);
  }
  if (typeof opts.guestPath !== 'string' || !opts.guestPath.startsWith('/') || CONTROL_RE.test(opts.guestPath)) {
    throw new BangerError('usage', `guest path ${JSON.stringify(opts.guestPath)} is not an absolute path`);
  }
  const dest = normalizeAbsolute(opts.guestPath);
  if (dest === '/') throw new BangerError('usage', 'the guest path cannot be /');
  return {
    dest,
    stagePath: posix.join(posix.dirname(dest), `.${posix.basename(dest)}.banger-staging`),
    newBranch: opts.branch === undefined ? undefined : validateBranchName(opts.branch),
    from: opts.from === undefined ? undefined : validateRevision(opts.from, '--from revision'),
  };
}

/** Submodules go only with full_copy, which needs a plain .git directory. */
async function checkModeFits(mode: WorkspaceMode, repo: RepoInfo): Promise<void> {
  if (mode !== 'full_copy' && repo.submodules.length > 0) {
    throw new BangerError(
      'usage',
      `${repo.repoRoot} has submodules (${repo.submodules.join(', ')}); mode ${mode} does not copy them`,
      'use --mode full_copy, which copies the repository directory as it is, .git and submodules included',
    );
  }
  if (mode === 'full_copy') await checkFullCopyable(repo.repoRoot, repo.gitDir);
}

/** The base: `from` resolved on the host, never silently HEAD; and its local branch, when it names one. */
async function resolveBase(runner: Runner, repo: RepoInfo, from: string | undefined, signal?: AbortSignal) {
  if (from === undefined) return { baseCommit: repo.headCommit, fromBranch: null };
  const root = repo.repoRoot;
  const r = await hostGit(runner, root, ['rev-parse', '-q', '--verify', `${from}^{commit}`], { signal, reject: false });
  if (r.exitCode !== 0 || !r.stdout.trim()) {
    throw new BangerError('usage', `--from ${JSON.stringify(from)} does not name a commit in ${root}`,
      'give a branch, a tag or a commit sha that exists in the host repository');
  }
  const full = await hostGit(runner, root, ['rev-parse', '--symbolic-full-name', from], { signal, reject: false });
  const name = full.exitCode === 0 ? full.stdout.trim() : '';
  return { baseCommit: r.stdout.trim(), fromBranch: name.startsWith('refs/heads/') && !name.includes('\n') ? name.slice('refs/heads/'.length) : null };
}

/** A guest command's exit status as the error it stands for (see the scripts' exit codes). */
function checkStep(p: Prepare, name: string, r: GuestExecResult): void {
  if (r.exitCode === 0) return;
  if (r.exitCode === 10) throw destTakenError(p.dest, r.stdout.toString('utf8'));
  if (r.exitCode === 11) {
    throw new BangerError('conflict', `${PREPARE}: ${tail(r.stderr, 30)}`, 'commit or stash the host changes first, or prepare from HEAD (no --from)');
  }
  if (r.exitCode === 12) throw new BangerError('conflict', `${PREPARE}: ${tail(r.stderr)}`, 'pick another --branch name');
  throw guestStepError(`${PREPARE} (${name})`, r);
}

/** The base's branch in the guest: `from`'s when the base moved, else the host's current one. */
const targetBranch = (p: Prepare) => (p.baseCommit !== p.repo.headCommit ? p.fromBranch : p.repo.currentBranch);

const markerOf = (p: Prepare, o: { readOnly: boolean; branch: string | null }) =>
  JSON.stringify({ sourcePath: p.sourcePath, headCommit: p.repo.headCommit, baseCommit: p.baseCommit, mode: p.opts.mode, preparedAt: p.preparedAt, ...o });

/** FINISH_BODY's arguments: refs, HEAD and index; the base; the new branch; move into place; read-only. */
function finishArgs(p: Prepare, fullCopy: boolean, shallow: string[]): string[] {
  return [
    p.dest, p.stagePath, p.opts.replace ? '1' : '0', fullCopy ? '1' : '0', p.repo.headCommit, p.baseCommit, targetBranch(p) ?? '', p.newBranch ?? '',
    p.opts.readOnly ? '1' : '0', markerOf(p, { readOnly: p.opts.readOnly, branch: p.newBranch ?? null }), p.repo.currentBranch ?? '', ...shallow,
  ];
}

function resultOf(p: Prepare, fin: GuestExecResult, bytes: number): WorkspacePrepareResult {
  return {
    sourcePath: p.sourcePath,
    repoRoot: p.repo.repoRoot,
    repoName: p.repo.repoName,
    guestPath: p.dest,
    mode: p.opts.mode,
    readOnly: p.opts.readOnly,
    readOnlyMount: /banger-prepared mounted=1/.test(fin.stdout.toString('utf8')),
    headCommit: p.repo.headCommit,
    currentBranch: p.repo.currentBranch,
    branchName: p.newBranch ?? targetBranch(p),
    baseCommit: p.baseCommit,
    preparedAt: p.preparedAt,
    bytesStreamed: bytes,
    bytesSent: bytes,
    cache: 'off',
    incremental: false,
  };
}

/**
 * full_copy: the directory as it is, then the finish, in one guest command (it checks the path and makes the
 * staging dir first). The plain tar's `end` line goes only after the host's tar exited well.
 */
async function prepareFullCopy(p: Prepare): Promise<WorkspacePrepareResult> {
  const zstd = p.opts.compression === 'zstd';
  const args = ['-c', ...(zstd ? ['-I', 'zstd -1 -q'] : []), '-f', '-', '-C', p.repo.repoRoot, ...TAR_AS_ROOT, '.'];
  const feed: Feed = async (input, signal, started) => {
    const tar = startHostStream('tar -c', 'tar', args, { signal });
    started(tar);
    await appendTo(input, tar.stdout, signal);
    const t = await tar.done;
    if (!t.ok) throw new BangerError('host', t.description);
    if (!zstd) input.write('end\n');
  };
  p.ctx.onProgress?.({ stage: 'tree' });
  const command = guestCommand(FULL_COPY_SCRIPT, [p.dest, p.stagePath, p.opts.replace ? '1' : '0', zstd ? '1' : '0', ...finishArgs(p, true, [])]);
  const t = await withFeeder('sending the tree', p.ctx.signal, feed, (feeder, input) =>
    streamToGuest(p.exec, `${PREPARE} (tree)`, 'tree', command, [feeder], input, p.ctx));
  checkStep(p, 'tree', t.result);
  return resultOf(p, t.result, t.bytes);
}

/**
 * shallow and full_history: one guest command with the history as packs, the tree checked out of them as they
 * arrive, only what differs on the host on top, then the finish (the guest checks the path and makes the
 * staging dir first). A path that holds this source's plain workspace is updated in place instead (incremental).
 */
async function preparePacked(p: Prepare): Promise<WorkspacePrepareResult> {
  const { runner, repo, opts } = p;
  const signal = p.ctx.signal;
  const notPlain = p.from ?? p.newBranch ?? (opts.readOnly ? 'ro' : undefined);
  const tips = new Set([repo.headCommit, p.baseCommit]);
  const refUpdates: string[] = [];
  if (opts.mode === 'full_history') {
    for (const { sha, ref } of await hostRefs(runner, repo.repoRoot, signal)) {
      tips.add(sha);
      refUpdates.push(`create ${ref} ${sha}`);
    }
  } else if (repo.currentBranch) refUpdates.push(`create refs/heads/${repo.currentBranch} ${repo.headCommit}`);
  const shallow = opts.mode === 'full_history' ? await hostShallowList(runner, repo.repoRoot, signal) : await commitsWithParents(runner, repo.repoRoot, [...tips], signal);
  if (p.baseCommit !== repo.headCommit && p.fromBranch && !refUpdates.some((u) => u.startsWith(`create refs/heads/${p.fromBranch} `))) {
    refUpdates.push(`create refs/heads/${p.fromBranch} ${p.baseCommit}`);
  }
  const plainMarker = markerOf(p, { readOnly: false, branch: null });
  const inPlace = (old: { head: string; marker: string }) => prepareIncremental(p.exec, { dest: p.dest, repo, old, tips: [...tips], refUpdates, shallow, marker: plainMarker }, p.ctx, runner);
  const known = opts.lastMarker && !opts.replace ? reusableMarker(opts.lastMarker, p.sourcePath, opts.mode, notPlain) : undefined;
  const updated = known ? await inPlace(known) : undefined;
  if (known && updated) return incrementalResult(p, updated, known.head, plainMarker);
  p.ctx.onProgress?.({ stage: 'history' });
  const refs = Buffer.from(refUpdates.map((u) => u + '\n').join(''));
  const w = { what: PREPARE, dest: p.dest, stagePath: p.stagePath, replace: opts.replace ? '1' : '0', repo, tips: [...tips], noWalk: opts.mode === 'shallow', refs, finish: finishArgs(p, false, shallow) };
  const h = await sendPackedTree(p.exec, w, p.ctx, runner);
  const reuse = h.result.exitCode === 10 ? reusableWorkspace(h.result.stdout, p.sourcePath, opts.mode, notPlain) : undefined;
  if (!reuse) {
    checkStep(p, 'history', h.result);
    const resumePoint = notPlain === undefined && h.delta ? { marker: plainMarker, delta: h.delta } : undefined;
    return { ...resultOf(p, h.result, h.bytes), ...(resumePoint ? { resumePoint } : {}) };
  }
  const i = await inPlace(reuse);
  if (!i) throw new BangerError('conflict', `${PREPARE}: the workspace at ${p.dest} changed while it was being updated`, 'prepare again');
  return incrementalResult(p, i, reuse.head, plainMarker);
}

function incrementalResult(p: Prepare, i: { bytes: number; delta: WorktreeDelta }, previousHead: string, marker: string): WorkspacePrepareResult {
  const r = resultOf(p, { exitCode: 0, stdout: Buffer.alloc(0), stderr: Buffer.alloc(0) }, i.bytes);
  return { ...r, readOnly: false, readOnlyMount: false, incremental: true, previousHead, resumePoint: { marker, delta: i.delta } };
}

/** The host's branches, tags and remote-tracking refs (not the symbolic <remote>/HEAD ones), as full_history sends them. */
async function hostRefs(runner: Runner, root: string, signal?: AbortSignal): Promise<Array<{ sha: string; ref: string }>> {
  const r = await hostGit(runner, root, ['for-each-ref', '--format=%(objectname) %(refname)', 'refs/heads', 'refs/tags', 'refs/remotes'], { signal });
  return r.stdout.split('\n').flatMap((line) => {
    const m = /^([0-9a-f]{40,64}) (\S+)$/.exec(line);
    return m && !m[2].endsWith('/HEAD') ? [{ sha: m[1], ref: m[2] }] : [];
  });
}

/**
 * One guest command (PACKED_SCRIPT) for a fresh shallow/full_history prepare: it starts at once (the guest checks
 * the path and makes the staging repository) while the host plans the packs and lists its working-tree delta;
 * then the packs of HEAD's tree (each built while the one before it is sent, each checked out in the guest while
 * the next arrives), a pack of the rest of the history, the ref updates, the deletions and a tar of the changed
 * and untracked files follow on its stdin, and the guest finishes (FINISH_BODY) in the same command. When the
 * guest refuses (exit 10, the path is taken) nothing more is built or sent.
 */
async function sendPackedTree(
  exec: GuestExec,
  w: { what: string; dest: string; stagePath: string; replace: string; repo: RepoInfo; tips: string[]; noWalk: boolean; refs: Buffer; finish: string[] },
  ctx: PrepareContext,
  runner: Runner,
): Promise<{ bytes: number; result: GuestExecResult; delta?: WorktreeDelta }> {
  const root = w.repo.repoRoot;
  const packs: Array<Promise<HostPack | undefined>> = [];
  let stage = 'history';
  let sentDelta: WorktreeDelta | undefined;
  const feed: Feed = async (input, signal, started) => {
    const [plan, delta] = await Promise.all([checkoutPlan(root, w.repo.headCommit, signal), worktreeDelta(runner, root, signal)]);
    sentDelta = delta;
    const rest = restOfHistory(root, w.tips, plan.sent, { noWalk: w.noWalk, signal });
    rest.catch(() => {});
    // Each pack is built while the one before it crosses the link.
    const build = (i: number) => {
      const p = i < plan.slices.length
        ? packObjects(root, plan.slices[i].ids, signal)
        : rest.then((lines) => (lines.length ? packObjects(root, lines, signal) : undefined));
      p.catch(() => {});
      packs.push(p);
      return p;
    };
    let next = build(0);
    for (let i = 0; i <= plan.slices.length; i++) {
      const p = await next;
      if (i < plan.slices.length) next = build(i + 1);
      if (p) await appendPack(input, p, i < plan.slices.length ? plan.slices[i].paths : Buffer.alloc(0), signal);
      await removeHostPack(p);
    }
    input.write(Buffer.concat([Buffer.from(`end\n${w.refs.length}\n`), w.refs]));
    stage = 'tree';
    ctx.onProgress?.({ stage });
    await appendDelta(input, deltaHeader(delta), root, delta, signal, started);
    stage = 'finish';
    ctx.onProgress?.({ stage });
  };
  const command = guestCommand(PACKED_SCRIPT, [w.dest, w.stagePath, w.replace, w.repo.objectFormat, w.repo.headCommit, ...w.finish]);
  try {
    const sent = await withFeeder('sending the history and the tree', ctx.signal, feed, (feeder, input) =>
      streamToGuest(exec, `${w.what} (history)`, () => stage, command, [feeder], input, ctx));
    return { ...sent, delta: sentDelta };
  } finally {
    for (const p of packs) await removeHostPack(await p.catch(() => undefined));
  }
}

/** What a feeder does: write into `input` (the guest command's stdin), under `signal`; `started` learns of a host process it runs. */
type Feed = (input: PassThrough, signal: AbortSignal, started: (child: HostStream) => void) => Promise<void>;

/**
 * Run `use` with a feeder (a HostStream for streamToGuest) that writes `feed`'s output into the guest's input as
 * the guest command runs. The feeder's failure is the stream's (`what` failed); the input always ends (a short
 * stream fails the guest's checks); killing it aborts `feed` and the process it started. After `use`, it is
 * stopped and awaited: nothing is left running on the host.
 */
async function withFeeder<T>(what: string, signal: AbortSignal | undefined, feed: Feed, use: (feeder: HostStream, input: PassThrough) => Promise<T>): Promise<T> {
  const stop = new AbortController();
  const feedSignal = signal ? AbortSignal.any([signal, stop.signal]) : stop.signal;
  const input = new PassThrough();
  let child: HostStream | undefined;
  let finished = false;
  const done = feed(input, feedSignal, (c) => (child = c)).then(
    () => ({ ok: true, description: '' }),
    (e: unknown) => ({ ok: false, description: `${what} failed: ${errorMessage(e)}` }),
  ).finally(() => {
    finished = true;
    input.end();
  });
  const feeder: HostStream = { label: 'feeder', stdout: input, done, running: () => !finished, kill: () => { stop.abort(); child?.kill(); } };
  try {
    return await use(feeder, input);
  } finally {
    stop.abort();
    await done;
  }
}

/** Into `input`: `header`, a tar of the delta's files when it has any (`started` learns of it), then `end\n` (DELTA_END). */
async function appendDelta(input: PassThrough, header: Buffer, root: string, delta: WorktreeDelta, signal: AbortSignal, started: (child: HostStream) => void): Promise<void> {
  input.write(header);
  if (delta.send.length > 0) {
    const tar = startDeltaTar(root, delta, signal);
    started(tar);
    await appendTo(input, tar.stdout, signal);
    const t = await tar.done;
    if (!t.ok) throw new BangerError('host', t.description);
  }
  input.write('end\n');
}

/** APPLY_DELTA's header: the deleted paths' length and whether a tar follows, then the paths. */
const deltaHeader = (d: WorktreeDelta) => Buffer.concat([Buffer.from(`${d.deleted.length} ${d.send.length > 0 ? 1 : 0}\n`), d.deleted]);

/** A tar of the delta's changed and untracked files (named NUL-terminated on tar's stdin), relative to `root`. */
const startDeltaTar = (root: string, d: WorktreeDelta, signal: AbortSignal | undefined) =>
  startHostStream('tar -c', 'tar', ['-c', '-f', '-', '-C', root, ...TAR_AS_ROOT, '--no-recursion', '--null', '--verbatim-files-from', '-T', '-'], { signal, input: d.send });

/** The host's files go into the guest owned by root, whoever owns them on the host. */
const TAR_AS_ROOT = ['--owner=0', '--group=0', '--numeric-owner'];

/**
 * The HEAD and marker of a workspace at the guest path that an incremental re-prepare may update in place: one banger
 * prepared from the same source in the same mode, plain (no --from, --branch or read-only, then or now), whose
 * HEAD has not moved since. `stdout` is DEST_CHECK's ("repo <sha>", "marker <json>"). Otherwise undefined.
 */
function reusableWorkspace(stdout: Buffer, sourcePath: string, mode: WorkspaceMode, notPlainNow: string | undefined): { head: string; marker: string } | undefined {
  const text = stdout.toString('utf8');
  const head = /^repo ([0-9a-f]{40,64})$/m.exec(text)?.[1];
  const json = /^marker (\{.*\})$/m.exec(text)?.[1];
  if (!head || !json) return undefined;
  const r = reusableMarker(json, sourcePath, mode, notPlainNow);
  return r?.head === head ? r : undefined;
}

/** The HEAD a marker was written at, when it names a plain workspace of this source and mode (and this prepare is plain too). */
function reusableMarker(marker: string, sourcePath: string, mode: WorkspaceMode, notPlainNow: string | undefined): { head: string; marker: string } | undefined {
  if (notPlainNow !== undefined || mode === 'full_copy') return undefined;
  const m = parseMarker(marker);
  const plain = m?.readOnly === false && m.branch === null && m.baseCommit === m.headCommit;
  const ok = plain && m.sourcePath === sourcePath && m.mode === mode && typeof m.headCommit === 'string' && /^[0-9a-f]{40,64}$/.test(m.headCommit);
  return ok ? { head: m.headCommit as string, marker } : undefined;
}

/**
 * Update a workspace in place, in one guest command (INCREMENTAL_SCRIPT) that first checks the workspace still
 * holds `old.marker`: a pack of only the objects the guest lacks (the new tips' objects, not those reachable
 * from its HEAD, made with its index on the host), then the tree reset to the new HEAD (git writes only the files
 * that differ), untracked non-ignored files removed, and the host's delta on top. Ignored files in the guest
 * (build output) stay. Not atomic: an interrupted update leaves a valid repository part-way, with the old marker
 * (so the next prepare redoes it); --replace is the full reset. Returns the bytes sent and the delta laid over
 * HEAD, or undefined when the marker was not there (nothing touched).
 */
async function prepareIncremental(
  exec: GuestExec,
  w: { dest: string; repo: RepoInfo; old: { head: string; marker: string }; tips: string[]; refUpdates: string[]; shallow: string[]; marker: string },
  ctx: PrepareContext,
  runner: Runner,
): Promise<{ bytes: number; delta: WorktreeDelta } | undefined> {
  const root = w.repo.repoRoot;
  const noWalk = w.shallow.length > 0 && w.refUpdates.length <= 1; // shallow mode: no history walk
  let stage = 'history';
  let sentDelta: WorktreeDelta | undefined;
  const feed: Feed = async (input, signal, started) => {
    const [lines, delta] = await Promise.all([restOfHistory(root, [...w.tips, `^${w.old.head}`], new Set(), { noWalk, signal }), worktreeDelta(runner, root, signal)]);
    sentDelta = delta;
    const pack = lines.length > 0 ? await packObjects(root, lines, signal) : undefined;
    try {
      if (pack) await appendPack(input, pack, Buffer.alloc(0), signal);
    } finally {
      await removeHostPack(pack);
    }
    input.write('end\n');
    stage = 'tree';
    ctx.onProgress?.({ stage });
    await appendDelta(input, deltaHeader(delta), root, delta, signal, started);
  };
  ctx.onProgress?.({ stage });
  const refs = w.refUpdates.flatMap((u) => u.split(' ').slice(1, 3));
  const args = [w.dest, w.old.marker, w.old.head, w.repo.headCommit, w.repo.currentBranch ?? '', w.marker, ...w.shallow, '--', ...refs];
  const what = `${PREPARE} (incremental)`;
  const t = await withFeeder('sending the new objects and the delta', ctx.signal, feed, (feeder, input) =>
    streamToGuest(exec, what, () => stage, guestCommand(INCREMENTAL_SCRIPT, args), [feeder], input, ctx));
  if (t.result.exitCode === 13) return undefined;
  if (t.result.exitCode !== 0) throw guestStepError(what, t.result);
  return { bytes: t.bytes, delta: sentDelta! };
}

/**
 * The workspace cache's hit: the guest path `dest` holds what a plain prepare of this source at this HEAD left
 * (`from`), so one guest command (RESUME_SCRIPT) turns its delta into the host's current one. It starts at once
 * (the guest checks the marker) while the host inspects the repository, lists its delta while `when` is decided,
 * and plans; then the header and the tar follow on its stdin. Undefined, with nothing changed in the guest, when
 * `from` is not this HEAD's, `when` is false, or the guest's marker differs (a normal prepare follows).
 */
async function resumeWorkspace(exec: GuestExec, dest: string, from: ResumePoint, prepared: Promise<Prepare>, when: Promise<boolean>, ctx: PrepareContext): Promise<WorkspacePrepareResult | undefined> {
  let sent: { p: Prepare; marker: string; delta: WorktreeDelta } | undefined;
  const feed: Feed = async (input, signal, started) => {
    const p = await prepared;
    const was = parseMarker(from.marker);
    if (!was || was.headCommit !== p.repo.headCommit || was.sourcePath !== p.sourcePath || was.mode !== p.opts.mode) return;
    const root = p.repo.repoRoot;
    // the delta while `when` is decided (a hit waits for both; when it is false, the delta goes unused)
    const [go, delta] = await Promise.all([when, worktreeDelta(p.runner, root, signal)]);
    if (!go) return;
    const plan = await resumePlan(p.runner, root, p.repo.headCommit, from.delta, delta, signal);
    const marker = markerOf(p, { readOnly: false, branch: null });
    sent = { p, marker, delta };
    const header = `${plan.remove.length} ${plan.restore.length} ${delta.send.length > 0 ? 1 : 0}\n${marker}\n`;
    await appendDelta(input, Buffer.concat([Buffer.from(header), plan.remove, plan.restore]), root, delta, signal, started);
  };
  const command = guestCommand(RESUME_SCRIPT, [dest, from.marker]);
  try {
    const t = await withFeeder('sending the delta', ctx.signal, feed, (feeder, input) => streamToGuest(exec, `${PREPARE} (resume)`, 'tree', command, [feeder], input, ctx));
    if (t.result.exitCode === 13 || !sent) return undefined;
    if (t.result.exitCode !== 0) throw guestStepError(`${PREPARE} (resume)`, t.result);
    const { p, marker, delta } = sent;
    return { ...resultOf(p, t.result, t.bytes), incremental: true, previousHead: p.repo.headCommit, resumePoint: { marker, delta }, resumed: true };
  } catch (e) {
    if (!sent) await prepared; // the inspection's error, when it failed, is the one to report
    throw e;
  }
}

function parseMarker(marker: string): Record<string, unknown> | undefined {
  try {
    const m = JSON.parse(marker) as unknown;
    return m && typeof m === 'object' ? (m as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * From HEAD with delta `old` over it to HEAD with `now`: every path `old` touched and `now` does not send, and
 * every path `now` deletes, is removed (`now`'s files then come in its tar, replacing what is there); those of
 * HEAD's files that `old` touched and `now` leaves alone are checked out of the index again. NUL-terminated lists,
 * as RESUME_SCRIPT reads them.
 */
async function resumePlan(runner: Runner, root: string, head: string, old: WorktreeDelta, now: WorktreeDelta, signal?: AbortSignal): Promise<{ remove: Buffer; restore: Buffer }> {
  const key = (b: Buffer) => b.toString('latin1');
  const touchedBefore = [...splitNul(old.send), ...splitNul(old.deleted)];
  const sentNow = new Set(splitNul(now.send).map(key));
  const decidedNow = new Set([...sentNow, ...splitNul(now.deleted).map(key)]);
  // Deleted before and not sent: not there. Never removed again: a parent the old delta made a symlink would
  // take the removal elsewhere (lib/f deleted, lib -> vendor sent: `rm lib/f` is vendor/f).
  const sentBefore = new Set(splitNul(old.send).map(key));
  const absent = new Set(splitNul(old.deleted).map(key).filter((k) => !sentBefore.has(k)));
  // a file the tar writes again needs no removal first (tar replaces it), unless it is deleted from the index too
  const toRemove = [...touchedBefore.filter((b) => !sentNow.has(key(b))), ...splitNul(now.deleted)];
  const remove = new Map(toRemove.filter((b) => !absent.has(key(b))).map((b) => [key(b), b]));
  const candidates = touchedBefore.filter((b) => !decidedNow.has(key(b)));
  let restore: Buffer[] = [];
  if (candidates.length > 0) {
    const inHead = new Set((await hostGitPaths(runner, root, ['ls-tree', '-r', '--name-only', '--full-tree', head], signal)).map((l) => key(unquoteGitPath(l))));
    restore = [...new Map(candidates.filter((b) => inHead.has(key(b))).map((b) => [key(b), b])).values()];
  }
  const nulList = (bs: Iterable<Buffer>) => Buffer.concat([...bs].flatMap((b) => [b, Buffer.from([0])]));
  return { remove: nulList(remove.values()), restore: nulList(restore) };
}

function destTakenError(dest: string, stdout: string): BangerError {
  if (new RegExp(`^marker ${INTERRUPTED}$`, 'm').test(stdout)) {
    return new BangerError('conflict', `guest path ${dest} holds a workspace whose last update was cut short`, 'prepare it again with --replace (it is deleted first)');
  }
  const m = /repo (\S+)/.exec(stdout);
  const what = m ? `already holds a git repository (HEAD ${m[1]})` : 'exists and is not an empty directory';
  return new BangerError('conflict', `guest path ${dest} ${what}`, 'choose another --guest-path, or replace it (it is deleted first)');
}

async function checkFullCopyable(root: string, gitDir: string): Promise<void> {
  const dotGit = await stat(`${root}/.git`).catch(() => undefined);
  if (!dotGit?.isDirectory() || resolve(gitDir) !== resolve(root, '.git')) {
    throw new BangerError(
      'usage',
      `${root} is a linked worktree or a submodule checkout (its .git is not a directory): a full copy would not work in the guest`,
      'use --mode shallow or --mode full_history, or prepare from the main working tree',
    );
  }
  if (await stat(`${gitDir}/objects/info/alternates`).catch(() => undefined)) {
    throw new BangerError(
      'usage',
      `${root} borrows objects from another repository (objects/info/alternates): a full copy would be incomplete`,
      'run `git repack -a -d` and remove objects/info/alternates, or use --mode shallow or full_history',
    );
  }
}

/** The host's own shallow boundary (a shallow host clone stays shallow in the guest). */
async function hostShallowList(runner: Runner, root: string, signal?: AbortSignal): Promise<string[]> {
  const r = await hostGit(runner, root, ['rev-parse', '--is-shallow-repository'], { signal, reject: false });
  if (r.stdout.trim() !== 'true') return [];
  const p = await hostGit(runner, root, ['rev-parse', '--git-path', 'shallow'], { signal });
  const text = await readFile(resolve(root, p.stdout.trim()), 'utf8').catch(() => '');
  return text.split('\n').filter((l) => /^[0-9a-f]{40,64}$/.test(l));
}

/** The commits among `shas` that have parents in their raw objects (shallow mode marks them as the boundary). */
async function commitsWithParents(runner: Runner, root: string, shas: string[], signal?: AbortSignal): Promise<string[]> {
  const out: string[] = [];
  for (const sha of shas) {
    const r = await hostGit(runner, root, ['cat-file', 'commit', sha], { signal });
    const header = r.stdout.split('\n\n')[0];
    if (/^parent /m.test(header)) out.push(sha);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// export

/**
 * The guest's work as one patch against the base: committed work past the base, uncommitted edits and
 * untracked (non-ignored) files. One guest script, which writes nothing into the repository: the temporary
 * index (`GIT_INDEX_FILE`, seeded with `git read-tree <base>`) and any new objects (`GIT_OBJECT_DIRECTORY`, the
 * repository's objects as an alternate) live in a mktemp directory removed by a trap on exit. The SPEC's
 * `read-tree --index-output` would lock the real index (index.lock) for the duration; GIT_INDEX_FILE does not.
 * The one trace left: like any `git add`, git refreshes the mtime of existing loose objects it hashes again.
 * The diff runs with fixed options (no renames, no color, no external diff or textconv, a/ b/ prefixes), so the
 * guest's git config cannot change the patch's format.
 */
export async function exportWorkspace(
  exec: GuestExec,
  opts: ExportOptions,
  ctx: { signal?: AbortSignal; runner?: Runner } = {},
): Promise<WorkspaceExportResult> {
  const what = 'workspace export';
  if (typeof opts.guestPath !== 'string' || !opts.guestPath.startsWith('/') || CONTROL_RE.test(opts.guestPath)) {
    throw new BangerError('usage', `guest path ${JSON.stringify(opts.guestPath)} is not an absolute path`);
  }
  const guestPath = normalizeAbsolute(opts.guestPath);
  const base = opts.baseCommit === undefined || opts.baseCommit === '' ? '' : validateRevision(opts.baseCommit, 'base commit');
  const r = await execGuest(exec, what, guestCommand(EXPORT_SCRIPT, [guestPath, base]), { signal: ctx.signal });
  if (r.exitCode === 3) {
    throw new BangerError('not_found', `${what}: ${tail(r.stderr, 1)}`, 'prepare a workspace there first, or pass the right --guest-path');
  }
  if (r.exitCode === 4) {
    throw new BangerError('usage', `${what}: ${tail(r.stderr, 1)}`, 'give a commit that exists in the guest repository (the prepare result has baseCommit)');
  }
  if (r.exitCode !== 0) throw guestStepError(what, r);
  const { sha, names, patch } = parseExport(r.stdout);
  return {
    guestPath,
    baseCommit: sha,
    patch,
    changedFiles: splitNul(names).map((b) => b.toString('utf8')),
    hasChanges: patch.length > 0,
  };
}

/** `BANGER-EXPORT 1 <sha> <n>\n` + n bytes of NUL-terminated names + the patch bytes. Anything before the header
 * (a shell rc file that prints) is skipped. */
function parseExport(out: Buffer): { sha: string; names: Buffer; patch: Buffer } {
  const at = out.indexOf('BANGER-EXPORT 1 ');
  const nl = at < 0 ? -1 : out.indexOf(10, at);
  const m = nl < 0 ? null : /^BANGER-EXPORT 1 ([0-9a-f]{40,64}) (\d+)$/.exec(out.subarray(at, nl).toString('latin1'));
  if (!m) throw new BangerError('host', 'workspace export: the guest sent no export header (unexpected output)');
  const n = Number(m[2]);
  const start = nl + 1;
  if (start + n > out.length) throw new BangerError('host', 'workspace export: the guest output was cut short');
  return { sha: m[1], names: out.subarray(start, start + n), patch: Buffer.from(out.subarray(start + n)) };
}

// ---------------------------------------------------------------------------------------------------------
// export to a file, bounded

export interface ExportToFileOptions extends ExportOptions {
  /** Absolute path of the patch file; written whole or not at all (a temp file next to it, then rename). */
  outputPath: string;
  /** More patch bytes than this is a PatchTooLarge error (config maxPatchBytes). */
  maxBytes: number;
  /** The whole export, guest command included (config exportTimeoutMs). */
  timeoutMs: number;
  /** Where the patch is written before the rename (default partialPathFor(outputPath)). */
  tempPath?: string;
}

/** A fresh temp name next to the output: `.<name>.<12 hex>.partial`, in the same directory so the rename is atomic. */
export function partialPathFor(outputPath: string): string {
  return join(dirname(outputPath), `.${basename(outputPath)}.${randomBytes(6).toString('hex')}.partial`);
}

export interface WorkspaceFileExportResult extends Omit<WorkspaceExportResult, 'patch'> {
  outputPath: string;
  patchBytes: number;
}

/** The patch was bigger than the cap: nothing was written. */
export function patchTooLargeError(maxBytes: number): BangerError {
  return new BangerError(
    'conflict',
    `PatchTooLarge: the patch is larger than maxPatchBytes (${maxBytes} bytes); nothing was written`,
    'raise maxPatchBytes in $BANGER_HOME/config.json, or export less (commit or remove large generated files in the guest)',
  );
}

/**
 * exportWorkspace's patch, streamed from the guest into `outputPath` under a byte cap and a timeout: the daemon
 * holds one chunk at a time (the ssh channel waits for each file write), never the patch. Over the cap or past
 * the deadline the guest command is aborted, the temp file removed, and the output path left as it was.
 */
export async function exportWorkspaceToFile(
  exec: GuestExec,
  opts: ExportToFileOptions,
  ctx: { signal?: AbortSignal } = {},
): Promise<WorkspaceFileExportResult> {
  const what = 'workspace export';
  if (typeof opts.guestPath !== 'string' || !opts.guestPath.startsWith('/') || CONTROL_RE.test(opts.guestPath)) {
    throw new BangerError('usage', `guest path ${JSON.stringify(opts.guestPath)} is not an absolute path`);
  }
  if (!isAbsolute(opts.outputPath)) throw new BangerError('usage', `the output path ${JSON.stringify(opts.outputPath)} is not absolute`);
  const guestPath = normalizeAbsolute(opts.guestPath);
  const base = opts.baseCommit === undefined || opts.baseCommit === '' ? '' : validateRevision(opts.baseCommit, 'base commit');
  const temp = opts.tempPath ?? partialPathFor(opts.outputPath);
  const file = await open(temp, 'wx', 0o600).catch((e: NodeJS.ErrnoException) => {
    throw new BangerError('usage', `cannot write the patch next to ${opts.outputPath}: ${e.message}`, 'give an output path in a directory you can write to');
  });
  const abort = new AbortController();
  const stop = (why: BangerError) => abort.signal.aborted || abort.abort(why);
  const onOuterAbort = () => stop(abortError(ctx.signal, what));
  if (ctx.signal?.aborted) onOuterAbort();
  ctx.signal?.addEventListener('abort', onOuterAbort, { once: true });
  const timer = setTimeout(() => stop(new BangerError('timeout', `${what} did not finish within ${opts.timeoutMs} ms; nothing was written`,
    'raise exportTimeoutMs in $BANGER_HOME/config.json')), opts.timeoutMs);
  const sink = exportSink(file, opts.maxBytes, stop);
  const stderr = tailSink(64 * 1024);
  let done = false;
  try {
    const r = await execGuest(exec, what, guestCommand(EXPORT_SCRIPT, [guestPath, base]), { signal: abort.signal, stdout: sink.stream, stderr: stderr.stream })
      .catch((e) => { throw abort.signal.aborted ? abort.signal.reason : e; });
    await sink.finish();
    if (abort.signal.aborted) throw abort.signal.reason;
    checkExportExit(what, { ...r, stderr: Buffer.concat([r.stderr, stderr.text()]) });
    const { sha, names } = sink.parsed();
    await file.close();
    await rename(temp, opts.outputPath);
    done = true;
    const changedFiles = splitNul(names).map((b) => b.toString('utf8'));
    return { guestPath, baseCommit: sha, changedFiles, hasChanges: sink.patchBytes() > 0, outputPath: opts.outputPath, patchBytes: sink.patchBytes() };
  } finally {
    clearTimeout(timer);
    ctx.signal?.removeEventListener('abort', onOuterAbort);
    if (!done) {
      sink.stream.destroy();
      await file.close().catch(() => {});
      await unlink(temp).catch(() => {});
    }
  }
}

function checkExportExit(what: string, r: GuestExecResult): void {
  if (r.exitCode === 3) {
    throw new BangerError('not_found', `${what}: ${tail(r.stderr, 1)}`, 'prepare a workspace there first, or pass the right --guest-path');
  }
  if (r.exitCode === 4) {
    throw new BangerError('usage', `${what}: ${tail(r.stderr, 1)}`, 'give a commit that exists in the guest repository (the prepare result has baseCommit)');
  }
  if (r.exitCode !== 0) throw guestStepError(what, r);
}

/** Keeps only the last `max` bytes written (a guest's stderr is never held whole). */
function tailSink(max: number) {
  let buf = Buffer.alloc(0);
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      buf = Buffer.concat([buf, chunk]);
      if (buf.length > max) buf = buf.subarray(buf.length - max);
      cb();
    },
  });
  return { stream, text: () => buf };
}

const MAX_HEADER_SEARCH = 64 * 1024;

/**
 * Parses the framed export output (see parseExport) as it arrives: the header and the names are kept (names
 * longer than the cap are refused too), the patch goes to `file`, one chunk at a time, each write awaited.
 * A failure (over the cap, bad framing, a write error) goes to `onFail` once; later output is then discarded, so
 * the channel always drains.
 */
function exportSink(file: import('node:fs/promises').FileHandle, maxBytes: number, onFail: (e: BangerError) => void) {
  let pending = Buffer.alloc(0); // before and inside the header
  let header: { sha: string; n: number } | undefined;
  const names: Buffer[] = [];
  let namesLeft = 0;
  let patch = 0;
  let failed = false;
  const writePatch = async (b: Buffer) => {
    if (b.length === 0) return;
    if (patch + b.length > maxBytes) throw patchTooLargeError(maxBytes);
    patch += b.length;
    await file.write(b);
  };
  const take = async (chunk: Buffer) => {
    if (!header) {
      pending = Buffer.concat([pending, chunk]);
      const at = pending.indexOf('BANGER-EXPORT 1 ');
      const nl = at < 0 ? -1 : pending.indexOf(10, at);
      if (nl < 0) {
        if (pending.length > MAX_HEADER_SEARCH) throw new BangerError('host', 'workspace export: the guest sent no export header (unexpected output)');
        return;
      }
      const m = /^BANGER-EXPORT 1 ([0-9a-f]{40,64}) (\d+)$/.exec(pending.subarray(at, nl).toString('latin1'));
      if (!m) throw new BangerError('host', 'workspace export: the guest sent a malformed export header');
      header = { sha: m[1], n: Number(m[2]) };
      if (header.n > maxBytes) throw patchTooLargeError(maxBytes);
      namesLeft = header.n;
      chunk = pending.subarray(nl + 1);
      pending = Buffer.alloc(0);
    }
    if (namesLeft > 0) {
      const part = chunk.subarray(0, namesLeft);
      names.push(Buffer.from(part));
      namesLeft -= part.length;
      chunk = chunk.subarray(part.length);
    }
    await writePatch(chunk);
  };
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      if (failed) return cb();
      take(chunk).then(
        () => cb(),
        (e: unknown) => {
          failed = true;
          onFail(e instanceof BangerError ? e : new BangerError('host', `workspace export: writing the patch failed: ${errorMessage(e)}`));
          cb();
        },
      );
    },
  });
  stream.on('error', () => {});
  return {
    stream,
    finish: () => new Promise<void>((res, rej) => {
      if (stream.destroyed) return res();
      stream.end(() => res());
      stream.once('error', rej);
    }),
    parsed() {
      if (!header) throw new BangerError('host', 'workspace export: the guest sent no export header (unexpected output)');
      if (namesLeft > 0) throw new BangerError('host', 'workspace export: the guest output was cut short');
      return { sha: header.sha, names: Buffer.concat(names) };
    },
    patchBytes: () => patch,
  };
}
