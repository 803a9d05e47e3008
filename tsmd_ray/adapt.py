"""Client-side adaptation (the paper's meta-testing, Fig. 1): ``python -m tsmd_ray.adapt``.

Reads a server checkpoint and a support folder with one sub-folder of raw images per class,
adapts the teacher to the client's task (Eq. 6), then the student guided by the adapted teacher
(Eq. 7), and writes only the adapted student to --out: ``student.pt`` (state dict),
``student.pt2`` (``torch.export``, runs with torch alone), ``deploy.json`` (classes and
preprocessing) and ``report.json`` (size and CPU latency of student against teacher).
``--method student`` skips the teacher (plain MAML adaptation of the student). A checkpoint
meta-trained with ``kd_views: K`` (beyond the paper) also distils on K augmented views of each
support image, made from ``seed`` and the image alone as evaluation makes them.

Classes are the sub-folders in sorted order. With n classes and an N-way checkpoint (n <= N),
the first n rows of the N-way heads are used, i.e. class i takes the head's output i.
Batch norm is frozen to the support set's statistics for deployment (see tsmd_ray.export).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .algorithms import detached, parameters_of, run_task
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .config import Config
from .data import augmented_views
from .engine import DataSpec, build_models, build_objective, resolve_device
from .errors import entry_point
from .export import cpu_latency_ms, export_model, freeze_batchnorm, parameter_count, state_dict_bytes
from .preflight import check_out_dir, check_torch_device
from .predict import (BATCH_NORM_POLICY, DEPLOY_FILE, EXPORT_FILE, MODEL_FILE, MODEL_KIND, REPORT_FILE,
                      ClientError, load_images)

log = logging.getLogger("tsmd_ray.adapt")

METHODS = ("tsmd", "student")


def support_files(root: str | Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` of a support folder (sorted; hidden files skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ClientError(f"support folder {root} does not exist or is not a directory")
    classes: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            log.warning("ignoring %s: support images go in one sub-folder per class", entry)
            continue
        files = sorted(p for p in entry.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ClientError(f"class folder {entry} holds no image files")
        classes[entry.name] = files
    if len(classes) < 2:
        raise ClientError(f"support folder {root} has {len(classes)} class sub-folder(s) "
                          f"{sorted(classes)}; classification needs at least 2")
    return classes


def load_server_checkpoint(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """The checkpoint's Config (local file settings dropped) and its ``data`` entry."""
    payload = load_checkpoint(path)
    data = payload.get("data") or {}
    if not data.get("preprocess") or "learner" not in payload:
        raise CheckpointError(f"checkpoint {path} has no learner weights or no preprocessing settings")
    try:
        cfg = Config.from_checkpoint(payload["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has a configuration this version cannot read: {exc}") from exc
    if int(data["preprocess"]["channels"]) != int(data["in_channels"]):
        raise CheckpointError(f"checkpoint {path}: preprocessing gives {data['preprocess']['channels']} "
                              f"channel(s) but the models take {data['in_channels']}")
    return cfg, {**data, "learner": payload["learner"]}


def _load_rows(module: nn.Module, state: dict[str, Tensor], rows: int) -> None:
    """Load ``state`` into ``module``, keeping the first ``rows`` outputs of the N-way head."""
    module.load_state_dict({k: v[:rows] if k.startswith("head.") else v for k, v in state.items()})


def build_client_models(cfg: Config, data: dict[str, Any], n_classes: int
                        ) -> tuple[nn.Module | None, nn.Module, Config]:
    """The server's teacher (None if it has none) and student, with n-way heads."""
    if not cfg.has_student:
        raise ClientError(f"the checkpoint was meta-trained with method {cfg.method!r} and has no student")
    if n_classes > cfg.ways:
        raise ClientError(f"the support folder has {n_classes} classes but the checkpoint's heads have "
                          f"{cfg.ways} outputs (meta-trained {cfg.ways}-way); use at most {cfg.ways} classes")
    cfg = cfg.replace(ways=n_classes)
    teacher, student = build_models(cfg, DataSpec(int(data["in_channels"]), int(data["image_size"])))
    _load_rows(student, data["learner"]["theta"], n_classes)
    if teacher is not None:
        _load_rows(teacher, data["learner"]["psi"], n_classes)
    return teacher, student, cfg


def _set_params(module: nn.Module, params: dict[str, Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])
    return module


def adapt_models(teacher: nn.Module | None, student: nn.Module, cfg: Config, x: Tensor, y: Tensor,
                 steps: int, device: torch.device, adapt_teacher: bool = True, views: Tensor | None = None
                 ) -> tuple[nn.Module | None, nn.Module, dict[str, float]]:
    """Eq. 6 then Eq. 7 on the support set (first order: nothing is meta-learned here).

    ``adapt_teacher=False`` leaves the teacher out (plain MAML, Eq. 7 without L_KD). ``views``:
    augmented views of the support images for L_KD (``kd_views``). Returns the teacher and student
    on ``device`` with adapted weights and their support-set accuracies.
    """
    teacher = teacher.to(device) if teacher is not None else None
    student = student.to(device)
    objective = build_objective(cfg, teacher, student, device)
    settings = dataclasses.replace(objective.settings, steps=steps, first_order_teacher=True,
                                   first_order_student=True)
    psi = detached(parameters_of(teacher)) if teacher is not None else {}
    theta = detached(parameters_of(student))
    x, y = x.to(device), y.to(device)
    views = views.to(device) if views is not None else None
    guide = teacher if adapt_teacher else None
    metrics, psi_task, theta_task = run_task(guide, student, objective.kd_loss, settings, psi, theta, x, y, x, y,
                                             views)
    if guide is not None:
        _set_params(teacher, detached(psi_task))
    _set_params(student, detached(theta_task))
    return teacher, student, {k.replace("/acc", ""): float(v) for k, v in metrics.items() if k.endswith("/acc")}


def _model_summary(model: nn.Module, arch: str, widths: Any, example: Tensor) -> dict[str, Any]:
    return {"arch": arch, "widths": list(widths) if widths else "default", "parameters": parameter_count(model),
            "state_dict_bytes": state_dict_bytes(model), "cpu_latency_per_image": cpu_latency_ms(model, example)}


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def write_student(out: Path, deployed: nn.Module, spec: dict[str, Any], classes: list[str],
                  preprocess: dict[str, Any], example: Tensor, **info: Any) -> None:
    """``student.pt`` (state dict and how to rebuild it), ``student.pt2`` and ``deploy.json``."""
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / MODEL_FILE, {"kind": MODEL_KIND, "model": spec, "classes": classes, "preprocess": preprocess,
                                       "state_dict": deployed.state_dict(), "batch_norm": BATCH_NORM_POLICY, **info})
    export_model(deployed, example, out / EXPORT_FILE)
    _write_json(out / DEPLOY_FILE, {"classes": classes, "preprocess": preprocess, "export": EXPORT_FILE,
                                    "input": ["batch", spec["in_channels"], spec["image_size"], spec["image_size"]],
                                    "output": "logits, one column per class", "batch_norm": BATCH_NORM_POLICY})


