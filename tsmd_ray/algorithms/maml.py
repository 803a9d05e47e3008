"""The MAML inner loop (Eq. 2) over functional parameters, per task or inside ``torch.func.vmap``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .functional import Params, detached, sgd_step


def inner_loop(loss_fn: Callable[[Params], Tensor], params: Params, steps: int, lr: float,
               first_order: bool, vectorized: bool = False) -> Params:
    """``steps`` gradient steps of size ``lr`` on ``loss_fn``.

    The result stays differentiable w.r.t. the initial ``params`` through ordinary autograd
    (second order), or through the identity path only when ``first_order`` (FOMAML). Inner
    gradients come from ``torch.func.grad`` when ``vectorized`` (the loop runs under ``vmap``),
    else from ``torch.autograd.grad``, which has less per-call overhead for one task at a time.
    """
    if vectorized:
        for _ in range(steps):
            grads = torch.func.grad(loss_fn)(params)
            params = sgd_step(params, detached(grads) if first_order else grads, lr)
        return params
    with torch.enable_grad():
        params = {k: p if p.requires_grad else p.detach().requires_grad_() for k, p in params.items()}
        for _ in range(steps):
            grads = torch.autograd.grad(loss_fn(params), list(params.values()), allow_unused=True,
                                        create_graph=not first_order, materialize_grads=True)
            params = dict(zip(params, torch._foreach_sub(list(params.values()), grads, alpha=lr)))
    return params
