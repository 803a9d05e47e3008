#!/usr/bin/env bash
# The GPU figures of issues 2 and 3 in one go, without Ray: both throughput configurations on the
# first CUDA device (tasks/s, peak GPU memory, the engine's vmap path against the loops), then
# configuration (b) with a first-order teacher. JSON files go to $OUT (default: the current
# directory); about 5-8 minutes on an H100. Needs torch, torchvision and this checkout; learn2learn
# is optional: without it the l2l paths are skipped and `vmap_over_loop` compares the engine's
# GPU default (vmap) with its per-task loop, which runs level with learn2learn's loop on the CPU.
# Record the figures, with the GPU's name from the JSON, in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
python="${PYTHON:-python3}"
"$python" benchmarks/throughput.py --device cuda --configs a b --iterations 10 --json-out "$out/gpu_throughput.json"
"$python" benchmarks/throughput.py --device cuda --configs b --iterations 10 --first-order-teacher \
    --json-out "$out/gpu_throughput_b_first_order.json"
