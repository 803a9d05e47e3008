"""The Ray worker actor: one :class:`~tsmd_ray.engine.TaskWorker` per actor.

An actor memory-maps the prepared Arrow dataset itself and samples its tasks by id, so images
never pass through the driver; it receives the current weights (numpy arrays, resolved from the
object store, zero-copy on the same node) and returns outer-gradient *sums* over its tasks as CPU
numpy arrays plus metric sums. It never updates weights, so a call can be retried on a
restarted actor and gives the same answer (this is what makes fault tolerance exact).

Summation and the number of workers. When the engine runs tasks one by one (``task_batching``
``loop``, the CPU default), the actor computes each task's gradient on its own (float32, bitwise
reproducible for a fixed thread count) and accumulates them in **float64**; the driver adds the
actors' float64 partial sums and rounds once to float32. A float64 sum of B float32 values, in
any grouping, is exact unless one element's values span more than 2**(29 - log2 B) in magnitude
(2**26 for B = 8), and even then the float64 rounding error (2**-53 relative) changes the float32
result only if the sum lies that close to a float32 rounding boundary; so the gradient sums, and
the whole trajectory, are bit-identical for any number of workers. A float32 sum would differ in
the last bit, and Adam turns the rounding noise of parameters whose gradient is analytically zero
(a conv bias right before batch norm) into steps of size ~lr whose sign depends on the summation
order. With ``vmap`` (the GPU default) kernels depend on the batch shape
anyway, so the actor returns its float32 block sum (half the bytes) and runs agree to float32
rounding.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..data import ArrowFewShotDataset
from ..engine import TaskWorker, Weights

NumpyWeights = dict[str, dict[str, np.ndarray]]


def to_numpy(weights: Weights) -> NumpyWeights:
    """``{"psi": {name: tensor}}`` -> the same nesting of float32 numpy arrays (no copy on CPU)."""
    return {key: {name: t.detach().to("cpu", torch.float32).numpy() for name, t in group.items()}
            for key, group in weights.items()}


def to_torch(weights: NumpyWeights) -> Weights:
    """Numpy arrays -> CPU tensors sharing their memory.

    Arrays read from the object store are read-only; the tensors made from them are only read
    (copied into the models' parameters), so torch's warning about non-writable arrays is muted.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: {name: torch.from_numpy(a) for name, a in group.items()}
                for key, group in weights.items()}


def block_gradient_sums(worker: TaskWorker, weights: Weights, task_ids: Sequence[int]
                        ) -> tuple[NumpyWeights, dict[str, float]]:
    """Outer-gradient sums over a block of tasks as CPU numpy arrays, and metric sums.

    With the per-task loop the tasks are computed one by one and summed in float64 (exact, so
    the grouping into blocks does not matter); with ``vmap`` the block is one batch and the sum
    stays float32.
    """
    if worker.objective.vmap_chunk:
        grads, metrics = worker.gradients(weights, list(task_ids))
        return to_numpy(grads), metrics
    sums: NumpyWeights = {}
    metrics: dict[str, float] = {}
    for task_id in task_ids:
        grads, task_metrics = worker.gradients(weights, [task_id])
        for key, group in grads.items():
            acc = sums.setdefault(key, {})
            for name, g in group.items():
                g64 = g.numpy().astype(np.float64)
                if name in acc:
                    acc[name] += g64
                else:
                    acc[name] = g64
        for name, value in task_metrics.items():
            metrics[name] = metrics.get(name, 0.0) + value
    return sums, metrics


class TaskActor:
    """Wraps a ``TaskWorker``; made remote by the driver with its resources and restart policy."""

    def __init__(self, cfg: dict[str, Any], dataset_path: str) -> None:
        self.cfg = Config.from_dict(cfg)
        torch.set_num_threads(self.cfg.threads_per_worker)
        self.worker = TaskWorker(self.cfg, ArrowFewShotDataset(dataset_path))

    def gradients(self, weights: NumpyWeights, task_ids: Sequence[int]
                  ) -> tuple[NumpyWeights, dict[str, float]]:
        """Summed outer gradients over ``task_ids`` and metric sums (see :func:`block_gradient_sums`)."""
        return block_gradient_sums(self.worker, to_torch(weights), task_ids)

    def evaluate(self, weights: NumpyWeights, split: str, task_ids: Sequence[int]) -> dict[str, list[float]]:
        """Per-episode metrics of ``task_ids`` in order."""
        return self.worker.evaluate(to_torch(weights), split, list(task_ids))

    def info(self) -> dict[str, Any]:
        """Where and how this actor runs (for logs and tests)."""
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "threads": torch.get_num_threads(),
                "device": str(self.worker.device), "gpu_ids": ray.get_gpu_ids()}
