#!/usr/bin/env python
"""The first meta-gradient of the GPU path against the CPU loop (no Ray, no data).

What a cluster user's GPU workers compute (the ``gpu`` profile's models and settings, tasks
batched with ``torch.func.vmap`` on the device, primitive batch norm) against what the CPU
workers compute (one task at a time, fused batch norm), from the same weights and the same
synthetic 1x28x28 tasks, through ``tsmd_ray.engine.build_objective`` as training builds it. Prints
JSON: per weight group (psi, theta) relative errors ||g - g_ref|| / ||g_ref|| over all tensors and
the largest per-tensor one.

- ``--dtype float64`` (default): the vmap path against the loop, both in float64; exits 1 above
  ``--tolerance`` (default 1e-8). This checks the maths.
- ``--dtype float32``: the vmap path and the loop in float32 (TF32 off), each against the float64
  loop. Float32 rounding can be amplified by the inner loop itself (a randomly initialised ResNet-12
  at alpha = 0.1 overshoots: its support loss rises from 2 to 19 before it falls, and both float32
  paths then miss the float64 gradient by tens of percent), so vmap is judged against the loop's
  own float32 error: exits 1 when the vmap path's error exceeds ``--ratio`` times the loop's and
  ``--tolerance`` (default 1e-3).

Usage: ``python benchmarks/gpu_check.py [--device cuda] [--dtype float32] [--profile configs/gpu.yaml]
[--json-out F]`` (``--device cpu --profile configs/laptop.yaml --meta-batch 2``: a dry run on a CPU;
the ResNet-12 profile at full meta-batch needs many GiB of host memory there). ``--alpha``/``--lam``
override the profile's inner rates (to see how the conditioning depends on them).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tsmd_ray.algorithms import TaskBatch, parameters_of  # noqa: E402
from tsmd_ray.config import Config, load_yaml  # noqa: E402
from tsmd_ray.engine import DataSpec, build_models, build_objective, configure_precision  # noqa: E402

SPEC = DataSpec(in_channels=1, image_size=28)  # Omniglot, as the profile trains on


def synthetic_tasks(cfg: Config, seed: int = 1) -> TaskBatch:
    """``cfg.meta_batch`` seeded N-way K-shot tasks of random images, in float64."""
    gen = torch.Generator().manual_seed(seed)
    shape = (SPEC.in_channels, SPEC.image_size, SPEC.image_size)

    def part(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(cfg.meta_batch, cfg.ways * per_class, *shape, generator=gen, dtype=torch.float64)
        return x, torch.arange(cfg.ways).repeat_interleave(per_class).repeat(cfg.meta_batch, 1)

    return TaskBatch(*part(cfg.shots), *part(cfg.query))


def meta_gradient(cfg: Config, teacher, student, tasks: TaskBatch, device: str, batching: str):
    """Outer-gradient sums ``{"psi": .., "theta": ..}`` on ``device`` with ``task_batching=batching``."""
    cfg = cfg.replace(device=device, task_batching=batching)
    dtype = configure_precision(cfg)
    teacher = copy.deepcopy(teacher).to(device, dtype) if teacher is not None else None
    student = copy.deepcopy(student).to(device, dtype)
    objective = build_objective(cfg, teacher, student, torch.device(device))
    psi = parameters_of(teacher) if teacher is not None else {}
    tasks = tasks.to(torch.device(device), dtype)
    grads_psi, grads_theta, _ = objective.gradient_sums(psi, parameters_of(student), tasks)
    return {key: {name: g.detach().cpu() for name, g in grads.items()}
            for key, grads in (("psi", grads_psi), ("theta", grads_theta)) if grads}


def relative_errors(test: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Over all tensors, and the largest per tensor among those whose gradient is not zero up to rounding
    (a convolution's bias before batch norm has none: batch norm removes it)."""
    flat = lambda g: torch.cat([t.flatten() for t in g.values()])  # noqa: E731
    total = flat(reference).norm()
    per_tensor = [float((test[n] - r).norm() / r.norm()) for n, r in reference.items() if r.norm() > 1e-6 * total]
    return {"rel": float((flat(test) - flat(reference)).norm() / total), "max_tensor_rel": max(per_tensor),
            "tensors": len(per_tensor), "zero_tensors": len(reference) - len(per_tensor)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device of the vmap path (default cuda)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="float64: vmap against the loop; float32: both against the float64 loop")
    parser.add_argument("--profile", default=str(ROOT / "configs" / "gpu.yaml"), help="pipeline profile (train keys)")
    parser.add_argument("--meta-batch", type=int, help="tasks (default: the profile's meta-batch)")
    parser.add_argument("--alpha", type=float, help="teacher inner rate (default: the profile's)")
    parser.add_argument("--lam", type=float, help="student inner rate (default: the profile's)")
    parser.add_argument("--tolerance", type=float, help="relative error always accepted (1e-8 float64, 1e-3 float32)")
    parser.add_argument("--ratio", type=float, default=2.0,
                        help="float32: vmap's error accepted up to this times the loop's (default 2)")
    parser.add_argument("--json-out", help="also write the result here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("meta_batch", args.meta_batch), ("alpha", args.alpha), ("lam", args.lam)) if v}
    cfg = Config.from_dict({**load_yaml(args.profile)["train"], "dtype": "float64", **overrides})
    tolerance = args.tolerance if args.tolerance is not None else (1e-8 if args.dtype == "float64" else 1e-3)
    teacher, student = build_models(cfg, SPEC)
    tasks = synthetic_tasks(cfg)
    loop64 = meta_gradient(cfg, teacher, student, tasks, "cpu", "loop")
    if args.dtype == "float64":
        vmap = meta_gradient(cfg, teacher, student, tasks, args.device, "vmap")
        errors = {key: relative_errors(vmap[key], loop64[key]) for key in loop64}
        ok = all(e["rel"] <= tolerance and e["max_tensor_rel"] <= tolerance for e in errors.values())
    else:
        cfg32 = cfg.replace(dtype="float32", allow_tf32=False)
        vmap = meta_gradient(cfg32, teacher, student, tasks, args.device, "vmap")
        loop = meta_gradient(cfg32, teacher, student, tasks, "cpu", "loop")
        errors = {key: {"vmap_vs_float64": relative_errors(vmap[key], loop64[key]),
                        "loop_vs_float64": relative_errors(loop[key], loop64[key]),
                        "vmap_vs_loop": relative_errors(vmap[key], loop[key])} for key in loop64}
        ok = all(e["vmap_vs_float64"]["rel"] <= max(tolerance, args.ratio * e["loop_vs_float64"]["rel"])
                 for e in errors.values())
    result = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "profile": args.profile, "method": cfg.method, "teacher": cfg.teacher,
              "student": cfg.student, "student_widths": cfg.student_widths, "meta_batch": cfg.meta_batch,
              "inner_steps": cfg.inner_steps, "alpha": cfg.alpha, "lam": cfg.lam, "dtype": args.dtype,
              "tolerance": tolerance, "ratio": args.ratio if args.dtype == "float32" else None, "errors": errors,
              "ok": ok}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
