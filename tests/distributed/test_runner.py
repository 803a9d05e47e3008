"""RayRunner on one local Ray instance: worker-count independence, a killed actor, a killed driver."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from tsmd_ray.config import Config  # noqa: E402
from tsmd_ray.distributed import RayRunner, plan_workers, split_blocks  # noqa: E402
from tsmd_ray.training import CHECKPOINT_NAME  # noqa: E402

from .conftest import (assert_identical, fault_during, final_state, fit, tiny_config,  # noqa: E402
                       tiny_flags)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- pure helpers (no Ray)
def test_split_blocks_contiguous_and_balanced() -> None:
    assert split_blocks(range(8), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_blocks(range(5), 3) == [[0, 1], [2, 3], [4]]
    assert split_blocks([7, 8], 4) == [[7], [8], [], []]
    assert [i for block in split_blocks(range(800), 7) for i in block] == list(range(800))


@pytest.mark.parametrize("resources, flags, expected", [
    ({"CPU": 2.0}, {}, (2, 1.0, 0.0)),                                    # one per CPU ...
    ({"CPU": 64.0}, {"meta_batch": 8}, (8, 1.0, 0.0)),                    # ... at most meta_batch
    ({"CPU": 16.0}, {"threads_per_worker": 4}, (4, 4.0, 0.0)),
    ({"CPU": 64.0, "GPU": 8.0}, {}, (8, 1.0, 1.0)),                       # one per GPU
    ({"CPU": 64.0, "GPU": 2.0}, {"gpus_per_worker": 0.5}, (4, 1.0, 0.5)),  # fractional GPUs
    ({"CPU": 64.0, "GPU": 8.0}, {"device": "cpu"}, (8, 1.0, 0.0)),        # GPUs ignored on --device cpu
    ({"CPU": 2.0}, {"workers": 3}, (3, 1.0, 0.0)),                        # explicit count as given
])
def test_plan_workers(resources: dict, flags: dict, expected: tuple) -> None:
    plan = plan_workers(Config(**{"meta_batch": 8, **flags}), resources)
    assert (plan.workers, plan.cpus_per_worker, plan.gpus_per_worker) == expected


def test_trajectory_does_not_depend_on_worker_count(reference: dict, omniglot_dataset: Path, tmp_path: Path) -> None:
    """1 worker vs 2 workers, same seed: every parameter and Adam moment bit-identical.

    Tolerance: zero. Per-task gradients are bitwise reproducible (same weights, same task, one
    thread each); the actors add them in float64 and the driver rounds the total once to float32,
    and float64 sums of a few float32 values are exact, so the grouping of tasks over workers
    cannot change a bit (see tsmd_ray/distributed/actors.py). With float32 partial sums the
    weights would differ by ~1 ulp and the conv biases in front of batch norm (analytically zero
    gradient, pure rounding noise that Adam normalises to ~lr-sized steps) by up to ~3e-3.
    """
    cfg = tiny_config(omniglot_dataset, tmp_path, "--workers", "1")
    runner = RayRunner(cfg, omniglot_dataset)
    try:
        result = fit(cfg, runner, omniglot_dataset)
        assert runner.stats.calls == cfg.iterations
    finally:
        runner.close()
    compared = assert_identical(final_state(tmp_path), reference["state"], "1 vs 2 workers")
    assert compared > 70  # 2 x 18 parameters, plus both Adam states
    assert result["results"] == reference["result"]["results"]  # same 8 test episodes, same scores
    # The reference really spread the work: 2 result blocks per iteration, weights put once.
    assert reference["stats"].put_bytes == cfg.iterations * (reference["stats"].put_bytes // cfg.iterations)
    assert reference["stats"].result_bytes == 2 * 2 * reference["stats"].put_bytes  # 2 actors, float64


@pytest.mark.parametrize("no_restart", [False, True], ids=["ray-restarts", "driver-replaces"])
def test_actor_killed_mid_iteration_is_restarted(no_restart: bool, reference: dict, omniglot_dataset: Path,
                                                 tmp_path: Path) -> None:
    """``ray.kill(actor)`` while it computes iteration 3: the run finishes and matches bit for bit.

    ``no_restart=False``: Ray restarts the actor and re-runs the call (``max_restarts``,
    ``max_task_retries``). ``no_restart=True``: the actor is gone for good, the call fails with
    ``ActorDiedError`` and the driver replaces the actor and resubmits the block.
    """
    cfg = tiny_config(omniglot_dataset, tmp_path, "--workers", "2")
    runner = RayRunner(cfg, omniglot_dataset)
    victim, pid_before = runner.actors[1], runner.infos[1]["pid"]
    killed_while_busy: list[bool] = []

    def killer(inflight: list) -> None:
        """Iteration 3's calls are submitted: kill actor 1 while its call is unfinished."""
        ready, _ = ray.wait([inflight[1]], timeout=0)
        ray.kill(victim, no_restart=no_restart)
        killed_while_busy.append(not ready)

    fault_during(runner, 3, cfg.meta_batch, killer)
    try:
        fit(cfg, runner, omniglot_dataset)
        infos = runner.actor_info()
    finally:
        runner.close()
    assert killed_while_busy == [True], "the kill did not hit an unfinished call"
    assert infos[1]["pid"] != pid_before  # restarted: a new process ...
    assert runner.stats.retries == (1 if no_restart else 0)  # ... by the driver, or by Ray itself
    assert_identical(final_state(tmp_path), reference["state"], "killed actor vs unfaulted")  # ... and exact


def test_killed_driver_resumes_from_checkpoint(ray_address: str, reference: dict, omniglot_dataset: Path,
                                               tmp_path: Path) -> None:
    """SIGKILL `python -m tsmd_ray.train` after a checkpoint; `--resume` ends where an unfaulted run does."""
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "tsmd_ray.train", *tiny_flags(omniglot_dataset, tmp_path, "--workers", "2")]
    checkpoint = tmp_path / CHECKPOINT_NAME
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # the driver dies mid-run, right after its first checkpoint
        finally:
            proc.wait(30)
    log_text = (tmp_path / "first.log").read_text()
    assert checkpoint.exists(), log_text[-3000:]
    assert proc.returncode == -signal.SIGKILL
    killed_at = final_state_iteration(checkpoint)
    assert killed_at < 7 and not (tmp_path / "evaluation.json").exists(), "the run ended before it was killed"

    resumed = subprocess.run([*command, "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                             check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (tmp_path / "evaluation.json").exists()
    # it continued from the checkpoint (a fresh start would end on the same weights too)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1 and sorted(set(steps)) == list(range(1, 9)), steps
    assert_identical(final_state(tmp_path), reference["state"], "resumed vs uninterrupted")


def final_state_iteration(path: Path) -> int:
    from tsmd_ray.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["iteration"])


def test_actor_that_cannot_open_the_dataset_fails_fast(ray_address: str, omniglot_dataset: Path,
                                                        tmp_path: Path) -> None:
    """A path the actors cannot read (say, not on shared storage) is an error, not a hang: the
    constructor's error is raised, not the start-up deadline's ("did not start within")."""
    cfg = tiny_config(omniglot_dataset, tmp_path, "--workers", "1")
    with pytest.raises(RuntimeError, match="(?s)failed to start.*storage every node sees.*not-there.*meta.json"):
        RayRunner(cfg, tmp_path / "not-there")
