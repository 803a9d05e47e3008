"""Pre-train the teacher as a plain classifier (paper 5.1), data-parallel with Ray Train.

    python -m tsmd_ray.pretrain --dataset omniglot --data-root PATH --teacher resnet50 \
        --epochs 160 --workers 4 [--use-gpu] [--init-weights resnet50_imagenet.pth] --out teacher.pt

Trains ``teacher`` with a C-way head on every image of the C meta-training classes (the
``train`` split; validation and test classes are never seen), with Ray Train's ``TorchTrainer``
(Train V2): one worker per GPU (``--use-gpu``) or CPU process, DDP gradients, a checkpoint
reported every epoch, and ``FailureConfig(max_failures)``: a worker that dies restarts the worker
group, which resumes from the last reported checkpoint. ``--resume`` continues a run that was
interrupted (the driver died, Ctrl-C) from its latest checkpoint in ``--storage-path``.

The result, ``--out``, is a plain state dict whose keys are those of
``tsmd_ray.models.build_model(teacher, ...)``: ``python -m tsmd_ray.train --teacher-init FILE``
loads it into psi, replacing the C-way head by the N-way one. ``--init-weights FILE`` starts a
torchvision teacher from a local ImageNet weights file (the fine-grained datasets of the paper);
nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write

log = logging.getLogger("tsmd_ray.pretrain")

STATE_FILE = "state.pt"


# ---------------------------------------------------------------------- pieces used on every worker
def train_rows(dataset: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Row indices of the train split, their labels remapped to 0..C-1, and C."""
    labels = dataset.split_labels("train")
    if not len(labels):
        raise ValueError(f"dataset {dataset.name!r} has no train split to pre-train on")
    ranges = dataset.class_ranges
    rows = np.concatenate([np.arange(*ranges[label]) for label in labels])
    remap = {int(label): i for i, label in enumerate(labels)}
    targets = np.array([remap[int(label)] for label in dataset.labels[rows]], dtype=np.int64)
    return rows, targets, len(labels)


