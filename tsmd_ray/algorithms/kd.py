"""Knowledge-distillation losses L_KD(psi', theta) of Eq. 7, in a small registry.

Every loss takes the student's and the teacher's :class:`Outputs` on the support set.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

from .functional import Outputs

KDLoss = Callable[[Outputs, Outputs], Tensor]


def hinton_kl(student: Outputs, teacher: Outputs, temperature: float = 4.0) -> Tensor:
    """KL(teacher || student) of temperature-softened logits, times T^2 (Hinton et al. 2015)."""
    log_p_student = F.log_softmax(student.logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
    return kl * temperature ** 2


EPS = 1e-12  # floor of squared distances and of the mean distance (Park et al. clamp likewise)


def _pairwise(e: Tensor) -> tuple[Tensor, Tensor]:
    """Differences ``e_j - e_i`` and their norms. Squared norms are clamped below at ``EPS`` before the
    square root, so coinciding embeddings (duplicate images, dead ReLUs) and the zero diagonal give
    finite first and second derivatives where a plain norm gives NaN."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    return diff, diff.pow(2).sum(-1).clamp_min(EPS).sqrt()


def _normalised_distances(e: Tensor) -> Tensor:
    _, norm = _pairwise(e)
    n = e.shape[0]
    dist = norm * (1.0 - torch.eye(n, dtype=e.dtype, device=e.device))
    return dist / (dist.sum() / (n * n - n)).clamp_min(EPS)


def _angles(e: Tensor) -> Tensor:
    diff, norm = _pairwise(e)
    unit = diff / norm.unsqueeze(-1)  # 0 where two embeddings coincide
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def relational_kd(student: Outputs, teacher: Outputs, distance_weight: float = 25.0,
                  angle_weight: float = 50.0) -> Tensor:
    """RKD distance + angle losses on embeddings (Park et al. 2019); the dimensions may differ."""
    s, t = student.embedding, teacher.embedding
    loss = distance_weight * F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))
    return loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))


KD_LOSSES: dict[str, Callable[..., Tensor]] = {"kl": hinton_kl, "rkd": relational_kd}


def make_kd_loss(name: str, **settings: float) -> KDLoss:
    """The registered loss ``name`` with those ``settings`` it accepts bound."""
    if name not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; registered: {', '.join(KD_LOSSES)}")
    fn = KD_LOSSES[name]
    accepted = inspect.signature(fn).parameters
    return partial(fn, **{k: v for k, v in settings.items() if k in accepted})
