"""All-reduce aggregation (``--aggregation allreduce``): no driver in the meta-training loop.

``python -m tsmd_ray.train`` runs as a Ray Train ``TorchTrainer`` (Train V2). Every worker holds
psi, theta and both Adam states. Each meta-iteration a worker computes the outer-gradient sums of
its contiguous block of the iteration's tasks exactly as a :class:`~.actors.TaskActor` does, one
``torch.distributed.all_reduce`` adds the blocks (gloo on CPU, NCCL on GPU), and every worker
applies the same Adam step (Eq. 10), so the weights stay identical without being sent anywhere.
With the per-task loop the sums are float64 and exact, so the trajectory is bit-identical to the
driver mode's. Evaluation episodes are split over the workers the same way.

Rank 0 writes checkpoints, ``metrics.jsonl`` and the evaluation to ``--out`` and logs to MLflow;
it also reports each checkpoint to Ray Train (storage ``OUT/ray_train``). A worker that dies
restarts the whole worker group (``FailureConfig``), which resumes from that checkpoint; a NaN
loss is not retried (it would recur) but raised on the driver. Outputs and storage must be on a
file system every node sees.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import tracking
from ..checkpoint import load_checkpoint
from ..config import Config
from ..data import ArrowFewShotDataset
from ..engine import DataSpec, TaskWorker, Weights
from ..training import CHECKPOINT_NAME, NonFiniteLossError, Trainer
from .actors import NumpyWeights, block_gradient_sums
from .driver import MAX_RESTARTS, plan_workers, split_blocks

log = logging.getLogger(__name__)

NON_FINITE = "non_finite_error"  # the metric that carries a NonFiniteLossError to the driver


class AllReduceRunner:
    """The Runner of one Ray Train worker: its own block of tasks, then a sum over all workers."""

    def __init__(self, cfg: Config, dataset_path: str, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.worker = TaskWorker(cfg, ArrowFewShotDataset(dataset_path))
        nccl = torch.distributed.get_backend() == "nccl"
        self.comm_device = self.worker.device if nccl else torch.device("cpu")
        self.comm_s = 0.0  # time spent in collectives (for the scaling benchmark)

    def _block(self, task_ids: Sequence[int]) -> list[int]:
        return split_blocks(task_ids, self.world)[self.rank]

    def gradients(self, weights: Weights, task_ids: Sequence[int]) -> tuple[Weights, dict[str, float]]:
        """Sums over all of ``task_ids`` (every worker gets the same), computed for its block only."""
        grads, metrics = block_gradient_sums(self.worker, weights, self._block(task_ids))
        return self._all_reduce(grads, metrics)

    def _all_reduce(self, grads: NumpyWeights, metrics: dict[str, float]) -> tuple[Weights, dict[str, float]]:
        """One collective for every gradient sum and metric sum, in their (float64 or float32) precision."""
        arrays = [a for group in grads.values() for a in group.values()]
        dtype = torch.float64 if arrays[0].dtype == np.float64 else torch.float32
        flat = torch.cat([torch.from_numpy(np.ascontiguousarray(a)).reshape(-1).to(dtype) for a in arrays]
                         + [torch.tensor(list(metrics.values()), dtype=dtype)]).to(self.comm_device)
        started = time.perf_counter()
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        self.comm_s += time.perf_counter() - started
        totals: Weights = {}
        offset = 0
        for key, group in grads.items():
            totals[key] = {}
            for name, array in group.items():
                totals[key][name] = flat[offset:offset + array.size].reshape(array.shape).to(torch.float32)
                offset += array.size
        return totals, {name: float(v) for name, v in zip(metrics, flat[offset:].tolist())}

    def evaluate(self, weights: Weights, split: str, task_ids: Sequence[int]) -> dict[str, list[float]]:
        """Per-episode metrics of ``task_ids`` in order, each worker evaluating its block."""
        mine = self.worker.evaluate(weights, split, self._block(task_ids))
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, mine)
        merged: dict[str, list[float]] = {}
        for part in parts:  # rank order = block order = episode order
            for name, values in part.items():
                merged.setdefault(name, []).extend(values)
        return merged

    def close(self) -> None:
        pass


class _WorkerTrainer(Trainer):
    """A Trainer that also hands each checkpoint to Ray Train (the worker group restarts from it)."""

    def save(self, iteration: int) -> Path:
        path = super().save(iteration)
        report_to_ray_train({"iteration": iteration + 1}, [path] if self.primary else [])
        return path


def report_to_ray_train(metrics: dict[str, Any], files: Sequence[Path]) -> None:
    """``ray.train.report`` on every rank (a barrier); ``files`` (rank 0's) become the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        for file in files:
            shutil.copy2(file, Path(folder) / file.name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if files else None)


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function: resume if Ray Train has a checkpoint, fit, report the evaluation."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.from_dict(config["cfg"])
    torch.set_num_threads(cfg.threads_per_worker)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        cfg = Config.from_dict({**config["cfg"], "resume": True})  # also resumes the MLflow run
    dataset = ArrowFewShotDataset(config["dataset_path"])
    runner = AllReduceRunner(cfg, config["dataset_path"], rank, world)
    primary = rank == 0
    tracker = tracking.tracker(cfg, tracking_uri=config["tracking_uri"], dataset_path=config["dataset_path"],
                               source=config["source"]) if primary else tracking.NullTracker()
    try:
        with tracker:
            trainer = _WorkerTrainer(cfg, runner, DataSpec.of(dataset), dataset.meta, [tracker], primary=primary)
            if restored is not None:
                with restored.as_directory() as folder:
                    trainer.restore(load_checkpoint(Path(folder) / CHECKPOINT_NAME),
                                    f"Ray Train checkpoint {restored.path}")
            result = trainer.fit()
    except NonFiniteLossError as exc:  # every rank sees it, and a restarted group would again: no retry
        with tempfile.TemporaryDirectory() as folder:
            error = Path(folder) / "non_finite.txt"
            error.write_text(str(exc))
            report_to_ray_train({NON_FINITE: str(exc)}, [error] if primary else [])
        return
    # Ray Train keeps only the metrics of checkpointed reports: the final state with its evaluation
    final = [trainer.out / CHECKPOINT_NAME, trainer.out / "evaluation.json"] if primary else []
    report_to_ray_train({"evaluation": result, "allreduce_s": runner.comm_s}, final)


def run_allreduce(cfg: Config, dataset_path: str) -> dict[str, Any]:
    """Meta-train and meta-test on Ray Train workers; returns the evaluation (as ``Trainer.fit``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init()
    try:
        plan = plan_workers(cfg, ray.cluster_resources())
        resources = {"CPU": plan.cpus_per_worker, **({"GPU": plan.gpus_per_worker} if plan.gpus_per_worker else {})}
        out = Path(cfg.out).resolve()
        log.info("all-reduce aggregation: %s, Ray Train storage %s", plan.describe(), out / "ray_train")
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.to_dict(), "dataset_path": dataset_path,
                               "tracking_uri": tracking.resolve_tracking_uri() if cfg.mlflow else None,
                               "source": tracking.source_tags() if cfg.mlflow else None},
            scaling_config=ray.train.ScalingConfig(num_workers=plan.workers, use_gpu=plan.gpus_per_worker > 0,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=f"meta-train-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(out / "ray_train"),
                failure_config=ray.train.FailureConfig(max_failures=MAX_RESTARTS),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise RuntimeError(f"all-reduce meta-training failed after {MAX_RESTARTS} restart(s): {exc}") from exc
        if NON_FINITE in result.metrics:
            raise NonFiniteLossError(result.metrics[NON_FINITE])
        return result.metrics["evaluation"]
    finally:
        if owns_ray:
            ray.shutdown()
