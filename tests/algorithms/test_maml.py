"""The inner loop's two gradient back-ends (autograd per task, torch.func under vmap) agree."""
from __future__ import annotations

import pytest
import torch

from tsmd_ray.algorithms import inner_loop


def _problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    loss = lambda p: torch.tanh(x @ p["w"]).pow(2).sum()  # noqa: E731  (never reads p["unused"])
    return {"w": w, "unused": unused}, loss


@pytest.mark.parametrize("first_order", [False, True])
def test_autograd_and_torch_func_inner_loops_agree(first_order):
    params, loss = _problem()
    adapted = {v: inner_loop(loss, params, 3, 0.1, first_order, vectorized=v) for v in (False, True)}
    assert torch.allclose(adapted[False]["w"], adapted[True]["w"], rtol=1e-12, atol=0)
    assert torch.equal(adapted[False]["unused"], params["unused"])  # zero gradient, not an error
    outer = {v: torch.autograd.grad(loss(a), params["w"]) for v, a in adapted.items()}
    assert torch.allclose(outer[False][0], outer[True][0], rtol=1e-12, atol=0)


def test_second_order_differs_from_first_order():
    params, loss = _problem()
    outer = [torch.autograd.grad(loss(inner_loop(loss, params, 3, 0.1, fo)), params["w"])[0] for fo in (False, True)]
    assert not torch.allclose(outer[0], outer[1])


def test_detached_weights_adapt_under_no_grad():
    params, loss = _problem()
    with torch.no_grad():
        adapted = inner_loop(loss, {k: v.detach() for k, v in params.items()}, 2, 0.1, first_order=True)
    assert loss(adapted).item() < loss(params).item()
