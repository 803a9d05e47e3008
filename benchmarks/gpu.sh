#!/usr/bin/env bash
# What a session lent a GPU machine runs, without Ray (the device has torch, not this project's
# Ray/MLflow stack). JSON and logs go to $OUT (default: the current directory); STEPS picks the
# steps (default: all four, in this order):
#   check       the first meta-gradient of the GPU path (vmap) against the CPU loop, float64, with the
#               gpu profile's models (benchmarks/gpu_check.py; a minute or two);
#   precision   the same in float32 (TF32 off): the GPU path and the CPU loop each against the float64
#               loop, at the profile's alpha = lam = 0.1 and at 0.01 (gpu_check.py --dtype float32; a
#               few minutes: the float64 reference runs on the CPU);
#   pipeline    the gpu profile end to end for a few iterations with --backend local: pre-train the
#               ResNet-12 teacher on the GPU, meta-train on the vmap path, meta-test, the student alone
#               (python -m tsmd_ray.pipeline; a few minutes). Needs the Omniglot zips: $TSMD_DATA_ROOT,
#               else shared/data/omniglot or ../shared/data/omniglot;
#   throughput  both throughput configurations of issues 2 and 3 on the first CUDA device (tasks/s,
#               peak memory, the engine's vmap path against the loops), then (b) with a first-order
#               teacher (benchmarks/throughput.py; 5-8 minutes on an H100; learn2learn optional).
# check and pipeline import tsmd_ray.engine: besides torch/torchvision they need numpy, pyyaml,
# pyarrow, tqdm and pillow; a missing one is named and those steps fail (bring wheels for the
# device's Python). Record the figures, with the GPU's name from the JSON, in docs/benchmarks.md.
#   OUT=/tmp/gpu benchmarks/gpu.sh            STEPS="check pipeline" benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="$(mkdir -p "${OUT:-.}" && cd "${OUT:-.}" && pwd)"
python="${PYTHON:-python3}"
steps="${STEPS:-check precision pipeline throughput}"
failed=()

run_step() {  # run_step NAME COMMAND...: log to $out/NAME.log, remember failures, go on
  local name=$1; shift
  echo "== $name" >&2
  if ! "$@" 2>&1 | tee "$out/$name.log"; then failed+=("$name"); fi
}

engine_imports() {
  "$python" -c "import tsmd_ray.engine, tsmd_ray.pipeline" 2>&1 | tail -1
}

smoke_profile() {  # the gpu profile cut to a few iterations, local backend, into $out/pipeline
  "$python" - "$out" <<'PY'
import sys, yaml
out = sys.argv[1]
profile = yaml.safe_load(open("configs/gpu.yaml"))
profile["pretrain"].update(epochs=2, max_steps=20)
profile["train"].update(iterations=3, eval_every=0, test_episodes=40, backend="local", device="cuda",
                        task_batching="vmap", mlflow=False, out=f"{out}/pipeline/run",
                        cache_dir=f"{out}/pipeline/cache")
yaml.safe_dump(profile, open(f"{out}/gpu_smoke.yaml", "w"), sort_keys=False)
PY
}

pipeline() {
  local data="${TSMD_DATA_ROOT:-}"
  for candidate in shared/data/omniglot ../shared/data/omniglot; do
    [ -z "$data" ] && [ -d "$candidate" ] && data=$candidate
  done
  [ -n "$data" ] || { echo "no Omniglot data: set TSMD_DATA_ROOT"; return 1; }
  smoke_profile && "$python" -m tsmd_ray.pipeline --config "$out/gpu_smoke.yaml" --data-root "$data" &&
    "$python" -c "import json; r = json.load(open('$out/pipeline/run/pipeline.json')); print(json.dumps(
      {k: r[k] for k in ('seconds',)} | {m: r[m]['results'] for m in ('train', 'baseline')}))"
}

missing=$(engine_imports)
for step in $steps; do
  case $step in
    check|precision|pipeline)
      if [ -n "$missing" ]; then echo "== $step: skipped, tsmd_ray.engine does not import: $missing" >&2
        failed+=("$step"); continue; fi ;;&
    check) run_step check "$python" benchmarks/gpu_check.py --json-out "$out/gpu_gradient_check.json" ;;
    precision)
      for rate in 0.1 0.01; do
        run_step "precision_$rate" "$python" benchmarks/gpu_check.py --dtype float32 --alpha $rate --lam $rate \
          --json-out "$out/gpu_float32_check_$rate.json"
      done ;;
    pipeline) run_step pipeline pipeline ;;
    throughput)
      run_step throughput "$python" benchmarks/throughput.py --device cuda --configs a b --iterations 10 \
        --json-out "$out/gpu_throughput.json"
      run_step throughput_first_order "$python" benchmarks/throughput.py --device cuda --configs b \
        --iterations 10 --first-order-teacher --json-out "$out/gpu_throughput_b_first_order.json" ;;
    *) echo "unknown step $step (check, precision, pipeline, throughput)" >&2; exit 2 ;;
  esac
done
[ ${#failed[@]} -eq 0 ] || { echo "gpu.sh: failed: ${failed[*]}" >&2; exit 1; }
echo "gpu.sh: all steps passed; results in $out" >&2
