#!/usr/bin/env bash
# learn2learn 0.2.0 (its last release) ships Cython-generated C files that do not compile on
# Python 3.11 (longintrepr.h). Rebuild them with Cython 3.0 and install the wheel without its
# declared dependencies (qpth pins numpy<2); gym is the one import it needs at run time.
# Only learn2learn is compiled: Cython comes as a wheel (gym is pure Python), and the sdist's
# metadata is read with that Cython (no isolated build environment that compiles its own).
set -euo pipefail
VENV=$(cd "${1:-.venv}" && pwd)
PY="$VENV/bin/python"
if "$PY" -c "import learn2learn" 2>/dev/null; then exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip install -q --no-compile --only-binary=cython 'cython>=3.0,<3.1' gym
"$PY" -m pip download -q --no-deps --no-binary=learn2learn --no-build-isolation 'learn2learn==0.2.0' -d "$WORK"
tar -xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
rm -f "$WORK"/learn2learn-0.2.0/learn2learn/data/*.c
(cd "$WORK/learn2learn-0.2.0" && "$PY" setup.py -q build_ext bdist_wheel >"$WORK/build.log" 2>&1) \
  || { cat "$WORK/build.log"; exit 1; }
"$PY" -m pip install -q --no-compile --no-deps "$WORK"/learn2learn-0.2.0/dist/learn2learn-*.whl
"$PY" -c "import learn2learn" 2>"$WORK/import.log" || { cat "$WORK/import.log"; exit 1; }
