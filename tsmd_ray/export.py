"""Deployment of an adapted model: frozen batch norm, ``torch.export`` files, size and latency.

Batch-norm policy: :class:`~tsmd_ray.models.TaskBatchNorm2d` normalises with the statistics of
whatever batch it is given, so a deployed model's prediction for an image would depend on the
other images in its batch (and a batch of one would be normalised by itself). Before deployment
every ``TaskBatchNorm2d`` is replaced by a :class:`FrozenBatchNorm2d` holding the per-channel mean
and variance it computed on the client's support set, the batch the weights were adapted with.
Each image is then predicted independently, and on the support set the frozen model reproduces
the adapted model's outputs exactly.
"""
from __future__ import annotations

import copy
import io
import logging
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .models import TaskBatchNorm2d

log = logging.getLogger(__name__)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics (buffers ``mean``, ``var``) and the adapted affine map."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(self.var + self.eps)
        shift = self.bias - self.mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _task_norms(model: nn.Module) -> list[tuple[str, TaskBatchNorm2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TaskBatchNorm2d)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def frozen_structure(model: nn.Module) -> nn.Module:
    """``model`` with every ``TaskBatchNorm2d`` swapped for an (unset) ``FrozenBatchNorm2d``, in place.

    Used to rebuild a deployed model before loading its state dict.
    """
    for name, bn in _task_norms(model):
        _swap(model, name, FrozenBatchNorm2d(bn.weight.numel(), bn.eps))
    return model


@torch.no_grad()
def freeze_batchnorm(model: nn.Module, x: Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode whose batch norms use the statistics of batch ``x``."""
    model = copy.deepcopy(model).eval()
    stats: dict[str, tuple[Tensor, Tensor]] = {}

    def recorder(name: str):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            h = inputs[0]
            mean = h.mean(dim=(0, 2, 3))
            var = (h - mean.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))  # as TaskBatchNorm2d
            stats[name] = (mean, var)
        return hook

    norms = _task_norms(model)
    handles = [bn.register_forward_pre_hook(recorder(name)) for name, bn in norms]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    for name, bn in norms:
        frozen = FrozenBatchNorm2d(bn.weight.numel(), bn.eps).to(bn.weight.device)
        frozen.weight.copy_(bn.weight)
        frozen.bias.copy_(bn.bias)
        frozen.mean.copy_(stats[name][0])
        frozen.var.copy_(stats[name][1])
        _swap(model, name, frozen)
    log.debug("froze %d batch-norm layers on a batch of %d", len(norms), x.shape[0])
    return model.requires_grad_(False)


class LogitsOnly(nn.Module):
    """Wraps a tsmd_ray model so that its only output is the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def export_model(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Save ``model`` (CPU, eval) with ``torch.export`` and a dynamic batch size.

    The file loads with ``torch.export.load(path).module()`` in a process that imports only torch.
    """
    path = Path(path)
    wrapped = LogitsOnly(model).cpu().eval()
    program = torch.export.export(wrapped, (example.cpu(),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))
    return path


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``: the weights' size on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, example: Tensor, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Wall-clock milliseconds per forward pass of ``example`` (one image) on the CPU."""
    model = model.cpu().eval()
    example = example.cpu()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(example)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats,
            "threads": torch.get_num_threads()}
