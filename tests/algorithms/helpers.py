"""Tiny float64 models and random tasks for the maths tests."""
from __future__ import annotations

import torch

from tsmd_ray.algorithms import InnerSettings, MetaObjective, TaskBatch, make_kd_loss, parameters_of
from tsmd_ray.models import Conv4, ResNet12

WAYS, SHOTS, QUERY, SIZE = 3, 2, 3, 8


def tiny_pair(seed: int = 0, teacher_kind: str = "conv4"):
    torch.manual_seed(seed)
    if teacher_kind == "resnet12":
        teacher = ResNet12(WAYS, 1, SIZE, widths=(3, 4))
    else:
        teacher = Conv4(WAYS, 1, SIZE, widths=(4, 4))
    student = Conv4(WAYS, 1, SIZE, widths=(3, 3))
    return teacher.double(), student.double()


def random_tasks(n: int, seed: int = 1, views: int = 0) -> TaskBatch:
    """``n`` random tasks; ``views`` > 0 adds that many noisy copies of each support image as KD views."""
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(WAYS).repeat_interleave(k).repeat(n, 1)  # noqa: E731
    tasks = TaskBatch(torch.randn(n, WAYS * SHOTS, 1, SIZE, SIZE, generator=g, dtype=torch.float64), labels(SHOTS),
                      torch.randn(n, WAYS * QUERY, 1, SIZE, SIZE, generator=g, dtype=torch.float64), labels(QUERY))
    if views:
        copies = tasks.support_x.repeat(1, views, 1, 1, 1)
        tasks.support_views = copies + 0.3 * torch.randn(copies.shape, generator=g, dtype=torch.float64)
    return tasks


def objective(teacher, student, kd="kl", algorithm="maml", vmap_chunk=0, **settings) -> MetaObjective:
    base = dict(steps=2, alpha=0.3, lam=0.2, adapt_teacher=True, kd_weight=1.0)
    return MetaObjective(teacher, student, make_kd_loss(kd, temperature=2.0), InnerSettings(**{**base, **settings}),
                         algorithm, vmap_chunk)


def params(*modules):
    return [parameters_of(m) if m is not None else {} for m in modules]
