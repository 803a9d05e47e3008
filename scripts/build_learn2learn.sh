#!/usr/bin/env bash
# learn2learn 0.2.0 (its last release) ships Cython-generated C files that do not compile on
# Python 3.11 (longintrepr.h). Rebuild them with Cython 3.0 and install the wheel without its
# declared dependencies (qpth pins numpy<2); gym is the one import it needs at run time.
# Only learn2learn is compiled: Cython comes as a wheel (gym is pure Python), and the sdist's
# metadata is read with that Cython (no isolated build environment that compiles its own). The
# built wheel is kept, like pip's own wheel cache, in ~/.cache/tsmd_ray/wheels: its modules use
# no numpy C API, so it depends on the Python version alone, which its name carries.
set -euo pipefail
VENV=$(cd "${1:-.venv}" && pwd)
PY="$VENV/bin/python"
if "$PY" -c "import learn2learn" 2>/dev/null; then exit 0; fi
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/tsmd_ray/wheels"
PYTAG=cp$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
"$PY" -m pip install -q --no-compile gym
if ! ls "$WHEELS"/learn2learn-0.2.0-"$PYTAG"-*.whl >/dev/null 2>&1; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PY" -m pip install -q --no-compile --only-binary=cython 'cython>=3.0,<3.1'
  "$PY" -m pip download -q --no-deps --no-binary=learn2learn --no-build-isolation 'learn2learn==0.2.0' -d "$WORK"
  tar -xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
  rm -f "$WORK"/learn2learn-0.2.0/learn2learn/data/*.c
  # -O1 -g0 compile far quicker than Python's -O3 -g; these data helpers are not on our hot path
  (cd "$WORK/learn2learn-0.2.0" && CFLAGS="-O1 -g0" "$PY" setup.py -q build_ext -j 2 bdist_wheel \
    >"$WORK/build.log" 2>&1) || { cat "$WORK/build.log"; exit 1; }
  mkdir -p "$WHEELS"
  for wheel in "$WORK"/learn2learn-0.2.0/dist/*.whl; do  # rename into place: concurrent builds never see half a file
    cp "$wheel" "$WHEELS/.$$.tmp" && mv "$WHEELS/.$$.tmp" "$WHEELS/$(basename "$wheel")"
  done
fi
"$PY" -m pip install -q --no-compile --no-deps "$WHEELS"/learn2learn-0.2.0-"$PYTAG"-*.whl
"$PY" -c "import learn2learn" 2>/dev/null || "$PY" -c "import learn2learn"  # the second run shows the error