def epoch_shard(n: int, epoch: int, seed: int, rank: int, world: int, batch_size: int,
                max_steps: int | None = None) -> list[np.ndarray]:
    """This rank's batches for an epoch: one seeded permutation shared by all ranks, split
    round-robin, cut to the same number of full steps on every rank (DDP needs equal steps)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world
    mine = perm[rank::world][:per_rank]
    steps = max(1, per_rank // batch_size)
    if max_steps:
        steps = min(steps, max_steps)
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def make_batch(dataset: Any, rows: np.ndarray, preprocess: dict[str, Any], generator: torch.Generator,
               augment_images: bool) -> torch.Tensor:
    from .data import augment, normalise

    x = torch.from_numpy(np.ascontiguousarray(dataset.images[rows]))
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if augment_images:
        x = augment(x, generator)
    return normalise(x, preprocess)


def build_teacher(config: dict[str, Any], num_classes: int, shape: tuple[int, int, int]) -> nn.Module:
    from .models import build_model

    height, _, channels = shape
    torch.manual_seed(config["seed"])
    return build_model(config["teacher"], num_classes, channels, height, widths=config.get("teacher_widths"),
                       weights=config.get("init_weights"), adaptable=False)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    module = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _maybe_fail(config: dict[str, Any], epoch: int, step: int, rank: int) -> None:
    """Test hook: raise once (marker file) in the middle of epoch ``fail_epoch`` on rank 1."""
    marker = config.get("fail_marker")
    if not marker or epoch != config.get("fail_epoch", 1) or step != 1 or rank != min(1, config["world"] - 1):
        return
    if not os.path.exists(marker):
        Path(marker).write_text(f"worker {rank} failed on purpose at epoch {epoch} step {step}\n")
        raise RuntimeError(f"injected failure of worker {rank} at epoch {epoch}")


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: restore, train epochs, report metrics and a checkpoint per epoch."""
    import ray.train
    import ray.train.torch

    from .data import ArrowFewShotDataset

    torch.set_num_threads(config.get("threads_per_worker", 1))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config = {**config, "world": world}
    dataset = ArrowFewShotDataset(config["dataset_path"])
    rows, targets, num_classes = train_rows(dataset)
    preprocess = dataset.preprocess
    device = ray.train.torch.get_device()

    model = build_teacher(config, num_classes, dataset.shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9,
                                weight_decay=config["weight_decay"], nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    start = 0  # the first epoch of this attempt: > 0 when restored after a failure or --resume
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["epoch"]) + 1
    model = ray.train.torch.prepare_model(model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.get("label_smoothing", 0.0))

    for epoch in range(start, config["epochs"]):
        started = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(config["seed"] * 100_003 + epoch * 1009 + rank)
        loss_sum = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        batches = epoch_shard(len(rows), epoch, config["seed"], rank, world, config["batch_size"],
                              config.get("max_steps"))
        for step, index in enumerate(batches):
            _maybe_fail(config, epoch, step, rank)
            x = make_batch(dataset, rows[index], preprocess, generator, config["augment"]).to(device)
            y = torch.from_numpy(targets[index]).to(device)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += torch.tensor([float(loss.detach()) * len(y), float((logits.argmax(1) == y).sum()), len(y)],
                                     dtype=torch.float64)
        scheduler.step()
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss_sum)
        metrics = {"epoch": epoch, "loss": float(loss_sum[0] / loss_sum[2]), "acc": float(loss_sum[1] / loss_sum[2]),
                   "lr": scheduler.get_last_lr()[0], "epoch_s": time.perf_counter() - started,
                   "num_classes": num_classes, "start_epoch": start}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save({"model": plain_state_dict(model), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "teacher": config["teacher"], "num_classes": num_classes},
                           Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------- driver
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
    p.add_argument("--augment", type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=True,
                   help="random crop, flip, colour jitter (default true)")
    p.add_argument("--max-steps", type=int, help="cap on steps per epoch (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
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


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .data import ArrowFewShotDataset, resolve_dataset

    dataset_path = str(resolve_dataset(args.dataset, args.data_root, args.cache_dir))
    dataset = ArrowFewShotDataset(dataset_path)
    rows, _, num_classes = train_rows(dataset)
    storage = Path(args.storage_path).resolve()
    widths = "-" + "-".join(map(str, args.teacher_widths)) if args.teacher_widths else ""
    name = args.name or f"pretrain-{args.dataset}-{args.teacher}{widths}"
    run_dir = storage / name
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        raise FileExistsError(f"{run_dir} holds a previous pre-training run: pass --resume to continue it, "
                              "or another --name / --storage-path to start afresh")
    if args.init_weights and not Path(args.init_weights).is_file():
        raise FileNotFoundError(f"--init-weights {args.init_weights} does not exist")
    config = {"dataset_path": dataset_path, "teacher": args.teacher, "teacher_widths": args.teacher_widths,
              "init_weights": str(Path(args.init_weights).resolve()) if args.init_weights else None,
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
              "label_smoothing": args.label_smoothing, "augment": args.augment, "max_steps": args.max_steps,
              "seed": args.seed, "threads_per_worker": args.threads_per_worker, "fail_marker": args.fail_marker}
    log.info("pre-training %s on %d images of %d %s train classes with %d %s worker(s), %d epochs",
             args.teacher, len(rows), num_classes, args.dataset, args.workers, "GPU" if args.use_gpu else "CPU",
             args.epochs)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, include_dashboard=False)
    resources = None if args.use_gpu else {"CPU": 1}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pre-training run {run_dir} reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    out = Path(args.out) if args.out else run_dir / "teacher.pt"
    atomic_write(out, lambda tmp: torch.save(state["model"], tmp))
    summary = {"out": str(out), "teacher": args.teacher, "teacher_widths": args.teacher_widths,
               "dataset": args.dataset, "num_classes": num_classes, "images": int(len(rows)),
               "epochs": int(state["epoch"]) + 1, "workers": args.workers, "run_dir": str(run_dir),
               "wall_s": round(time.perf_counter() - started, 1),
               "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}
    atomic_write(out.with_suffix(out.suffix + ".json"), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    log.info("teacher weights written to %s (train acc %.3f)", out, summary["metrics"].get("acc", math.nan))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    for name in ("epochs", "batch_size", "workers"):
        if getattr(args, name) < 1:
            log.error("--%s must be at least 1", name.replace("_", "-"))
            return 2
    try:
        summary = pretrain(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
