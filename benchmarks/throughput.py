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

The paths run round-robin (one meta-iteration each, in rotating order) so that noise on a shared
machine hits all of them alike; the figure is meta_batch / median iteration time.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during a path's iterations minus what
was allocated before them (``peak_mib``), and the absolute peak. On CPU, each path runs one
meta-iteration in a fresh spawned process and reports the peak of its resident set during that
iteration (``VmHWM``, reset just before it) minus its resident set just before it: the extra
memory that iteration needed, models and data excluded.

Needs only torch, tsmd_ray.models/algorithms and (for the third path) learn2learn; no Ray.
Usage: ``python benchmarks/throughput.py [--device cpu|cuda] [--configs a b] [--iterations N]``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tsmd_ray.algorithms import InnerSettings, MetaObjective, TaskBatch, make_kd_loss, parameters_of  # noqa: E402
from tsmd_ray.models import use_fused_batchnorm  # noqa: E402
from tsmd_ray.models import TaskBatchNorm2d, build_model  # noqa: E402

try:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import learn2learn as l2l
except Exception as exc:  # noqa: BLE001 - any import failure just skips the third path
    l2l = None
    L2L_ERROR = f"{type(exc).__name__}: {exc}"
else:
    L2L_ERROR = ""


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration (issue 2, section Performance)."""

    name: str
    method: str  # student | tsmd
    in_channels: int
    image_size: int
    student_widths: tuple[int, ...]
    teacher: str | None = None
    teacher_widths: tuple[int, ...] | None = None
    ways: int = 5
    shots: int = 1
    query: int = 15
    steps: int = 5
    meta_batch: int = 16
    alpha: float = 0.1  # engine defaults (tsmd_ray.config)
    lam: float = 0.1
    kd_weight: float = 1.0
    temperature: float = 4.0
    first_order_teacher: bool = False
    gpu_target: float = 1.0  # engine default path / l2l loop, on a GPU


CONFIGS = {
    "a": Spec("a: student MAML, Conv-4(64), 1x28x28, 5w1s15q, k=5, mb=16, 2nd order",
              "student", 1, 28, (64, 64, 64, 64), meta_batch=16, gpu_target=7.0),
    "b": Spec("b: tsmd, ResNet-12(64-128-256-512) + Conv-4(32), 3x32x32, 5w1s15q, k=5, mb=4, KL",
              "tsmd", 3, 32, (32, 32, 32, 32), teacher="resnet12", teacher_widths=(64, 128, 256, 512),
              meta_batch=4, gpu_target=2.5),
}
CPU_TARGET = 1.0  # the engine's default path (loop on CPU) at least as fast as the l2l loop
PATHS = ("engine_vmap", "engine_loop", "l2l_loop")
# --native-bn adds the loop paths on models with nn.BatchNorm2d: what learn2learn users with a
# stock model get, and a prototype of the engine's loop path using the fused kernel
NATIVE_BN_PATHS = ("engine_loop_native_bn", "l2l_loop_native_bn")


# ---------------------------------------------------------------------------- set-up
def build_models(spec: Spec, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    teacher = None
    if spec.teacher is not None:
        teacher = build_model(spec.teacher, spec.ways, spec.in_channels, spec.image_size,
                              widths=spec.teacher_widths).to(device, dtype)
    student = build_model("conv4", spec.ways, spec.in_channels, spec.image_size,
                          widths=spec.student_widths).to(device, dtype)
    return teacher, student


def synthetic_batches(spec: Spec, device: torch.device, dtype: torch.dtype, count: int = 2) -> list[TaskBatch]:
    gen = torch.Generator().manual_seed(1)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    labels = lambda per: torch.arange(spec.ways).repeat_interleave(per).repeat(spec.meta_batch, 1)  # noqa: E731
    batches = []
    for _ in range(count):
        sx = torch.randn(spec.meta_batch, spec.ways * spec.shots, *shape, generator=gen)
        qx = torch.randn(spec.meta_batch, spec.ways * spec.query, *shape, generator=gen)
        batches.append(TaskBatch(sx, labels(spec.shots), qx, labels(spec.query)).to(device, dtype))
    return batches


class EnginePath:
    """``MetaObjective.gradient_sums`` then ``MetaLearner.outer_step`` (Adam on the mean)."""

    def __init__(self, spec: Spec, teacher, student, vmap: bool) -> None:
        self.teacher = copy.deepcopy(teacher)
        self.student = copy.deepcopy(student)
        for model in (self.teacher, self.student):  # as build_objective: fused batch norm per task
            if model is not None:
                use_fused_batchnorm(model, not vmap)
        # as tsmd_ray.engine.build_objective with task_batching=auto, vmap_chunk=0
        settings = InnerSettings(steps=spec.steps, alpha=spec.alpha, lam=spec.lam,
                                 adapt_teacher=spec.method == "tsmd",
                                 first_order_teacher=spec.first_order_teacher,
                                 kd_weight=spec.kd_weight if spec.method == "tsmd" else 0.0)
        kd = make_kd_loss("kl", temperature=spec.temperature)
        self.objective = MetaObjective(self.teacher, self.student, kd, settings, "maml",
                                       spec.meta_batch if vmap else 0)
        self.optimizers = {"theta": (self.student, torch.optim.Adam(self.student.parameters(), lr=1e-3))}
        if self.teacher is not None:
            self.optimizers["psi"] = (self.teacher, torch.optim.Adam(self.teacher.parameters(), lr=1e-3))

    def gradients(self, tasks: TaskBatch) -> dict[str, dict[str, torch.Tensor]]:
        psi = parameters_of(self.teacher) if self.teacher is not None else {}
        grads_psi, grads_theta, _ = self.objective.gradient_sums(psi, parameters_of(self.student), tasks)
        return {"psi": grads_psi, "theta": grads_theta}

    def step(self, tasks: TaskBatch, grads=None) -> None:
        grads = grads if grads is not None else self.gradients(tasks)
        for key, (module, optimizer) in self.optimizers.items():
            for name, p in module.named_parameters():
                p.grad = (grads[key][name] / len(tasks)).to(p.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


class Learn2LearnPath:
    """Per-task ``clone()`` + ``adapt()`` + ``backward()``, as learn2learn's MAML examples do."""

    def __init__(self, spec: Spec, teacher, student) -> None:
        self.spec = spec
        self.student = l2l.algorithms.MAML(copy.deepcopy(student), lr=spec.lam, first_order=False)
        self.teacher = None
        self.optimizers = [torch.optim.Adam(self.student.parameters(), lr=1e-3)]
        if teacher is not None:
            self.teacher = l2l.algorithms.MAML(copy.deepcopy(teacher), lr=spec.alpha,
                                               first_order=spec.first_order_teacher)
            self.optimizers.append(torch.optim.Adam(self.teacher.parameters(), lr=1e-3))

    def _accumulate(self, tasks: TaskBatch) -> float:
        s, T = self.spec, self.spec.temperature
        for opt in self.optimizers:
            opt.zero_grad()
        error = 0.0
        for i in range(len(tasks)):
            sx, sy, qx, qy = tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i]
            loss = 0.0
            teacher_logits = None
            if self.teacher is not None:
                teacher = self.teacher.clone()
                for _ in range(s.steps):
                    teacher.adapt(F.cross_entropy(teacher(sx), sy))
                loss = F.cross_entropy(teacher(qx), qy)
                teacher_logits = teacher(sx).detach()
            student = self.student.clone()
            for _ in range(s.steps):
                logits = student(sx)
                inner = F.cross_entropy(logits, sy)
                if teacher_logits is not None:
                    inner = inner + s.kd_weight * T * T * F.kl_div(
                        F.log_softmax(logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                        reduction="batchmean")
                student.adapt(inner)
            loss = loss + F.cross_entropy(student(qx), qy)
            loss.backward()
            error += loss.item()
        return error

    def gradients(self, tasks: TaskBatch) -> dict[str, dict[str, torch.Tensor]]:
        """Summed outer gradients (for the agreement check), left in ``.grad``."""
        self._accumulate(tasks)
        grads = {"theta": {n: p.grad.clone() for n, p in self.student.module.named_parameters()}}
        if self.teacher is not None:
            grads["psi"] = {n: p.grad.clone() for n, p in self.teacher.module.named_parameters()}
        return grads

    def step(self, tasks: TaskBatch, grads=None) -> None:
        if grads is None:
            self._accumulate(tasks)
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad.mul_(1.0 / len(tasks))
            opt.step()


def native_batchnorm(module):
    """A copy of ``module`` with each ``TaskBatchNorm2d`` swapped for ``nn.BatchNorm2d`` without
    running statistics: the same maths (batch statistics) with the fused kernel. Right in a
    per-task loop (float64 second-order meta-gradients agree with the primitive-op layer to
    ~1e-13 here), wrong under ``vmap`` (functorch issue 534), hence loop paths only."""
    if module is None:
        return None
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TaskBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps, track_running_stats=False)
                bn.to(child.weight)
                with torch.no_grad():
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
                setattr(parent, name, bn)
    return module


