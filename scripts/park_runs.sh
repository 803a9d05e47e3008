#!/usr/bin/env bash
# Keep unfinished experiments (checkpoints included) across machines that keep only the current
# branch: copy run folders, ignored files and all, to parked/NAME/ (same paths below it) and commit
# that folder on the current branch. A new save replaces NAME's files; git history keeps the old ones,
# so park small things (checkpoints of small models, a teacher file), not datasets.
# (A ref outside the branch, refs/parked/NAME, was tried first: a fresh clone of the branch lost it.)
#
#   scripts/park_runs.sh save NAME PATH...   # e.g. save claim runs/claim/grid runs/claim/teacher_conv4_64.pt
#   scripts/park_runs.sh watch MINUTES NAME PATH...  # save every MINUTES until killed (a session
#                                            # that is cut off keeps its last save)
#   scripts/park_runs.sh restore NAME        # writes the parked files back to their paths
#   scripts/park_runs.sh list                # parked names, sizes and the commit that parked them
set -euo pipefail
self=$(realpath "$0")
cd "$(git rev-parse --show-toplevel)"
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
    git add --force --all -- "$dest"
    git commit -q -m "parked runs: $* ($(date -u +%FT%TZ))" -- "$dest"
    echo "parked $(git ls-files -- "$dest" | wc -l) file(s) ($(du -sh "$dest" | cut -f1)) of $* in $dest, committed"
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
