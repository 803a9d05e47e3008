"""The outer steps that benchmarks/throughput.py times: one configuration (``Spec``), its models and
synthetic meta-batches, and three implementations of the same outer step (Eq. 10, then Adam): the
engine's ``MetaObjective`` on its vmap or loop path, and a learn2learn-style per-task loop.

Needs only torch, tsmd_ray.models/algorithms and (for the third path) learn2learn; no Ray.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tsmd_ray.algorithms import InnerSettings, MetaObjective, TaskBatch, make_kd_loss, parameters_of  # noqa: E402
from tsmd_ray.models import use_fused_batchnorm  # noqa: E402
from tsmd_ray.models import TaskBatchNorm2d, build_model, statistics_from_first  # noqa: E402

try:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import learn2learn as l2l
except Exception as exc:  # noqa: BLE001 - any import failure just skips the third path
    l2l = None
    L2L_ERROR = f"{type(exc).__name__}: {exc}"
else:
    L2L_ERROR = ""


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration (issue 2, section Performance)."""

    name: str
    method: str  # student | tsmd
    in_channels: int
    image_size: int
    student_widths: tuple[int, ...]
    teacher: str | None = None
    teacher_widths: tuple[int, ...] | None = None
    ways: int = 5
    shots: int = 1
    query: int = 15
    steps: int = 5
    meta_batch: int = 16
    alpha: float = 0.1  # engine defaults (tsmd_ray.config)
    lam: float = 0.1
    kd_weight: float = 1.0
    temperature: float = 4.0
    first_order_teacher: bool = False
    query_statistics: str = "support"  # query batch norm (Eq. 8): support (engine default) | transductive
    gpu_target: float = 1.0  # engine default path / l2l loop, on a GPU


CONFIGS = {
    "a": Spec("a: student MAML, Conv-4(64), 1x28x28, 5w1s15q, k=5, mb=16, 2nd order",
              "student", 1, 28, (64, 64, 64, 64), meta_batch=16, gpu_target=7.0),
    "b": Spec("b: tsmd, ResNet-12(64-128-256-512) + Conv-4(32), 3x32x32, 5w1s15q, k=5, mb=4, KL",
              "tsmd", 3, 32, (32, 32, 32, 32), teacher="resnet12", teacher_widths=(64, 128, 256, 512),
              meta_batch=4, gpu_target=2.5),
}
PATHS = ("engine_vmap", "engine_loop", "l2l_loop")
# --native-bn adds the loop paths on models with nn.BatchNorm2d: what learn2learn users with a
# stock model get, and a prototype of the engine's loop path using the fused kernel. nn.BatchNorm2d
# cannot take the query's statistics from the support set, so these paths need transductive ones.
NATIVE_BN_PATHS = ("engine_loop_native_bn", "l2l_loop_native_bn")


