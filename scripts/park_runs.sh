#!/usr/bin/env bash
# Keep unfinished experiments (checkpoints included) across a machine that keeps only the repository:
# store run folders, ignored files and all, as one commit under refs/parked/NAME. Not a branch, so a
# clone leaves it out; a new save replaces the old one (git gc then drops the old files).
#
#   scripts/park_runs.sh save NAME PATH...   # e.g. save claim runs/claim/grid runs/claim/teacher_conv4_64.pt
#   scripts/park_runs.sh restore NAME        # writes the parked files back to their paths
#   scripts/park_runs.sh list                # parked names, dates and sizes
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
usage() { echo "usage: $0 save NAME PATH... | restore NAME | list" >&2; exit 2; }

case "${1:-}" in
  save)
    [[ $# -ge 3 ]] || usage
    name=$2; shift 2
    for path in "$@"; do [[ -e $path ]] || { echo "park_runs: $path: no such file or folder" >&2; exit 1; }; done
    index=$(mktemp -u)
    trap 'rm -f "$index"' EXIT
    # logs and Ray's own run folders are not needed to resume
    find "$@" \( -name ray -o -name __pycache__ \) -prune -o -type f -print0 |
      GIT_INDEX_FILE=$index git add --force --pathspec-from-file=- --pathspec-file-nul
    tree=$(GIT_INDEX_FILE=$index git write-tree)
    commit=$(git commit-tree "$tree" -m "parked runs: $* ($(date -u +%FT%TZ), at $(git rev-parse --short HEAD))")
    git update-ref "refs/parked/$name" "$commit"
    echo "parked $(git ls-tree -r --name-only "$commit" | wc -l) file(s) of $* as refs/parked/$name"
    ;;
  restore)
    [[ $# -eq 2 ]] || usage
    git rev-parse -q --verify "refs/parked/$2" >/dev/null || { echo "park_runs: nothing parked as $2" >&2; exit 1; }
    git archive "refs/parked/$2" | tar -x
    echo "restored $(git ls-tree -r --name-only "refs/parked/$2" | wc -l) file(s) from refs/parked/$2"
    ;;
  list)
    git for-each-ref refs/parked --format='%(refname:short)  %(committerdate:iso)  %(contents:subject)'
    ;;
  *) usage ;;
esac
