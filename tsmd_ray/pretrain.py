"""Pre-train the teacher as a plain classifier (paper 5.1), data-parallel with Ray Train.

    python -m tsmd_ray.pretrain --dataset omniglot --data-root PATH --teacher resnet50 \
        --epochs 160 --workers 4 [--use-gpu] [--init-weights resnet50_imagenet.pth] --out teacher.pt

Trains ``teacher`` with a C-way head on every image of the C meta-training classes (the
``train`` split; validation and test classes are never seen), with Ray Train's ``TorchTrainer``
(Train V2): one worker per GPU (``--use-gpu``) or CPU process, DDP gradients, a checkpoint
reported every epoch, and ``FailureConfig(max_failures)``: a worker that dies restarts the worker
group, which resumes from the last reported checkpoint. ``--resume`` continues a run that was
interrupted (the driver died, Ctrl-C) from its latest checkpoint in ``--storage-path``.
``--backend local`` runs the same epoch loop as one worker in this process, without Ray (a
checkpoint ``state.pt`` per epoch in the run's folder).

The result, ``--out``, is a plain state dict whose keys are those of
``tsmd_ray.models.build_model(teacher, ...)``: ``python -m tsmd_ray.train --teacher-init FILE``
loads it into psi, replacing the C-way head by the N-way one. ``--init-weights FILE`` starts a
torchvision teacher from a local ImageNet weights file (the fine-grained datasets of the paper);
nothing is downloaded.

:func:`cached_pretrain` (used by ``tsmd_ray.pipeline``) pre-trains once per configuration and
dataset into ``$TSMD_CACHE_DIR/teachers/`` and reuses the weights on later calls.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write
from .flags import BoolFlag
from .errors import RequestError, entry_point
from .pretrain_worker import STATE_FILE, LocalSession, build_teacher, fit_teacher, train_loop, train_rows
from .preflight import (check_file, check_fits, check_minimum, check_out_dir, check_out_file, check_torch_device,
                        resolve_data)

log = logging.getLogger("tsmd_ray.pretrain")

# The settings that shape the trained weights: a cached teacher is reused when all of them match.
RESULT_SETTINGS = ("teacher", "teacher_widths", "init_weights", "epochs", "batch_size", "lr", "weight_decay",
                   "label_smoothing", "augment", "max_steps", "seed", "use_gpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tsmd_ray.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="omniglot", help="dataset name (default omniglot)")
    p.add_argument("--data-root", default=os.environ.get("TSMD_DATA_ROOT"),
                   help="prepared dataset or raw release (default: $TSMD_DATA_ROOT)")
    p.add_argument("--cache-dir", default=os.environ.get("TSMD_CACHE_DIR", str(Path.home() / ".cache" / "tsmd_ray")),
                   help="where a raw release is prepared to Arrow")
    p.add_argument("--teacher", default="resnet50", help="conv4, resnet12 or a torchvision model name")
    p.add_argument("--teacher-widths", type=int, nargs="+", help="widths of conv4 / resnet12")
    p.add_argument("--init-weights", help="local torchvision weights file (e.g. ImageNet) for the body")
    p.add_argument("--epochs", type=int, default=160, help="epochs (paper: 160)")
    p.add_argument("--batch-size", type=int, default=64, help="images per worker and step")
    p.add_argument("--lr", type=float, default=0.05, help="SGD (Nesterov, momentum 0.9) rate, cosine decay")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", action=BoolFlag, default=True,
                   help="random crop, flip, colour jitter (default on; --no-augment turns it off)")
    p.add_argument("--max-steps", type=int, help="cap on steps per epoch (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="ray", choices=("ray", "local"),
                   help="ray (Ray Train workers, default) | local (one worker in this process, no Ray)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (--backend ray)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads (CPU workers)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    p.add_argument("--storage-path", default=str(Path("runs") / "pretrain"),
                   help="Ray Train storage (checkpoints); shared storage on a multi-node cluster")
    p.add_argument("--name", help="run name under --storage-path (default pretrain-DATASET-TEACHER[-WIDTHS])")
    p.add_argument("--resume", action="store_true", help="continue the run NAME from its latest checkpoint")
    p.add_argument("--out", help="teacher weights file to write (default STORAGE/NAME/teacher.pt)")
    p.add_argument("--fail-marker", help=argparse.SUPPRESS)  # test hook: fail once, mid epoch 1
    return p


def world_size(args: argparse.Namespace) -> int:
    return args.workers if args.backend == "ray" else 1


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` if its numbers are in range, else a one-line ``RequestError`` naming the option."""
    for name in ("epochs", "batch_size", "workers", "threads_per_worker"):
        check_minimum("--" + name.replace("_", "-"), getattr(args, name), 1)
    check_minimum("--max-steps", args.max_steps, 1)
    check_minimum("--max-failures", args.max_failures, 0)
    for name, value, accepted, ok in (("--lr", args.lr, "a positive number", args.lr > 0),
                                      ("--weight-decay", args.weight_decay, "zero or positive", args.weight_decay >= 0),
                                      ("--label-smoothing", args.label_smoothing, "in [0, 1)",
                                       0 <= args.label_smoothing < 1)):
        if not (ok and math.isfinite(value)):
            raise RequestError("args.range", f"{name} must be {accepted}, got {value}")
    return args


