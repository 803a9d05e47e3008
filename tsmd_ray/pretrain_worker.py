"""The epoch loop of teacher pre-training (paper 5.1): what every Ray Train worker runs
(:func:`train_loop`, through :class:`RaySession`) and what ``--backend local`` runs in this process
(:class:`LocalSession`). The driver and command line are :mod:`tsmd_ray.pretrain`."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import atomic_write

STATE_FILE = "state.pt"


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


class RaySession:
    """The epoch loop inside a Ray Train worker: DDP, checkpoints reported to Ray Train."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # Ray Train logs every report at INFO through the root logger (LoggingConfig covers "ray.train" only)
        logging.getLogger().setLevel(logging.WARNING)

    def restore(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def progress(self, desc: str, total: int, done: int) -> Any:
        """Rank 0's bar, drawn by the Ray driver (``ray.experimental.tqdm_ray``)."""
        if self.rank != 0:
            return tqdm(disable=True)
        from ray.experimental import tqdm_ray

        bar = tqdm_ray.tqdm(desc=desc, total=total, unit="step")
        bar.update(done)
        return bar

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if state is not None:
                torch.save(state, Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """The epoch loop in this process (``--backend local``): one worker, ``RUN_DIR/state.pt`` per epoch."""

    rank, world = 0, 1

    def __init__(self, run_dir: Path, device: torch.device) -> None:
        self.path = run_dir / STATE_FILE
        self.device = device
        self.metrics: dict[str, Any] = {}

    def restore(self) -> dict[str, Any] | None:
        return torch.load(self.path, map_location="cpu", weights_only=True) if self.path.is_file() else None

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def progress(self, desc: str, total: int, done: int) -> Any:
        return tqdm(desc=desc, total=total, initial=done, unit="step", dynamic_ncols=True)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.metrics = metrics
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))


def fit_teacher(config: dict[str, Any], session: RaySession | LocalSession) -> None:
    """Restore, train the remaining epochs, report metrics and (rank 0) a checkpoint per epoch."""
    from .data import ArrowFewShotDataset

    torch.set_num_threads(config.get("threads_per_worker", 1))
    rank, world = session.rank, session.world
    config = {**config, "world": world}
    dataset = ArrowFewShotDataset(config["dataset_path"])
    rows, targets, num_classes = train_rows(dataset)
    model = build_teacher(config, num_classes, dataset.shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9,
                                weight_decay=config["weight_decay"], nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    start = 0  # the first epoch of this attempt: > 0 when restored after a failure or --resume
    state = session.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["epoch"]) + 1
    model = session.prepare(model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.get("label_smoothing", 0.0))
    shard = lambda epoch: epoch_shard(len(rows), epoch, config["seed"], rank, world,  # noqa: E731
                                      config["batch_size"], config.get("max_steps"))
    steps = len(shard(0))
    bar = session.progress(f"pre-train {config['teacher']}", steps * config["epochs"], steps * start)
    for epoch in range(start, config["epochs"]):
        started = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(config["seed"] * 100_003 + epoch * 1009 + rank)
        loss_sum = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        for step, index in enumerate(shard(epoch)):
            _maybe_fail(config, epoch, step, rank)
            x = make_batch(dataset, rows[index], dataset.preprocess, generator, config["augment"]).to(session.device)
            y = torch.from_numpy(targets[index]).to(session.device)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += torch.tensor([float(loss.detach()) * len(y), float((logits.argmax(1) == y).sum()), len(y)],
                                     dtype=torch.float64)
            bar.update(1)
        scheduler.step()
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss_sum)
        metrics = {"epoch": epoch, "loss": float(loss_sum[0] / loss_sum[2]), "acc": float(loss_sum[1] / loss_sum[2]),
                   "lr": scheduler.get_last_lr()[0], "epoch_s": time.perf_counter() - started,
                   "num_classes": num_classes, "start_epoch": start}
        bar.set_description(f"pre-train {config['teacher']} (epoch {epoch + 1}: loss {metrics['loss']:.2f}, "
                            f"train acc {metrics['acc']:.2f})")
        state = None
        if rank == 0:
            state = {"model": plain_state_dict(model), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "teacher": config["teacher"],
                     "num_classes": num_classes}
        session.report(metrics, state)
    bar.close()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop."""
    fit_teacher(config, RaySession())
