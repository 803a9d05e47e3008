"""Meta-gradients over a batch of tasks (Eq. 10), per task or batched with ``torch.func.vmap``.

MAML: the outer gradient of the summed query losses (Eq. 10a for psi, 10b for theta).
Reptile: the summed displacement ``w - w'_i`` of each model (Nichol et al. 2018).
Both return *sums* over tasks so that partial results from several workers add up.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor, nn

from .functional import Params, detached
from .kd import KDLoss
from .tsmd import InnerSettings, run_task


@dataclass
class TaskBatch:
    """Episodes stacked over a leading task dimension; ``support_views`` (optional) are augmented
    views of the support images for the student's L_KD (see :func:`run_task`)."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    support_views: Tensor | None = None

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        """The task tensors in ``run_task``'s argument order (``support_views`` only if present)."""
        views = () if self.support_views is None else (self.support_views,)
        return (self.support_x, self.support_y, self.query_x, self.query_y, *views)

    def chunks(self, size: int) -> Iterator["TaskBatch"]:
        for start in range(0, len(self), size):
            yield TaskBatch(*(t[start:start + size] for t in self.tensors()))

    def to(self, device: torch.device, dtype: torch.dtype) -> "TaskBatch":
        views = None if self.support_views is None else self.support_views.to(device, dtype)
        return TaskBatch(self.support_x.to(device, dtype), self.support_y.to(device),
                         self.query_x.to(device, dtype), self.query_y.to(device), views)


@dataclass
class MetaObjective:
    """The meta-learning objective of one method over functional weights (psi, theta).

    ``teacher``/``student`` are ``None`` for methods without them. ``vmap_chunk`` > 0 batches
    that many tasks per ``vmap`` call; 0 runs tasks one by one (the per-task loop).
    """

    teacher: nn.Module | None
    student: nn.Module | None
    kd_loss: KDLoss
    settings: InnerSettings
    algorithm: str = "maml"
    vmap_chunk: int = 0

    def _task_results(self, psi: Params, theta: Params, tasks: TaskBatch, settings: InnerSettings):
        """Yield ``(metrics, psi', theta')`` per task or per vmap chunk, with a leading task dimension."""
        def one(s, *task):
            return run_task(self.teacher, self.student, self.kd_loss, s, psi, theta, *task)

        if self.vmap_chunk > 0:
            batched = torch.func.vmap(partial(one, replace(settings, vectorized=True)))
            for chunk in tasks.chunks(self.vmap_chunk):
                yield batched(*chunk.tensors())
        else:
            for i in range(len(tasks)):
                yield _with_task_dim(one(settings, *(t[i] for t in tasks.tensors())))

    def gradient_sums(self, psi: Params, theta: Params, tasks: TaskBatch
                      ) -> tuple[Params, Params, dict[str, float]]:
        """Outer-gradient sums for psi and theta and metric sums over ``tasks``.

        Only weights with ``requires_grad`` get gradients (a fixed teacher gets none).
        """
        psi_leaves = {k: v for k, v in psi.items() if v.requires_grad}
        theta_leaves = {k: v for k, v in theta.items() if v.requires_grad}
        grads_psi = {k: torch.zeros_like(v) for k, v in psi_leaves.items()}
        grads_theta = {k: torch.zeros_like(v) for k, v in theta_leaves.items()}
        metric_sums: dict[str, float] = {}
        settings = self.settings
        if self.algorithm == "reptile":  # only the adapted values matter: no graph through the inner loop
            psi, theta = detached(psi), detached(theta)
            settings = replace(settings, first_order_teacher=True, first_order_student=True)
        for result in self._task_results(psi, theta, tasks, settings):
            metrics, psi_task, theta_task = result
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + float(value.detach().sum())
            if self.algorithm == "reptile":
                _add_displacement(grads_psi, psi, psi_task)
                _add_displacement(grads_theta, theta, theta_task)
            else:
                _add_query_gradients(grads_psi, grads_theta, psi_leaves, theta_leaves, metrics)
            del result, metrics, psi_task, theta_task  # free this task's graph before the next one
        return grads_psi, grads_theta, metric_sums

    def evaluate(self, psi: Params, theta: Params, tasks: TaskBatch, steps: int) -> dict[str, Tensor]:
        """Per-task query metrics after first-order adaptation with ``steps`` inner steps."""
        settings = replace(self.settings, steps=steps, first_order_teacher=True, first_order_student=True)
        psi, theta = detached(psi), detached(theta)
        per_chunk = [{name: value.detach() for name, value in metrics.items()}
                     for metrics, _, _ in self._task_results(psi, theta, tasks, settings)]
        return {name: torch.cat([m[name] for m in per_chunk]) for name in per_chunk[0]}


def _with_task_dim(result: tuple[dict[str, Tensor], Params, Params]):
    return tuple({k: v.unsqueeze(0) for k, v in part.items()} for part in result)


def _add_query_gradients(grads_psi: Params, grads_theta: Params, psi: Params, theta: Params,
                         metrics: dict[str, Tensor]) -> None:
    """Eq. 10: d/d(psi, theta) of the summed query losses, accumulated into the grad sums."""
    loss = sum(metrics[k].sum() for k in ("teacher/loss", "student/loss") if k in metrics)
    leaves = list(psi.values()) + list(theta.values())
    if not leaves:
        return
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    for (name, acc), g in zip(list(grads_psi.items()) + list(grads_theta.items()), grads):
        if g is not None:
            acc.add_(g)


def _add_displacement(acc: Params, initial: Params, adapted: Params) -> None:
    """Reptile: add sum_i (w - w'_i) for the weights that are trained."""
    for name in acc:
        acc[name].add_((initial[name].unsqueeze(0) - adapted[name]).sum(0))
