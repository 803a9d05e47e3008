"""Shared pieces of the Ray tests: a tiny TSMD configuration, training helpers, Ray lifetimes."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tsmd_ray.checkpoint import load_checkpoint
from tsmd_ray.config import Config
from tsmd_ray.data import ArrowFewShotDataset
from tsmd_ray.engine import DataSpec
from tsmd_ray.flags import config_from_args
from tsmd_ray.plots import read_metrics
from tsmd_ray.train import build_parser
from tsmd_ray.training import CHECKPOINT_NAME, Runner, Trainer

from ..conftest import stop_shared_ray

# TSMD with an adapted Conv-4 teacher and a Conv-4 student, both 8 channels wide: psi and theta
# are both meta-trained, second order, with train-time augmentation, in well under a second per
# iteration. The same flags drive in-process runs and `python -m tsmd_ray.train` subprocesses.
TINY_FLAGS = [
    "--method", "tsmd", "--teacher", "conv4", "--teacher-widths", "8", "8", "8", "8",
    "--student-widths", "8", "8", "8", "8", "--inner-steps", "2", "--meta-batch", "4",
    "--iterations", "8", "--eval-every", "4", "--val-episodes", "4", "--test-episodes", "8",
    "--checkpoint-every", "2", "--mlflow", "false", "--device", "cpu", "--threads-per-worker", "1",
]


def tiny_flags(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_FLAGS, "--data-root", str(dataset), "--out", str(out), *extra]


def tiny_config(dataset: Path, out: Path, *extra: str) -> Config:
    return config_from_args(build_parser().parse_args(tiny_flags(dataset, out, *extra)))


def fit(cfg: Config, runner: Runner, dataset: Path) -> dict[str, Any]:
    """Meta-train and meta-test with ``runner`` (left open); returns the evaluation."""
    data = ArrowFewShotDataset(dataset)
    return Trainer(cfg, runner, DataSpec.of(data), data.meta).fit()


def final_state(out: Path) -> dict[str, Any]:
    """The learner state of the final checkpoint in ``out``: psi, theta and both Adam states."""
    return load_checkpoint(Path(out) / CHECKPOINT_NAME)["learner"]


def flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict (parameters and optimizer moments), by dotted path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def assert_identical(a: dict[str, Any], b: dict[str, Any], what: str = "") -> int:
    """Every tensor of ``a`` and ``b`` bit-identical; returns how many were compared."""
    ta, tb = flat_tensors(a), flat_tensors(b)
    assert ta.keys() == tb.keys()
    differing = {k: float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if not torch.equal(ta[k], tb[k])}
    assert not differing, f"{what}: {len(differing)} of {len(ta)} tensors differ, e.g. {sorted(differing.items())[:5]}"
    return len(ta)


@contextmanager
def restored_env(names: Sequence[str] = ("RAY_AUTH_MODE", "RAY_ADDRESS")) -> Iterator[None]:
    """``ray.init`` sets RAY_AUTH_MODE in os.environ; put it back for the modules that follow."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def fault_during(runner: Any, iteration: int, meta_batch: int, fault: Callable[[list], None]) -> None:
    """Run ``fault(inflight_calls)`` on a thread as soon as ``iteration``'s actor calls are submitted."""
    real_gradients = runner.gradients

    def gradients(weights, task_ids):
        if task_ids[0] != iteration * meta_batch:
            return real_gradients(weights, task_ids)
        before = runner.inflight

        def wait_then_fault() -> None:
            while runner.inflight is before:
                time.sleep(0.001)
            fault(runner.inflight)

        thread = threading.Thread(target=wait_then_fault)
        thread.start()
        try:
            return real_gradients(weights, task_ids)
        finally:
            thread.join()

    runner.gradients = gradients


# ---------------------------------------------------------------------- one Ray instance per module
@pytest.fixture(scope="module")
def ray_address() -> str:
    import ray

    stop_shared_ray()
    with restored_env():
        # address="local": always a fresh instance, never a `ray start` cluster someone left running
        context = ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            yield context.address_info["gcs_address"]
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def references() -> dict:
    """``reference``'s result, computed by the first module that asks (the run is deterministic)."""
    return {}


@pytest.fixture(scope="module")
def reference(ray_address: str, omniglot_dataset: Path, tmp_path_factory: pytest.TempPathFactory,
              references: dict) -> dict:
    """An unfaulted run with driver aggregation over 2 workers: final learner state, evaluation,
    the runner's call statistics and the metrics records. Run once per session, on the Ray
    instance of the first module that asks."""
    from tsmd_ray.distributed import RayRunner

    if "driver" in references:
        return references["driver"]
    out = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(omniglot_dataset, out, "--workers", "2")
    runner = RayRunner(cfg, omniglot_dataset)
    try:
        assert len(runner.actors) == 2 and {i["threads"] for i in runner.infos} == {1}
        result = fit(cfg, runner, omniglot_dataset)
        stats = runner.stats
    finally:
        runner.close()
    references["driver"] = {"state": final_state(out), "result": result, "stats": stats,
                            "metrics": read_metrics(out / "metrics.jsonl")}
    return references["driver"]
