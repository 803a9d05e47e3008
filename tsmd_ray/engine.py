"""The meta-learner: models built from a Config, the outer update (Eq. 10) and a task worker.

``MetaLearner`` owns psi, theta and their Adam optimizers (rates beta and eta).
``TaskWorker`` turns task ids into outer-gradient sums with the same models; it runs in the
training process (``backend=local``) or inside a Ray actor, and never updates weights itself.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .algorithms import InnerSettings, MetaObjective, TaskBatch, make_kd_loss, parameters_of
from .config import Config
from .data import ArrowFewShotDataset, EpisodeSampler
from .models import build_model, load_state_dict, use_fused_batchnorm

log = logging.getLogger(__name__)

Weights = dict[str, dict[str, Tensor]]  # {"psi": ..., "theta": ...}, CPU tensors


@dataclass(frozen=True)
class DataSpec:
    """What the models need to know about the images."""

    in_channels: int
    image_size: int

    @classmethod
    def of(cls, dataset: ArrowFewShotDataset) -> "DataSpec":
        height, width, channels = dataset.shape
        return cls(in_channels=channels, image_size=height)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_models(cfg: Config, spec: DataSpec) -> tuple[nn.Module | None, nn.Module | None]:
    """Teacher f_psi and student g_theta of ``cfg.method`` (``None`` where the method has none)."""
    torch.manual_seed(cfg.seed)
    teacher = student = None
    if cfg.has_teacher:
        teacher = build_model(cfg.teacher, cfg.ways, spec.in_channels, spec.image_size,
                              widths=cfg.teacher_widths, weights=cfg.teacher_weights,
                              adaptable=cfg.adapts_teacher)
        if cfg.teacher_init:
            load_teacher_init(teacher, cfg.teacher_init)
        if not cfg.adapts_teacher:
            teacher.eval().requires_grad_(False)
    if cfg.has_student:
        student = build_model(cfg.student, cfg.ways, spec.in_channels, spec.image_size,
                              widths=cfg.student_widths)
    return teacher, student


def load_teacher_init(teacher: nn.Module, path: str) -> None:
    """Initialise psi from a pretrained classifier, keeping our N-way head."""
    state = load_state_dict(path)
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    own = teacher.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith("head.")}
    if not usable:
        raise ValueError(f"teacher init {path} shares no weights with teacher {type(teacher).__name__}")
    teacher.load_state_dict(usable, strict=False)
    log.info("teacher initialised from %s (%d of %d tensors)", path, len(usable), len(own))


def build_objective(cfg: Config, teacher: nn.Module | None, student: nn.Module | None,
                    device: torch.device) -> MetaObjective:
    settings = InnerSettings(steps=cfg.inner_steps, alpha=cfg.alpha, lam=cfg.lam,
                             adapt_teacher=cfg.adapts_teacher,
                             first_order_teacher=cfg.first_order_teacher,
                             first_order_student=cfg.first_order_student,
                             kd_weight=cfg.kd_weight if cfg.method in ("tsmd", "fixed-teacher") or cfg.kd_views
                             else 0.0,  # a student's views take the labels
                             learn_to_teach=cfg.learn_to_teach, query_statistics=cfg.batch_norm)
    kd_loss = make_kd_loss(cfg.resolved_kd_loss, temperature=cfg.kd_temperature,
                           distance_weight=cfg.rkd_distance_weight, angle_weight=cfg.rkd_angle_weight)
    use_vmap = cfg.task_batching == "vmap" or (cfg.task_batching == "auto" and device.type == "cuda")
    chunk = (cfg.vmap_chunk or cfg.meta_batch) if use_vmap else 0
    for model in (teacher, student):
        if model is not None:  # the fused kernel is exact per task and wrong under vmap
            use_fused_batchnorm(model, not use_vmap)
    return MetaObjective(teacher, student, kd_loss, settings, cfg.meta_algorithm, chunk)


def configure_precision(cfg: Config) -> torch.dtype:
    """TF32 off unless asked for: it shifts second-order meta-gradients by tens of percent."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    return getattr(torch, cfg.dtype)