def check_request(args: argparse.Namespace) -> tuple[str, int]:
    """Everything a pre-training of ``args`` needs (numbers, files, devices, Ray resources, data,
    the teacher's model), before Ray starts or anything is written; returns the prepared dataset
    and its number of train classes."""
    from .data import ArrowFewShotDataset

    check_args(args)
    check_file("--init-weights", args.init_weights)
    check_out_file("--out", args.out)
    check_out_dir("--storage-path", args.storage_path)
    if args.backend == "ray":
        check_fits({"CPU": (args.workers, "--workers (one CPU each)"),
                    "GPU": (args.workers if args.use_gpu else 0, "--workers with --use-gpu (one GPU each)")})
    elif args.use_gpu:
        check_torch_device("--use-gpu", "cuda")
    dataset_path = resolve_data(args)
    dataset = ArrowFewShotDataset(dataset_path)
    _, _, num_classes = train_rows(dataset)
    try:
        build_teacher({"teacher": args.teacher, "teacher_widths": args.teacher_widths, "seed": args.seed,
                       "init_weights": args.init_weights}, num_classes, dataset.shape)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise RequestError("config.models", f"teacher={args.teacher!r} cannot be built for {dataset.shape} "
                           f"images: {exc}") from None
    return dataset_path, num_classes


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Pre-train the teacher of ``args``; writes ``--out`` and its ``.json`` summary, returns the summary."""
    from .data import ArrowFewShotDataset

    dataset_path, num_classes = check_request(args)
    rows, _, _ = train_rows(ArrowFewShotDataset(dataset_path))
    widths = "-" + "-".join(map(str, args.teacher_widths)) if args.teacher_widths else ""
    run_dir = Path(args.storage_path).resolve() / (args.name or f"pretrain-{args.dataset}-{args.teacher}{widths}")
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        raise RequestError("file.out", f"--storage-path/--name: {run_dir} holds a previous pre-training run; "
                           "accepted: --resume to continue it, or another --name or --storage-path")
    config = {"dataset_path": dataset_path, "teacher": args.teacher, "teacher_widths": args.teacher_widths,
              "init_weights": str(Path(args.init_weights).resolve()) if args.init_weights else None,
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
              "label_smoothing": args.label_smoothing, "augment": args.augment, "max_steps": args.max_steps,
              "seed": args.seed, "threads_per_worker": args.threads_per_worker, "fail_marker": args.fail_marker}
    log.info("pre-training %s on %d images of %d %s train classes with %d %s worker(s) (%s), %d epochs",
             args.teacher, len(rows), num_classes, args.dataset, world_size(args), "GPU" if args.use_gpu else "CPU",
             "Ray Train" if args.backend == "ray" else "this process", args.epochs)
    started = time.perf_counter()
    state, metrics = (_fit_on_ray if args.backend == "ray" else _fit_here)(args, config, run_dir)
    out = Path(args.out) if args.out else run_dir / "teacher.pt"
    atomic_write(out, lambda tmp: torch.save(state["model"], tmp))
    summary = {"out": str(out), "teacher": args.teacher, "teacher_widths": args.teacher_widths,
               "dataset": args.dataset, "num_classes": num_classes, "images": int(len(rows)),
               "epochs": int(state["epoch"]) + 1, "workers": world_size(args), "backend": args.backend,
               "run_dir": str(run_dir), "wall_s": round(time.perf_counter() - started, 1),
               "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    atomic_write(out.with_suffix(out.suffix + ".json"), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    log.info("teacher weights written to %s (train acc %.3f)", out, summary["metrics"].get("acc", math.nan))
    return summary


def _fit_on_ray(args: argparse.Namespace, config: dict[str, Any], run_dir: Path
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ray Train's ``TorchTrainer``: the last checkpoint's state and the last metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                               resources_per_worker=None if args.use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                                       failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                                       # plain print in the workers: tqdm_ray's bar reaches the driver as is
                                       worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pre-training run {run_dir} reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    return state, result.metrics or {}


def _fit_here(args: argparse.Namespace, config: dict[str, Any], run_dir: Path
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One worker in this process (no Ray): the state after the last epoch and its metrics."""
    session = LocalSession(run_dir, torch.device("cuda" if args.use_gpu else "cpu"))
    run_dir.mkdir(parents=True, exist_ok=True)
    fit_teacher(config, session)
    state = session.restore()
    if state is None:
        raise RuntimeError(f"pre-training run {run_dir} wrote no checkpoint")
    return state, session.metrics


