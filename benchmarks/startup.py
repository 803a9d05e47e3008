"""Start-up costs that every process pays: the imports of tsmd_ray's modules in a fresh interpreter
(each CLI, Ray actor, Tune trial and Ray Train worker), and optionally a tiny all-reduce run on Ray
Train under its default controller settings and with faster health checks and no preemption watcher
(the test suite's settings, tests/conftest.py; see docs/benchmarks.md, Start-up).

Prints JSON; ``--json-out F`` also writes it. Rounds are interleaved (A, B, A, B, ...) so that a
shared machine's load falls on both sides; ratios are of medians.

    .venv/bin/python benchmarks/startup.py [--repeat 3] [--ray-train DATASET_DIR] [--json-out F]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# What a process imports, and the same plus torchvision (imported at module level before a886458).
IMPORTS = {
    "tsmd_ray.training": "import tsmd_ray.training",
    "tsmd_ray.training + torchvision": "import tsmd_ray.training, torchvision",
    "tsmd_ray.distributed.actors": "import tsmd_ray.distributed.actors",
}
FAST_CONTROLLER = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
RAY_TRAIN_RUN = """
import sys, time
sys.path.insert(0, {root!r})
import ray
from tsmd_ray.flags import config_from_args
from tsmd_ray.train import build_parser, run
from tests.distributed.conftest import tiny_flags
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
cfg = config_from_args(build_parser().parse_args(tiny_flags({dataset!r}, {out!r}, "--workers", "2",
                                                            "--aggregation", "allreduce")))
started = time.perf_counter()
run(cfg)
print("RUN_S", time.perf_counter() - started)
"""


def timed(code: str, env: dict[str, str] | None = None, tag: str | None = None) -> float:
    """Wall seconds of ``python -c code`` in a fresh process, or the seconds it prints after ``tag``.
    ``env`` replaces the Ray Train settings of this environment."""
    base = {k: v for k, v in os.environ.items() if k not in FAST_CONTROLLER}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**base, **(env or {})})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"startup.py: the timed process failed:\n{proc.stderr[-3000:]}")
    if tag is None:
        return wall
    lines = [line for line in proc.stdout.splitlines() if line.startswith(tag + " ")]
    if not lines:
        sys.exit(f"startup.py: the timed process printed no {tag} line:\n{proc.stdout[-2000:]}")
    return float(lines[-1].split()[1])


def interleaved(cases: dict[str, Any], repeat: int, measure: Callable[[Any], float]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, case in cases.items():
            times[name].append(round(measure(case), 2))
    return times


def summary(times: dict[str, list[float]], baseline: str) -> dict[str, Any]:
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {"seconds": times, "median_s": medians,
            "ratio_to_" + baseline: {name: round(m / medians[baseline], 2) for name, m in medians.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--ray-train", metavar="DATASET_DIR",
                        help="also time a tiny all-reduce run (2 Ray Train workers, 8 iterations) on this "
                             "prepared dataset, Ray Train's default controller settings against faster health "
                             "checks and no preemption watcher")
    parser.add_argument("--json-out", help="write the JSON here too")
    args = parser.parse_args(argv)
    result = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
              "imports": summary(interleaved(IMPORTS, args.repeat, timed), "tsmd_ray.training")}
    if args.ray_train:
        with tempfile.TemporaryDirectory() as tmp:
            runs, dataset = itertools.count(), str(Path(args.ray_train).resolve())

            def ray_run(env: dict[str, str]) -> float:
                out = str(Path(tmp) / f"run{next(runs)}")
                return timed(RAY_TRAIN_RUN.format(root=str(ROOT), dataset=dataset, out=out), env, tag="RUN_S")

            cases = {"default": {}, "fast controller": FAST_CONTROLLER}
            result["ray_train_run"] = summary(interleaved(cases, args.repeat, ray_run), "default")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
