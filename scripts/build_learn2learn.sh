#!/usr/bin/env bash
# learn2learn 0.2.0 (its last release) ships Cython-generated C files that do not compile on
# Python 3.11 (longintrepr.h). Rebuild them with Cython 3.0 and install the wheel without its
# declared dependencies (qpth pins numpy<2); gym is the one import it needs at run time.
set -euo pipefail
VENV=${1:-.venv}
PIP="$VENV/bin/python -m pip"
if "$VENV/bin/python" -c "import learn2learn" 2>/dev/null; then exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PIP install -q 'cython>=3.0,<3.1' gym
$PIP download -q --no-deps --no-binary=:all: 'learn2learn==0.2.0' -d "$WORK"
tar -xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
rm -f "$WORK"/learn2learn-0.2.0/learn2learn/data/*.c
(cd "$WORK/learn2learn-0.2.0" && "$OLDPWD/$VENV/bin/python" setup.py -q build_ext bdist_wheel >/dev/null 2>&1)
$PIP install -q --no-deps "$WORK"/learn2learn-0.2.0/dist/learn2learn-*.whl
"$VENV/bin/python" -c "import learn2learn"
