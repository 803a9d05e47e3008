"""Task-specific meta distillation for one task: Eq. 6, 7 and 8 of Wu et al. (WACV 2023).

``run_task`` is a pure function of the initial weights (psi, theta) and one episode, so the
same code runs per task in a loop or batched over tasks with ``torch.func.vmap``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ..models import statistics_from_first
from .functional import Outputs, Params, accuracy, cross_entropy, forward
from .kd import KDLoss
from .maml import inner_loop


@dataclass(frozen=True)
class InnerSettings:
    """Everything the inner loop needs besides weights and data."""

    steps: int
    alpha: float  # teacher inner rate, Eq. 6
    lam: float  # student inner rate, Eq. 7
    adapt_teacher: bool  # False for a fixed teacher (Eq. 6 omitted)
    first_order_teacher: bool = False
    first_order_student: bool = False
    kd_weight: float = 1.0
    learn_to_teach: bool = False  # beyond the paper: let L_S(theta') reach psi through L_KD
    vectorized: bool = False  # run_task is called under torch.func.vmap
    query_statistics: str = "support"  # batch-norm statistics for the query: support | transductive


def adapt_teacher(teacher: nn.Module, psi: Params, x: Tensor, y: Tensor, s: InnerSettings) -> Params:
    # Eq. 6: psi'_i = psi - alpha * grad_psi L_T(psi; D_tr)
    return inner_loop(lambda p: cross_entropy(teacher, p, x, y), psi, s.steps, s.alpha,
                      s.first_order_teacher, s.vectorized)


def kd_outputs(model: nn.Module, params: Params, x: Tensor, views: Tensor | None) -> Outputs:
    """Outputs on the KD rows: the support set ``x``, then its ``views`` (if any) normalised with the
    support set's batch-norm statistics, so the support rows are unchanged by the views."""
    if views is None:
        return forward(model, params, x)
    with statistics_from_first(x.shape[0]):
        return forward(model, params, torch.cat([x, views]))


def student_inner_terms(student: nn.Module, theta: Params, x: Tensor, y: Tensor, teacher_kd: Outputs | None,
                        kd_loss: KDLoss, views: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The two terms of Eq. 7's inner loss at ``theta``: L_S(theta; D_tr) and the unweighted L_KD, which
    with ``views`` (beyond the paper) runs over D_tr and the views, whose targets ``teacher_kd`` holds too.
    Without a teacher the views take their images' labels (a control: what L_KD at T = 1 would be
    against a one-hot teacher)."""
    out = kd_outputs(student, theta, x, views)
    ce = F.cross_entropy(out.logits[: y.shape[0]], y)
    if teacher_kd is None:
        return ce, F.cross_entropy(out.logits, y.repeat(out.logits.shape[0] // y.shape[0]))
    return ce, kd_loss(out, teacher_kd)


def adapt_student(student: nn.Module, theta: Params, x: Tensor, y: Tensor, teacher_kd: Outputs | None,
                  kd_loss: KDLoss, s: InnerSettings, views: Tensor | None = None) -> Params:
    # Eq. 7: theta'_i = theta - lam * grad_theta [L_S(theta; D_tr) + L_KD(psi'_i, theta; D_tr)]
    def loss(p: Params) -> Tensor:
        if teacher_kd is None and (views is None or not s.kd_weight):
            return cross_entropy(student, p, x, y)
        ce, kd = student_inner_terms(student, p, x, y, teacher_kd, kd_loss, views)
        return ce + s.kd_weight * kd

    return inner_loop(loss, theta, s.steps, s.lam, s.first_order_student, s.vectorized)


def query_logits(model: nn.Module, params: Params, support_x: Tensor, query_x: Tensor,
                 statistics: str = "support") -> Tensor:
    """Logits of the query images under adapted weights ``params`` (Eq. 8).

    ``support``: batch norm uses the statistics of the support set under ``params``, exactly as
    the deployed model does (each query image is classified on its own). ``transductive``: the
    query batch's own statistics, as in MAML's reference code (the paper rejects that setting).
    """
    if statistics == "transductive":
        return functional_call(model, params, (query_x,))
    rows = support_x.shape[0]
    with statistics_from_first(rows):
        return functional_call(model, params, (torch.cat([support_x, query_x]),))[rows:]


def run_task(teacher: nn.Module | None, student: nn.Module | None, kd_loss: KDLoss,
             s: InnerSettings, psi: Params, theta: Params, support_x: Tensor, support_y: Tensor,
             query_x: Tensor, query_y: Tensor, support_views: Tensor | None = None
             ) -> tuple[dict[str, Tensor], Params, Params]:
    """Adapt teacher then student on the support set and score both on the query set (Eq. 8).

    ``support_views`` (beyond the paper): augmented views of the support images that the adapted
    teacher labels for the student's L_KD (ignored without KD); without a teacher, their labels. Returns query metrics
    (``teacher/loss``, ``teacher/acc``, ``student/loss``, ``student/acc`` for the models present;
    none for a fixed teacher, whose N-way head is never trained) and the adapted weights (psi'_i, theta'_i).
    """
    metrics: dict[str, Tensor] = {}
    psi_task, theta_task = psi, theta
    teacher_kd = None
    if teacher is not None:
        if s.adapt_teacher:
            psi_task = adapt_teacher(teacher, psi, support_x, support_y, s)
            logits = query_logits(teacher, psi_task, support_x, query_x, s.query_statistics)
            metrics["teacher/loss"] = F.cross_entropy(logits, query_y)  # Eq. 8a
            metrics["teacher/acc"] = accuracy(logits.detach(), query_y)
        if student is not None and s.kd_weight > 0:
            teacher_kd = kd_outputs(teacher, psi_task, support_x, support_views)
            if not s.learn_to_teach:  # Eq. 10a: psi is trained by the teacher's query loss alone
                teacher_kd = Outputs(*(t.detach() for t in teacher_kd))
    if student is not None:
        theta_task = adapt_student(student, theta, support_x, support_y, teacher_kd, kd_loss, s, support_views)
        logits = query_logits(student, theta_task, support_x, query_x, s.query_statistics)
        metrics["student/loss"] = F.cross_entropy(logits, query_y)  # Eq. 8b
        metrics["student/acc"] = accuracy(logits.detach(), query_y)
    return metrics, psi_task, theta_task
