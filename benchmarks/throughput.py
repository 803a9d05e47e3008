#!/usr/bin/env python
"""Meta-training throughput of the engine against a plain learn2learn-style loop (issue 2).

Three paths compute the same outer step (Eq. 10, then Adam) on the same synthetic meta-batch:

- ``engine_vmap``: ``tsmd_ray.algorithms.MetaObjective`` with ``vmap_chunk = meta_batch``
  (what ``tsmd_ray.engine.build_objective`` picks on CUDA);
- ``engine_loop``: the same objective with ``vmap_chunk = 0`` (what it picks on CPU);
- ``l2l_loop``: the way learn2learn users write it (its ``examples/vision/maml_omniglot.py``):
  ``MAML(model, lr).clone()`` + ``adapt()`` per task, ``loss.backward()`` per task, gradients
  divided by the meta-batch, ``opt.step()``. For ``tsmd`` the teacher clone is adapted first,
  then the student clone with cross-entropy + Hinton KL to the adapted teacher's detached
  support logits; both query losses are backpropagated.

Every path normalises the query with the statistics ``--query-statistics`` names: ``support`` (the
engine's default, what the deployed student does) or ``transductive`` (the query batch's own, as
in MAML's reference code); ``gradient_agreement_rel`` checks that they compute the same step.

The paths run round-robin (one meta-iteration each, in rotating order) so that noise on a shared
machine hits all of them alike; the figure is meta_batch / median iteration time.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during a path's iterations minus what
was allocated before them (``peak_mib``), and the absolute peak. On CPU, each path runs one
meta-iteration in a fresh spawned process and reports the peak of its resident set during that
iteration (``VmHWM``, reset just before it) minus its resident set just before it: the extra
memory that iteration needed, models and data excluded.

The paths and configurations live in benchmarks/outer_steps.py. Needs only torch,
tsmd_ray.models/algorithms and (for the third path) learn2learn; no Ray.
Usage: ``python benchmarks/throughput.py [--device cpu|cuda] [--configs a b] [--iterations N]``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from outer_steps import CONFIGS, L2L_ERROR, NATIVE_BN_PATHS, PATHS, Spec, l2l, make_paths, synthetic_batches

CPU_TARGET = 1.0  # the engine's default path (loop on CPU) at least as fast as the l2l loop


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_difference(a: dict, b: dict) -> float:
    """max |a - b| / max |a| over all gradient tensors of psi and theta."""
    num = den = 0.0
    for key in a:
        for name, g in a[key].items():
            num = max(num, float((g - b[key][name]).abs().max()))
            den = max(den, float(g.abs().max()))
    return num / den if den else num


def time_config(spec: Spec, device: torch.device, dtype: torch.dtype, warmup: int, iterations: int,
                log, names=PATHS) -> dict:
    paths = make_paths(spec, device, dtype, names)
    batches = synthetic_batches(spec, device, dtype)
    # the first warm-up round starts all paths from the same weights: check they agree
    first = {}
    for name, path in paths.items():
        t0 = time.perf_counter()
        first[name] = path.gradients(batches[0])
        sync(device)
        log(f"  [{spec.name[:1]}] first {name}: {time.perf_counter() - t0:.2f}s")
    agreement = {f"{name}_vs_engine_loop": relative_difference(first["engine_loop"], g)
                 for name, g in first.items() if name != "engine_loop"}
    for name, path in paths.items():
        path.step(batches[0], first[name])
    del first
    times = {name: [] for name in paths}
    peaks = {name: 0 for name in paths}
    abs_peaks = {name: 0 for name in paths}
    order = list(paths)
    for it in range(max(warmup - 1, 0) + iterations):
        timed = it >= max(warmup - 1, 0)
        batch = batches[it % len(batches)]
        for name in order[it % len(order):] + order[:it % len(order)]:
            if device.type == "cuda":
                sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            paths[name].step(batch)
            sync(device)
            elapsed = time.perf_counter() - t0
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                peaks[name] = max(peaks[name], peak - base)
                abs_peaks[name] = max(abs_peaks[name], peak)
            if timed:
                times[name].append(elapsed)
        if timed:
            log(f"  [{spec.name[:1]}] iter {it}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in order))
    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        results[name] = {"tasks_per_s": spec.meta_batch / median, "median_s": median, "min_s": min(ts),
                         "times_s": [round(t, 4) for t in ts]}
        if device.type == "cuda":
            results[name]["peak_mib"] = peaks[name] / 2 ** 20
            results[name]["abs_peak_mib"] = abs_peaks[name] / 2 ** 20
    return {"paths": results, "gradient_agreement_rel": agreement}


def ratios_against_baselines(paths: dict, spec: Spec, device: torch.device, default_path: str) -> dict:
    """Ratios of median throughputs, and the median of per-round ratios (each round runs every path
    once, back to back, so slow drifts of a shared machine cancel out of the latter)."""
    ratios, paired, paired_range, out = {}, {}, {}, {}
    pairs = [("vmap_over_loop", "engine_vmap", "engine_loop")]
    for baseline in ("l2l_loop", "l2l_loop_native_bn"):
        if baseline in paths:
            pairs += [(f"{name}_over_{baseline.replace('l2l_loop', 'l2l')}", name, baseline)
                      for name in paths if not name.startswith("l2l_loop")]
    for label, fast, slow in pairs:
        ratios[label] = paths[fast]["tasks_per_s"] / paths[slow]["tasks_per_s"]
        per_round = [t_slow / t_fast for t_fast, t_slow in zip(paths[fast]["times_s"], paths[slow]["times_s"])]
        paired[label] = statistics.median(per_round)
        paired_range[label] = [min(per_round), max(per_round)]
    if "l2l_loop" in paths:
        target = spec.gpu_target if device.type == "cuda" else CPU_TARGET
        ratios["default_over_l2l"] = ratios[f"{default_path}_over_l2l"]
        paired["default_over_l2l"] = paired[f"{default_path}_over_l2l"]
        out["target"] = {"default_over_l2l_at_least": target, "met": ratios["default_over_l2l"] >= target,
                         "met_paired": paired["default_over_l2l"] >= target}
    return {**out, "paired_ratios": paired, "paired_ratio_range": paired_range, "ratios": ratios}


# ---------------------------------------------------------------------------- CPU memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _memory_probe(spec: Spec, name: str, dtype_name: str, threads: int) -> dict:
    """In a fresh process: extra peak RSS of one meta-iteration of path ``name``.

    The peak is the kernel's high-water mark of this process's resident set (``VmHWM``), reset
    just before the iteration (``/proc/self/clear_refs`` = 5). ``getrusage().ru_maxrss`` would
    not do: Linux carries it across fork+exec, so a spawned child starts with its parent's peak.
    """
    torch.set_num_threads(threads)
    device, dtype = torch.device("cpu"), getattr(torch, dtype_name)
    path = make_paths(spec, device, dtype, names=(name,))[name]
    batch = synthetic_batches(spec, device, dtype, count=1)[0]
    before = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after reset"
    except OSError:
        method = "VmHWM since process start"
    path.step(batch)
    peak = _proc_status_kib("VmHWM")
    if before is None or peak is None:  # no /proc: fall back to getrusage (KiB on Linux)
        return {"peak_mib": None, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "memory_note": "no /proc/self/status"}
    return {"peak_mib": (peak - before) / 1024, "rss_before_mib": before / 1024, "hwm_mib": peak / 1024,
            "memory_note": method}


def cpu_memory(spec: Spec, names, dtype_name: str, log) -> dict:
    out = {}
    ctx = multiprocessing.get_context("spawn")
    for name in names:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            out[name] = pool.submit(_memory_probe, spec, name, dtype_name, torch.get_num_threads()).result()
        log(f"  [{spec.name[:1]}] memory {name}: +{out[name]['peak_mib']:.0f} MiB")
    return out


# ---------------------------------------------------------------------------- main
def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "learn2learn": getattr(l2l, "__version__", None), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                            if line.startswith("Model name")), platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parent, check=False).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=["a", "b"], choices=sorted(CONFIGS))
    parser.add_argument("--iterations", type=int, default=5, help="timed meta-iterations per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-iterations per path (>= 1)")
    parser.add_argument("--meta-batch", type=int, default=None, help="override the configs' meta-batch")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--first-order-teacher", action="store_true",
                        help="first-order teacher adaptation in (b), for all paths")
    parser.add_argument("--allow-tf32", action="store_true", help="TF32 on (the engine's default is off)")
    parser.add_argument("--query-statistics", default="support", choices=("support", "transductive"),
                        help="batch-norm statistics of the query images in every path (default: support, "
                             "as the engine's default)")
    parser.add_argument("--native-bn", action="store_true",
                        help="also time the loop paths with nn.BatchNorm2d (see NATIVE_BN_PATHS; needs "
                             "--query-statistics transductive)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory probes")
    parser.add_argument("--json-out", help="also write the JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.warmup = max(args.warmup, 1)
    if args.native_bn and args.query_statistics != "transductive":
        parser.error("--native-bn needs --query-statistics transductive: nn.BatchNorm2d cannot normalise "
                     "the query with the support set's statistics")

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    torch.backends.cudnn.allow_tf32 = args.allow_tf32
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    default_path = "engine_vmap" if device.type == "cuda" else "engine_loop"  # as build_objective, auto
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": str(device), "dtype": args.dtype, "tf32": args.allow_tf32,
              "query_statistics": args.query_statistics,
              "warmup": args.warmup, "iterations": args.iterations, "machine": machine(device),
              "default_path": default_path,
              "memory_method": ("torch.cuda.max_memory_allocated minus allocated before the iteration"
                                if device.type == "cuda" else
                                "fresh spawned process per path: /proc VmHWM (reset before) minus VmRSS before one iteration"),
              "configs": {}}
    if l2l is None:
        report["note"] = f"learn2learn unavailable ({L2L_ERROR}): l2l_loop skipped"
    for key in args.configs:
        spec = CONFIGS[key]
        if args.meta_batch:
            spec = replace(spec, meta_batch=args.meta_batch)
        spec = replace(spec, first_order_teacher=args.first_order_teacher or spec.first_order_teacher,
                       query_statistics=args.query_statistics)
        log(f"config {spec.name} (meta-batch {spec.meta_batch}, first-order teacher {spec.first_order_teacher})")
        names = PATHS + (NATIVE_BN_PATHS if args.native_bn else ())
        result = time_config(spec, device, dtype, args.warmup, args.iterations, log, names)
        if device.type == "cpu" and not args.no_memory:
            for name, mem in cpu_memory(spec, list(result["paths"]), args.dtype, log).items():
                result["paths"][name].update(mem)
        result.update(ratios_against_baselines(result["paths"], spec, device, default_path))
        result.update(name=spec.name, meta_batch=spec.meta_batch,
                      first_order_teacher=spec.first_order_teacher)
        report["configs"][key] = result
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
