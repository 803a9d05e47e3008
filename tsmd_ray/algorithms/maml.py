"""The MAML inner loop (Eq. 2) over functional parameters, usable inside ``torch.func.vmap``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .functional import Params, detached, sgd_step


def inner_loop(loss_fn: Callable[[Params], Tensor], params: Params, steps: int, lr: float,
               first_order: bool) -> Params:
    """``steps`` gradient steps of size ``lr`` on ``loss_fn``.

    The inner gradients come from ``torch.func.grad`` so the loop batches under ``vmap``; the
    result stays differentiable w.r.t. the initial ``params`` through ordinary autograd
    (second order), or through the identity path only when ``first_order`` (FOMAML).
    """
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(params)
        params = sgd_step(params, detached(grads) if first_order else grads, lr)
    return params
