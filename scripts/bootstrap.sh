#!/usr/bin/env bash
# Create ./.venv (if missing) and install tsmd-ray with everything it needs. Idempotent:
# a second run only checks what is there. Usage: scripts/bootstrap.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
STAMP="$VENV/.tsmd-bootstrap"
HASH=$(cat pyproject.toml scripts/bootstrap.sh scripts/build_learn2learn.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# --no-compile: no .pyc for all of torch, ray and mlflow up front (about a minute on 2 cores);
# Python writes them for the modules it imports, when it first imports them.
"$VENV/bin/python" -m pip install -q --no-compile --upgrade pip wheel setuptools
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1).
"$VENV/bin/python" -m pip install -q --no-compile -e '.[dev]'
scripts/build_learn2learn.sh "$VENV"
echo "$HASH" > "$STAMP"
echo "bootstrap: $VENV ready"
