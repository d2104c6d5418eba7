/**
 * The guest side of workspaces (workspace.ts): shell scripts of fixed text, run as `sh -c <script> banger <values...>`
 * (guestCommand), so that every value reaches them only as a quoted positional parameter.
 */
import { shellQuote } from '../exec/shell.js';

// Exit codes of our own:
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
export const INTERRUPTED = 'interrupted';
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
export const RESUME_SCRIPT = `${PREAMBLE}dest=$1 expected=$2
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
export const INCREMENTAL_SCRIPT = `${PREAMBLE}dest=$1 expected=$2 oldhead=$3 head=$4 headbranch=$5 marker=$6 incremental=1
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
export const PACKED_SCRIPT = `${PREAMBLE}dest=$1 stage=$2 replace=$3 format=$4 head=$5 incremental=0 marker=
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
export const FULL_COPY_SCRIPT = `${PREAMBLE}dest=$1 stage=$2 replace=$3 unzstd=$4
shift 4
${ENTER_STAGE}
if [ "$unzstd" = 0 ]; then tar -x -f - --no-same-owner
${TREE_END}elif command -v zstd >/dev/null 2>&1; then tar -x --zstd -f - --no-same-owner
else echo "zstd is not installed in the guest" >&2; exit 127; fi
${FINISH_BODY}`;

/** $1 stage. Best-effort removal after a failed prepare. */
export const CLEANUP_SCRIPT = `stage=$1
rm -rf -- "$stage"
`;

/** $1 guest path, $2 base ('' = HEAD). One run, writes nothing to the repository. Output framed, see parseExport. */
export const EXPORT_SCRIPT = `${preamble('git')}repo=$1 base=$2
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

export function guestCommand(script: string, args: string[]): string {
  return shellQuote(['sh', '-c', script, 'banger', ...args]);
}
