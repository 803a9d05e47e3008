"""MLflow tracking of training runs, against a real ``mlflow server`` started here (SQLite backend).

Tiny models (Conv-4 8-8-8-8 teacher and student) on the real Omniglot data, a few iterations.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tsmd_ray import tracking
from tsmd_ray.config import Config
from tsmd_ray.train import main as train_main

EXPERIMENT = "test-tracking"


# ---------------------------------------------------------------------- a real tracking server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts under ``root``."""
    port = free_port()
    log_file = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not answer within {timeout} s: {(root / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield uri
    stop_server(proc)


@pytest.fixture
def client(mlflow_server: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)


def tiny_args(data_root: Path, out: Path, method: str = "tsmd") -> list[str]:
    return ["--backend", "local", "--method", method, "--data-root", str(data_root),
            "--teacher", "conv4", "--teacher-widths", "8", "8", "8", "8", "--student-widths", "8", "8", "8", "8",
            "--iterations", "4", "--meta-batch", "2", "--inner-steps", "1", "--query", "2",
            "--eval-every", "2", "--val-episodes", "4", "--test-episodes", "4",
            "--out", str(out), "--experiment", EXPERIMENT]


TRAIN_METRICS = {"train/student/loss", "train/student/acc", "train/teacher/loss", "train/teacher/acc",
                 "train/tasks_per_s", "val/student_acc", "val/teacher_acc",
                 "test/student_acc", "test/student_ci95", "test/teacher_acc", "test/teacher_ci95"}
ARTIFACTS = {"config.yaml", "evaluation.json", "metrics.jsonl", "learning_curves.png"}


def check_tracked_run(client, out: Path) -> str:
    """The run recorded in ``out/mlflow.json`` holds the whole run: params, metrics, artifacts, models."""
    info = json.loads((out / tracking.RUN_FILE).read_text())
    assert info["status"] == "logged"
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    cfg = Config.from_yaml(out / "config.yaml")
    assert run.data.params == tracking.config_params(cfg)  # every config value, as logged
    assert TRAIN_METRICS <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "train/student/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/student_acc")) == [2, 4]
    evaluation = json.loads((out / "evaluation.json").read_text())
    for model in ("student", "teacher"):
        assert run.data.metrics[f"test/{model}_acc"] == pytest.approx(evaluation["results"][model]["mean"])
        assert run.data.metrics[f"test/{model}_ci95"] == pytest.approx(evaluation["results"][model]["ci95"])
    assert ARTIFACTS <= {a.path for a in client.list_artifacts(run.info.run_id)}
    local = client.download_artifacts(run.info.run_id, "evaluation.json", str(out.parent / f"dl-{run.info.run_id}"))
    assert json.loads(Path(local).read_text()) == evaluation
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert {m.name for m in models} == {"student", "teacher"}
    return run.info.run_id


def check_student_model(client, run_id: str, experiment_id: str) -> None:
    import mlflow
    import torch

    model = next(m for m in client.search_logged_models(experiment_ids=[experiment_id],
                                                        filter_string=f"source_run_id = '{run_id}'")
                 if m.name == "student")
    student = mlflow.pytorch.load_model(model.model_uri)
    batch = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype("float32"))
    assert tuple(student(batch).shape) == (3, 5)  # any batch size: the batch dim stayed dynamic


