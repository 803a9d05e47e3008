#!/usr/bin/env bash
# Keep unfinished experiments across sessions: copy run folders, ignored files and all, to
# parked/NAME/ (same paths below it) and commit that folder's records (configs, metrics, evaluations,
# plots) on the current branch. Model, checkpoint and database files (BINARIES below) are copied but
# never committed: they stay in parked/NAME on this machine, so `restore` on the same machine brings
# back whole runs, and on a new machine the records only (an unfinished cell then resumes from 0,
# and a teacher file is pre-trained again; check its sha256 against the recorded one).
# (A ref outside the branch, refs/parked/NAME, was tried first: a fresh clone of the branch lost it.)
#
#   scripts/park_runs.sh save NAME PATH...   # e.g. save claim runs/claim/grid runs/claim/teacher_conv4_64.pt
#                                            # (replaces all that NAME held: name every path to keep)
#   scripts/park_runs.sh watch MINUTES NAME PATH...  # save every MINUTES until killed (a session
#                                            # that is cut off keeps its last save)
#   scripts/park_runs.sh restore NAME        # writes the parked files back to their paths
#   scripts/park_runs.sh list                # parked names, sizes and the commit that parked them
set -euo pipefail
self=$(realpath "$0")
cd "$(git rev-parse --show-toplevel)"
BINARIES=(-name '*.pt' -o -name '*.pth' -o -name '*.ckpt' -o -name '*.safetensors' -o -name '*.db' -o -name '*.sqlite'
          -o -name '*.arrow' -o -name '*.parquet' -o -name '*.npy' -o -name '*.npz' -o -name '*.pkl')
usage() { echo "usage: $0 save NAME PATH... | watch MINUTES NAME PATH... | restore NAME | list" >&2; exit 2; }

case "${1:-}" in
  save)
    [[ $# -ge 3 ]] || usage
    name=$2; shift 2
    for path in "$@"; do [[ -e $path ]] || { echo "park_runs: $path: no such file or folder" >&2; exit 1; }; done
    dest=parked/$name
    rm -rf "$dest"
    mkdir -p "$dest"
    # logs and Ray's own run folders are not needed to resume; .NAME.* are atomic writes in flight
    find "$@" \( -name ray -o -name __pycache__ -o -name logs -o -name '.*.*' \) -prune -o -type f -print0 |
      xargs -0 -r cp --parents -p -t "$dest"
    if [[ -n $(git diff --cached --name-only -- . ":(exclude)$dest") ]]; then
      echo "park_runs: other changes are staged; commit or unstage them first" >&2; exit 1
    fi
    # records only: runs/ is ignored (hence --force), binaries are never added
    git rm -r -q --cached --ignore-unmatch -- "$dest"
    find "$dest" -type f ! \( "${BINARIES[@]}" \) -print0 | xargs -0 -r git add --force --
    git diff --cached --quiet -- "$dest" || git commit -q -m "parked runs: $* ($(date -u +%FT%TZ))"
    echo "parked $(find "$dest" -type f | wc -l) file(s) ($(du -sh "$dest" | cut -f1)) of $* in $dest;" \
         "committed $(git ls-files -- "$dest" | wc -l) record(s), binaries kept on this machine only"
    ;;
  watch)
    [[ $# -ge 4 && $2 =~ ^[0-9]+$ && $2 -gt 0 ]] || usage
    minutes=$2; shift 2
    while sleep "$((minutes * 60))"; do
      # a commit of the user's (index.lock) makes one save fail; the next one tries again
      "$self" save "$@" || echo "park_runs: save failed at $(date -u +%FT%TZ); retrying in $minutes min" >&2
    done
    ;;
  restore)
    [[ $# -eq 2 ]] || usage
    [[ -d parked/$2 ]] || { echo "park_runs: nothing parked as $2 (no folder parked/$2)" >&2; exit 1; }
    cp -a "parked/$2/." .
    echo "restored $(find "parked/$2" -type f | wc -l) file(s) from parked/$2"
    ;;
  list)
    for dir in parked/*/; do
      [[ -d $dir ]] || continue
      echo "$(basename "$dir")  $(du -sh "$dir" | cut -f1)  $(git log -1 --format='%h %ci' -- "$dir")"
    done
    ;;
  *) usage ;;
esac
