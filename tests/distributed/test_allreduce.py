"""All-reduce aggregation on Ray Train workers: same trajectory as the driver, a killed worker survived."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from tsmd_ray import train  # noqa: E402
from tsmd_ray.checkpoint import load_checkpoint  # noqa: E402
from tsmd_ray.training import NonFiniteLossError  # noqa: E402
from tsmd_ray.plots import read_metrics  # noqa: E402

from .conftest import assert_identical, final_state, tiny_config  # noqa: E402

ALLREDUCE = ("--workers", "2", "--aggregation", "allreduce")


def train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes now running on this machine."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def interrupted(ray_address: str, omniglot_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One all-reduce run on 2 Ray Train workers, logging to MLflow, stopped twice: 4 iterations;
    a ``--resume`` whose first iteration has a NaN loss (lam=1e38); a ``--resume`` to the end.
    (One chain, not a run per test: each Ray Train run starts a new worker group, tens of seconds.)"""
    root = tmp_path_factory.mktemp("allreduce")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_config(omniglot_dataset, root / "run", *ALLREDUCE, "--mlflow", "true")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        train.run(cfg.replace(iterations=4))
        with pytest.raises(NonFiniteLossError) as nan:
            train.run(cfg.replace(resume=True, lam=1e38))
        kept = load_checkpoint(root / "run" / "checkpoint.pt")["iteration"]
        result = train.run(cfg.replace(resume=True))
    return {"cfg": cfg, "out": root / "run", "uri": uri, "nan": str(nan.value), "kept": kept, "result": result}


def test_resumed_run_matches_driver_aggregation(interrupted: dict, reference: dict) -> None:
    """Every parameter and Adam moment bit-identical to the driver's uninterrupted run (both add
    float64 per-task sums, see tsmd_ray/distributed/allreduce.py), the same test scores; rank 0
    wrote each iteration once (the NaN run none), and Ray Train kept its checkpoint."""
    out = interrupted["out"]
    assert_identical(final_state(out), reference["state"], "interrupted all-reduce vs driver")
    assert interrupted["result"]["results"] == reference["result"]["results"]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/student/loss" in r]
    assert steps == list(range(1, 9))  # iterations 1-4, then 5-8 after the resumes
    assert list((out / "ray_train").glob("*/checkpoint_*/checkpoint.pt"))


def test_nan_loss_stops_at_once_and_keeps_the_last_checkpoint(interrupted: dict) -> None:
    """A NaN loss is deterministic: the workers end the run and the driver raises their error (after
    worker-group restarts it would be a RuntimeError from Ray Train's TrainingFailedError)."""
    assert re.search(r"non-finite .* at iteration 4.*iteration 3\) is kept", interrupted["nan"]), interrupted["nan"]
    assert interrupted["kept"] == 3


def test_rank_0_logs_one_mlflow_run_through_the_resumes(interrupted: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(interrupted["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(interrupted["cfg"].experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["aggregation"] == "allreduce"
    history = client.get_metric_history(run.info.run_id, "train/student/loss")
    assert [m.step for m in history] == list(range(1, interrupted["cfg"].iterations + 1))


def test_killed_worker_restarts_the_group_from_its_checkpoint(reference: dict, omniglot_dataset: Path,
                                                              tmp_path: Path) -> None:
    """SIGKILL a Ray Train worker once iteration 3 is logged: Ray Train restarts the worker group,
    it resumes from the last checkpoint rank 0 reported, and the run ends bit-identical."""
    cfg = tiny_config(omniglot_dataset, tmp_path, *ALLREDUCE)
    killed: list[int] = []

    def kill_when_iteration_3_is_logged() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] \
                if (tmp_path / "metrics.jsonl").is_file() else []
            workers = train_workers()
            if steps and max(steps) >= 3 and len(workers) == 2:
                victim = max(workers, key=lambda p: p.pid)
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill_when_iteration_3_is_logged, daemon=True)
    thread.start()
    result = train.run(cfg)
    thread.join()
    assert killed, "no worker was killed"
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert set(steps) == set(range(1, cfg.iterations + 1))  # iterations after the checkpoint ran again
    assert_identical(final_state(tmp_path), reference["state"], "killed worker vs unfaulted")
    assert result["results"] == reference["result"]["results"]


def test_tune_and_local_backend_refuse_allreduce(omniglot_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aggregation=allreduce needs backend=ray"):
        tiny_config(omniglot_dataset, tmp_path, "--aggregation", "allreduce", "--backend", "local")
    with pytest.raises(ValueError, match="workers <= meta_batch"):
        tiny_config(omniglot_dataset, tmp_path, "--aggregation", "allreduce", "--workers", "5")
    cfg = tiny_config(omniglot_dataset, tmp_path, *ALLREDUCE)
    with pytest.raises(ValueError, match="use aggregation=driver"):
        train.run(cfg, reporters=[object()])