def pretrain_args(**settings: Any) -> argparse.Namespace:
    """The command line's defaults with ``settings`` (option names with underscores) in their place."""
    args = build_parser().parse_args([])
    unknown = sorted(set(settings) - set(vars(args)))
    if unknown:
        raise ValueError(f"unknown pre-training setting(s): {', '.join(unknown)}")
    return check_args(argparse.Namespace(**{**vars(args), **settings}))


def cache_key(args: argparse.Namespace, dataset_path: str | Path) -> str:
    """Digest of the settings that shape the weights and of the prepared dataset they train on."""
    from .data.arrow import META_FILE

    record = {name: getattr(args, name) for name in RESULT_SETTINGS} | {"world": world_size(args)}
    record["dataset"] = [str(Path(dataset_path).resolve()), hashlib.sha256(
        (Path(dataset_path) / META_FILE).read_bytes()).hexdigest()]
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def cached_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`pretrain` once per :func:`cache_key`, into ``CACHE_DIR/teachers/DATASET-TEACHER-KEY/``.

    A finished teacher there is reused (``"cached": True`` in the summary); an interrupted run
    there is resumed from its last epoch.
    """
    from .data import resolve_dataset

    dataset_path = resolve_dataset(args.dataset, args.data_root, args.cache_dir)
    folder = Path(args.cache_dir) / "teachers" / f"{args.dataset}-{args.teacher}-{cache_key(args, dataset_path)}"
    out = folder / "teacher.pt"
    summary_file = out.with_suffix(out.suffix + ".json")
    if out.is_file() and summary_file.is_file():
        log.info("reusing the pre-trained teacher %s", out)
        return {**json.loads(summary_file.read_text()), "cached": True}
    run = argparse.Namespace(**{**vars(args), "storage_path": str(folder), "name": "ray", "out": str(out),
                                "resume": True})
    return {**pretrain(run), "cached": False}


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)))


def _main(args: argparse.Namespace) -> int:
    print(json.dumps(pretrain(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