def make_paths(spec: Spec, device: torch.device, dtype: torch.dtype, names=PATHS) -> dict:
    teacher, student = build_models(spec, device, dtype)
    paths = {}
    for name in names:
        t, s = (native_batchnorm(teacher), native_batchnorm(student)) if name.endswith("_native_bn") \
            else (teacher, student)
        if name.startswith("l2l_loop"):
            if l2l is not None:
                paths[name] = Learn2LearnPath(spec, t, s)
        else:
            paths[name] = EnginePath(spec, t, s, vmap=name == "engine_vmap")
    return paths


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


# ---------------------------------------------------------------------------- timing
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
    parser.add_argument("--native-bn", action="store_true",
                        help="also time the loop paths with nn.BatchNorm2d (see NATIVE_BN_PATHS)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory probes")
    parser.add_argument("--json-out", help="also write the JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.warmup = max(args.warmup, 1)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    torch.backends.cudnn.allow_tf32 = args.allow_tf32
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    default_path = "engine_vmap" if device.type == "cuda" else "engine_loop"  # as build_objective, auto
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": str(device), "dtype": args.dtype, "tf32": args.allow_tf32,
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
        if args.first_order_teacher:
            spec = replace(spec, first_order_teacher=True)
        log(f"config {spec.name} (meta-batch {spec.meta_batch}, first-order teacher {spec.first_order_teacher})")
        names = PATHS + (NATIVE_BN_PATHS if args.native_bn else ())
        result = time_config(spec, device, dtype, args.warmup, args.iterations, log, names)
        if device.type == "cpu" and not args.no_memory:
            for name, mem in cpu_memory(spec, list(result["paths"]), args.dtype, log).items():
                result["paths"][name].update(mem)
        paths = result["paths"]
        # ratios of median throughputs, and the median of per-round ratios (each round runs every
        # path once, back to back, so slow drifts of a shared machine cancel out of the latter)
        ratios, paired, paired_range = {}, {}, {}
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
            result["target"] = {"default_over_l2l_at_least": target,
                                "met": ratios["default_over_l2l"] >= target,
                                "met_paired": paired["default_over_l2l"] >= target}
        result["paired_ratios"] = paired
        result["paired_ratio_range"] = paired_range
        result.update(name=spec.name, meta_batch=spec.meta_batch,
                      first_order_teacher=spec.first_order_teacher, ratios=ratios)
        report["configs"][key] = result
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