# ---------------------------------------------------------------------- tests
def test_training_run_is_tracked(mlflow_server, client, omniglot_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "run"
    assert train_main(tiny_args(omniglot_dataset, out)) == 0
    run_id = check_tracked_run(client, out)
    run = client.get_run(run_id)
    assert run.info.run_name == "tsmd-omniglot-5w1s"
    assert run.data.tags["tsmd.out"] == str(out.resolve())
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    check_student_model(client, run_id, run.info.experiment_id)


def test_unreachable_server_keeps_results_and_uploads_later(mlflow_server, client, omniglot_dataset, tmp_path,
                                                            monkeypatch, caplog):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    out = tmp_path / "offline"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tsmd_ray.tracking"):
        assert train_main(tiny_args(omniglot_dataset, out, method="tsmd")) == 0
    warnings = [r for r in caplog.records if r.name == "tsmd_ray.tracking" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "tsmd_ray.tracking upload" in warnings[0].getMessage()
    assert time.monotonic() - started < 240
    for name in ("checkpoint.pt", "evaluation.json", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    info = json.loads((out / tracking.RUN_FILE).read_text())
    assert info["status"] == "pending_upload" and info["tracking_uri"] == closed

    # later, with the server back: the upload command puts everything into MLflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert tracking.main(["upload", str(out)]) == 0
    run_id = check_tracked_run(client, out)
    assert client.get_run(run_id).data.tags["tsmd.uploaded"] == "true"
    # uploading again completes the same run and duplicates nothing
    assert tracking.main(["upload", str(out), "--no-models"]) == 0
    assert json.loads((out / tracking.RUN_FILE).read_text())["run_id"] == run_id
    assert len(client.get_metric_history(run_id, "train/student/loss")) == 4


def test_tracking_failure_mid_run_warns_once_and_stops_logging(tmp_path, caplog):
    class BrokenClient:
        calls = 0

        def log_batch(self, *args, **kwargs):
            BrokenClient.calls += 1
            raise ConnectionError("server went away")

    cfg = Config(out=str(tmp_path / "run"), data_root=None)
    tracker = tracking.MlflowTracker(cfg, tracking_uri="http://127.0.0.1:1")
    tracker.client, tracker.run_id, tracker.active = BrokenClient(), "abc", True
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="tsmd_ray.tracking"):
        for step in range(1, 4):
            tracker.report(step, {"train/student/loss": 1.0})
        tracker.finish()
    assert BrokenClient.calls == 1
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    info = tracking.read_run_file(tmp_path / "run")
    assert info["status"] == "pending_upload" and "server went away" in info["error"]


def test_default_store_is_absolute_sqlite_under_tsmd_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TSMD_HOME", str(tmp_path / "home"))
    uri = tracking.resolve_tracking_uri()
    assert uri == f"sqlite:///{(tmp_path / 'home' / 'mlflow.db').resolve()}"
    assert tracking.artifact_location(uri, "my exp") == (tmp_path / "home" / "mlartifacts" / "my_exp").resolve().as_uri()
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("sqlite:///rel/db.sqlite") == f"sqlite:///{(tmp_path / 'rel/db.sqlite').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.resolve_tracking_uri() == "http://tracking:5000"
    assert tracking.artifact_location("http://tracking:5000", "x") is None


def test_local_store_tracks_without_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TSMD_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    client = tracking.connect()
    experiment_id = tracking.ensure_experiment(client, "local", tracking.resolve_tracking_uri())
    location = client.get_experiment(experiment_id).artifact_location
    assert location.startswith("file://") and str((tmp_path / "home").resolve()) in location
    assert not (tmp_path / "mlruns").exists()  # never the legacy relative file store


def test_http_bounds_respect_user_settings(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    tracking.bound_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_BOUNDS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_bar_chart_of_several_evaluations(tmp_path):
    from tsmd_ray.plots import plot_evaluations

    evaluations = []
    for i, method in enumerate(("student", "fixed-teacher", "tsmd")):
        results = {"student": {"mean": 0.5 + 0.1 * i, "ci95": 0.02, "episodes": 800}}
        if method != "student":
            results["teacher"] = {"mean": 0.7, "ci95": 0.01, "episodes": 800}
        evaluation = {"method": method, "dataset": "omniglot", "ways": 5, "shots": 1, "results": results}
        path = tmp_path / f"{method}.json"
        path.write_text(json.dumps(evaluation))
        evaluations.append(path if i % 2 else evaluation)  # paths and dicts both work
    png = plot_evaluations(evaluations, tmp_path / "bars.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_evaluations(evaluations, tmp_path / "x.png", labels=["only one"])