class TaskWorker:
    """Samples tasks by id and computes outer-gradient sums and evaluation metrics."""

    def __init__(self, cfg: Config, dataset: ArrowFewShotDataset) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = configure_precision(cfg)
        teacher, student = build_models(cfg, DataSpec.of(dataset))
        self.teacher = teacher.to(self.device, self.dtype) if teacher is not None else None
        self.student = student.to(self.device, self.dtype) if student is not None else None
        self.objective = build_objective(cfg, self.teacher, self.student, self.device)
        self.samplers = {
            split: EpisodeSampler(dataset, split, cfg.ways, cfg.shots, cfg.query, cfg.seed,
                                  augment=cfg.augment and split == "train", views=cfg.kd_views)
            for split in ("train", "val", "test") if dataset.split_labels(split).size
        }

    def _tasks(self, split: str, task_ids: Sequence[int]) -> TaskBatch:
        if split not in self.samplers:
            raise ValueError(f"dataset has no {split!r} split")
        return TaskBatch(*self.samplers[split].sample_batch(list(task_ids))).to(self.device, self.dtype)

    def load_weights(self, weights: Weights) -> None:
        for module, key in ((self.teacher, "psi"), (self.student, "theta")):
            if module is not None:
                with torch.no_grad():
                    for name, p in module.named_parameters():
                        p.copy_(weights[key][name])

    def _params(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        psi = parameters_of(self.teacher) if self.teacher is not None else {}
        theta = parameters_of(self.student) if self.student is not None else {}
        return psi, theta

    def gradients(self, weights: Weights, task_ids: Sequence[int]) -> tuple[Weights, dict[str, float]]:
        """Outer-gradient sums ``{"psi": .., "theta": ..}`` (CPU float32) and metric sums."""
        self.load_weights(weights)
        grads_psi, grads_theta, metrics = self.objective.gradient_sums(*self._params(), self._tasks("train", task_ids))
        return {"psi": _to_cpu(grads_psi), "theta": _to_cpu(grads_theta)}, metrics

    def evaluate(self, weights: Weights, split: str, task_ids: Sequence[int]) -> dict[str, list[float]]:
        """Per-episode query accuracy and loss after adaptation (``eval_inner_steps`` steps)."""
        self.load_weights(weights)
        results: dict[str, list[float]] = {}
        ids = list(task_ids)
        for start in range(0, len(ids), self.cfg.meta_batch):
            tasks = self._tasks(split, ids[start:start + self.cfg.meta_batch])
            for name, values in self.objective.evaluate(*self._params(), tasks, self.cfg.test_inner_steps).items():
                results.setdefault(name, []).extend(values.cpu().tolist())
        return results


def _to_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu", torch.float32) for name, t in tensors.items()}


class MetaLearner:
    """psi and theta with their outer optimizers: Adam at rate beta (psi) and eta (theta)."""

    def __init__(self, cfg: Config, spec: DataSpec) -> None:
        self.cfg = cfg
        self.teacher, self.student = build_models(cfg, spec)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if self.teacher is not None and cfg.adapts_teacher:
            self.optimizers["psi"] = torch.optim.Adam(self.teacher.parameters(), lr=cfg.beta)
        if self.student is not None:
            self.optimizers["theta"] = torch.optim.Adam(self.student.parameters(), lr=cfg.eta)

    def modules(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("psi", self.teacher), ("theta", self.student)) if m is not None}

    def weights(self) -> Weights:
        """Current psi and theta as CPU float32 tensors (what workers receive)."""
        return {key: _to_cpu(dict(m.named_parameters())) for key, m in self.modules().items()}

    def outer_step(self, grad_sums: Weights, n_tasks: int) -> None:
        # Eq. 10: psi <- psi - beta * grad L_T(psi'), theta <- theta - eta * grad L_S(theta'),
        # with the task sum replaced by the mean and SGD by Adam as in the paper's experiments.
        for key, optimizer in self.optimizers.items():
            for name, p in self.modules()[key].named_parameters():
                p.grad = (grad_sums[key][name] / n_tasks).to(p.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {key: m.state_dict() for key, m in self.modules().items()}
        state["optimizers"] = {key: opt.state_dict() for key, opt in self.optimizers.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, module in self.modules().items():
            module.load_state_dict(state[key])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
