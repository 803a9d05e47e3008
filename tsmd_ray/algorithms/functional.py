"""Functional parameters: a model's weights as a ``{name: tensor}`` dict, applied with
``torch.func.functional_call`` so inner updates never touch the module itself."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

Params = dict[str, Tensor]


class Outputs(NamedTuple):
    logits: Tensor
    embedding: Tensor


def parameters_of(module: nn.Module) -> Params:
    """The module's trainable parameters, by name (the leaves that receive outer gradients)."""
    return dict(module.named_parameters())


def detached(params: Params) -> Params:
    return {name: p.detach() for name, p in params.items()}


def forward(model: nn.Module, params: Params, x: Tensor) -> Outputs:
    """Logits and penultimate embedding of ``model`` with weights ``params``."""
    return Outputs(*functional_call(model, params, (x,), {"with_embedding": True}))


def cross_entropy(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy (Eq. 4, 5; the paper's sum differs by a factor folded into the rates)."""
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == y).to(logits.dtype).mean()


def sgd_step(params: Params, grads: Params, lr: float) -> Params:
    return {name: p - lr * grads[name] for name, p in params.items()}