def adapt(checkpoint: str | Path, support: str | Path, out: str | Path, method: str = "tsmd",
          steps: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Adapt the server's pair to the support folder, write the student to ``out``; returns the report."""
    if method not in METHODS:
        raise ClientError(f"method {method!r} is not one of {', '.join(METHODS)}")
    check_out_dir("--out", out)
    check_torch_device("--device", device)
    cfg, data = load_server_checkpoint(checkpoint)
    files = support_files(support)
    classes = list(files)
    server_ways = cfg.ways
    teacher, student, cfg = build_client_models(cfg, data, len(classes))
    if method == "tsmd" and teacher is None:
        raise ClientError(f"the checkpoint was meta-trained with method {cfg.method!r} and has no "
                          "teacher; adapt with --method student")
    steps = cfg.test_inner_steps if steps is None else steps
    if steps < 1:
        raise ClientError(f"--steps must be at least 1, got {steps}")
    x = load_images([p for c in classes for p in files[c]], data["preprocess"])
    y = torch.tensor([i for i, c in enumerate(classes) for _ in files[c]])
    log.info("adapting (%s, %d steps) on %d images of %d classes: %s", method, steps, len(y), len(classes),
             ", ".join(f"{c} ({len(files[c])})" for c in classes))
    views = None  # with kd_views, the views that evaluation gives the same images (seed and image alone)
    if cfg.kd_views and (method == "tsmd" or cfg.method == "student"):  # a student's views take the labels
        views = augmented_views(x, cfg.kd_views, cfg.seed, data["preprocess"])
    teacher, student, support_acc = adapt_models(teacher, student, cfg, x, y, steps, resolve_device(device),
                                                 adapt_teacher=method == "tsmd", views=views)
    x = x.to(next(student.parameters()).device)
    deployed = freeze_batchnorm(student, x).cpu()
    spec = {"arch": cfg.student, "widths": list(cfg.student_widths), "ways": len(classes),
            "in_channels": int(data["in_channels"]), "image_size": int(data["image_size"])}
    out = Path(out)
    write_student(out, deployed, spec, classes, data["preprocess"], x[:2].cpu(), method=method, steps=steps)

    example = x[:1].cpu()
    report: dict[str, Any] = {
        "classes": classes, "shots": {c: len(files[c]) for c in classes}, "method": method, "steps": steps,
        "checkpoint": str(checkpoint), "server_method": cfg.method, "kd_views": 0 if views is None else cfg.kd_views,
        "head_outputs_used": f"first {len(classes)} of {server_ways}", "batch_norm": BATCH_NORM_POLICY,
        "support_accuracy": support_acc,
        "student": _model_summary(deployed, cfg.student, cfg.student_widths, example),
        "teacher": None, "files_bytes": {name: (out / name).stat().st_size for name in (MODEL_FILE, EXPORT_FILE)},
    }
    if teacher is not None:  # deployed the same way for comparison only; it is not written
        report["teacher"] = {**_model_summary(freeze_batchnorm(teacher, x).cpu(), cfg.teacher, cfg.teacher_widths,
                                              example), "adapted": method == "tsmd" and cfg.adapts_teacher}
        s, t = report["student"], report["teacher"]
        report["teacher_over_student"] = {
            "parameters": t["parameters"] / s["parameters"], "size": t["state_dict_bytes"] / s["state_dict_bytes"],
            "cpu_latency": t["cpu_latency_per_image"]["median_ms"] / s["cpu_latency_per_image"]["median_ms"]}
    _write_json(out / REPORT_FILE, report)
    log.info("wrote %s, %s, %s and %s to %s", MODEL_FILE, EXPORT_FILE, DEPLOY_FILE, REPORT_FILE, out)
    return report


def summary(report: dict[str, Any], out: str | Path) -> str:
    """A few human-readable lines about an adaptation (``report.json`` has everything)."""
    s = report["student"]
    lines = [f"adapted student ({report['method']}, {len(report['classes'])} classes, {report['steps']} steps) "
             f"written to {out}",
             f"  support accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in report["support_accuracy"].items()),
             f"  student: {s['parameters']} parameters, {s['state_dict_bytes']} bytes, "
             f"{s['cpu_latency_per_image']['median_ms']:.3f} ms/image on CPU"]
    if report["teacher"]:
        t = report["teacher"]
        lines.append(f"  teacher: {t['parameters']} parameters, {t['state_dict_bytes']} bytes, "
                     f"{t['cpu_latency_per_image']['median_ms']:.3f} ms/image on CPU (not written)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.adapt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by tsmd_ray.train")
    parser.add_argument("--support", required=True, metavar="DIR",
                        help="one sub-folder per class (its name is the class name) holding raw images")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the adapted student is written")
    parser.add_argument("--method", default="tsmd", choices=METHODS,
                        help="tsmd: teacher adapted (Eq. 6) then guides the student (Eq. 7); "
                             "student: plain MAML adaptation of the student (default: tsmd)")
    parser.add_argument("--steps", type=int, help="inner gradient steps (default: the checkpoint's "
                                                  "eval_inner_steps, else inner_steps)")
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda or cuda:N")
    return parser


def _main(args: argparse.Namespace) -> int:
    report = adapt(args.checkpoint, args.support, args.out, args.method, args.steps, args.device)
    print(summary(report, args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