def build_models(spec: Spec, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    teacher = None
    if spec.teacher is not None:
        teacher = build_model(spec.teacher, spec.ways, spec.in_channels, spec.image_size,
                              widths=spec.teacher_widths).to(device, dtype)
    student = build_model("conv4", spec.ways, spec.in_channels, spec.image_size,
                          widths=spec.student_widths).to(device, dtype)
    return teacher, student


def synthetic_batches(spec: Spec, device: torch.device, dtype: torch.dtype, count: int = 2) -> list[TaskBatch]:
    gen = torch.Generator().manual_seed(1)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    labels = lambda per: torch.arange(spec.ways).repeat_interleave(per).repeat(spec.meta_batch, 1)  # noqa: E731
    batches = []
    for _ in range(count):
        sx = torch.randn(spec.meta_batch, spec.ways * spec.shots, *shape, generator=gen)
        qx = torch.randn(spec.meta_batch, spec.ways * spec.query, *shape, generator=gen)
        batches.append(TaskBatch(sx, labels(spec.shots), qx, labels(spec.query)).to(device, dtype))
    return batches


class EnginePath:
    """``MetaObjective.gradient_sums`` then ``MetaLearner.outer_step`` (Adam on the mean)."""

    def __init__(self, spec: Spec, teacher, student, vmap: bool) -> None:
        self.teacher = copy.deepcopy(teacher)
        self.student = copy.deepcopy(student)
        for model in (self.teacher, self.student):  # as build_objective: fused batch norm per task
            if model is not None:
                use_fused_batchnorm(model, not vmap)
        # as tsmd_ray.engine.build_objective with task_batching=auto, vmap_chunk=0
        settings = InnerSettings(steps=spec.steps, alpha=spec.alpha, lam=spec.lam,
                                 adapt_teacher=spec.method == "tsmd",
                                 first_order_teacher=spec.first_order_teacher,
                                 kd_weight=spec.kd_weight if spec.method == "tsmd" else 0.0,
                                 query_statistics=spec.query_statistics)
        kd = make_kd_loss("kl", temperature=spec.temperature)
        self.objective = MetaObjective(self.teacher, self.student, kd, settings, "maml",
                                       spec.meta_batch if vmap else 0)
        self.optimizers = {"theta": (self.student, torch.optim.Adam(self.student.parameters(), lr=1e-3))}
        if self.teacher is not None:
            self.optimizers["psi"] = (self.teacher, torch.optim.Adam(self.teacher.parameters(), lr=1e-3))

    def gradients(self, tasks: TaskBatch) -> dict[str, dict[str, torch.Tensor]]:
        psi = parameters_of(self.teacher) if self.teacher is not None else {}
        grads_psi, grads_theta, _ = self.objective.gradient_sums(psi, parameters_of(self.student), tasks)
        return {"psi": grads_psi, "theta": grads_theta}

    def step(self, tasks: TaskBatch, grads=None) -> None:
        grads = grads if grads is not None else self.gradients(tasks)
        for key, (module, optimizer) in self.optimizers.items():
            for name, p in module.named_parameters():
                p.grad = (grads[key][name] / len(tasks)).to(p.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


class Learn2LearnPath:
    """Per-task ``clone()`` + ``adapt()`` + ``backward()``, as learn2learn's MAML examples do."""

    def __init__(self, spec: Spec, teacher, student) -> None:
        self.spec = spec
        self.student = l2l.algorithms.MAML(copy.deepcopy(student), lr=spec.lam, first_order=False)
        self.teacher = None
        self.optimizers = [torch.optim.Adam(self.student.parameters(), lr=1e-3)]
        if teacher is not None:
            self.teacher = l2l.algorithms.MAML(copy.deepcopy(teacher), lr=spec.alpha,
                                               first_order=spec.first_order_teacher)
            self.optimizers.append(torch.optim.Adam(self.teacher.parameters(), lr=1e-3))

    def _query_logits(self, learner, sx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        """The query under the spec's batch-norm statistics, as ``tsmd_ray.algorithms.query_logits``
        (written out here: what a learn2learn user would write with these models)."""
        if self.spec.query_statistics == "transductive":
            return learner(qx)
        with statistics_from_first(len(sx)):
            return learner(torch.cat([sx, qx]))[len(sx):]

    def _accumulate(self, tasks: TaskBatch) -> float:
        s, T = self.spec, self.spec.temperature
        for opt in self.optimizers:
            opt.zero_grad()
        error = 0.0
        for i in range(len(tasks)):
            sx, sy, qx, qy = tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i]
            loss = 0.0
            teacher_logits = None
            if self.teacher is not None:
                teacher = self.teacher.clone()
                for _ in range(s.steps):
                    teacher.adapt(F.cross_entropy(teacher(sx), sy))
                loss = F.cross_entropy(self._query_logits(teacher, sx, qx), qy)
                teacher_logits = teacher(sx).detach()
            student = self.student.clone()
            for _ in range(s.steps):
                logits = student(sx)
                inner = F.cross_entropy(logits, sy)
                if teacher_logits is not None:
                    inner = inner + s.kd_weight * T * T * F.kl_div(
                        F.log_softmax(logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                        reduction="batchmean")
                student.adapt(inner)
            loss = loss + F.cross_entropy(self._query_logits(student, sx, qx), qy)
            loss.backward()
            error += loss.item()
        return error

    def gradients(self, tasks: TaskBatch) -> dict[str, dict[str, torch.Tensor]]:
        """Summed outer gradients (for the agreement check), left in ``.grad``."""
        self._accumulate(tasks)
        grads = {"theta": {n: p.grad.clone() for n, p in self.student.module.named_parameters()}}
        if self.teacher is not None:
            grads["psi"] = {n: p.grad.clone() for n, p in self.teacher.module.named_parameters()}
        return grads

    def step(self, tasks: TaskBatch, grads=None) -> None:
        if grads is None:
            self._accumulate(tasks)
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad.mul_(1.0 / len(tasks))
            opt.step()


def native_batchnorm(module):
    """A copy of ``module`` with each ``TaskBatchNorm2d`` swapped for ``nn.BatchNorm2d`` without
    running statistics: the same maths (batch statistics) with the fused kernel. Right in a
    per-task loop (float64 second-order meta-gradients agree with the primitive-op layer to
    ~1e-13 here), wrong under ``vmap`` (functorch issue 534), hence loop paths only."""
    if module is None:
        return None
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TaskBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps, track_running_stats=False)
                bn.to(child.weight)
                with torch.no_grad():
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
                setattr(parent, name, bn)
    return module


def make_paths(spec: Spec, device: torch.device, dtype: torch.dtype, names=PATHS) -> dict:
    teacher, student = build_models(spec, device, dtype)
    paths = {}
    for name in names:
        t, s = (native_batchnorm(teacher), native_batchnorm(student)) if name.endswith("_native_bn") \
            else (teacher, student)
        if name.startswith("l2l_loop"):
            if l2l is not None:
                paths[name] = Learn2LearnPath(spec, t, s)
        else:
            paths[name] = EnginePath(spec, t, s, vmap=name == "engine_vmap")
    return paths
