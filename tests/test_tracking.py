"""MLflow tracking of training runs, against a real ``mlflow server`` started here (SQLite backend).

Tiny models (Conv-4 8-8-8-8 teacher and student) on the real Omniglot data, a few iterations.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tsmd_ray.train
from tests.conftest import free_port
from tsmd_ray import tracking
from tsmd_ray.config import Config
from tsmd_ray.train import main as train_main

EXPERIMENT = "test-tracking"


@pytest.fixture
def client(mlflow_server: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)


@pytest.fixture
def as_train_command(monkeypatch):
    """``sys.argv[0]`` as ``python -m tsmd_ray.train`` sets it (the entry point the runs record)."""
    monkeypatch.setattr(sys, "argv", [tsmd_ray.train.__file__])


def tiny_args(data_root: Path, out: Path, *flags: str) -> list[str]:
    return ["--backend", "local", "--method", "tsmd", "--data-root", str(data_root),
            "--teacher", "conv4", "--teacher-widths", "8", "8", "8", "8", "--student-widths", "8", "8", "8", "8",
            "--iterations", "4", "--meta-batch", "2", "--inner-steps", "1", "--query", "2",
            "--eval-every", "2", "--val-episodes", "4", "--test-episodes", "4",
            "--out", str(out), "--experiment", EXPERIMENT, *flags]


TRAIN_METRICS = {"train/student/loss", "train/student/acc", "train/teacher/loss", "train/teacher/acc",
                 "train/tasks_per_s", "val/student_acc", "val/teacher_acc",
                 "test/student_acc", "test/student_ci95", "test/teacher_acc", "test/teacher_ci95"}
ARTIFACTS = {"config.yaml", "evaluation.json", "metrics.jsonl", "learning_curves.png"}


def steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def check_tracked_run(client, out: Path):
    """The run recorded in ``out/mlflow.json`` holds the whole run: params, metrics, artifacts, models."""
    info = json.loads((out / tracking.RUN_FILE).read_text())
    assert info["status"] == "logged"
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    cfg = Config.from_yaml(out / "config.yaml")
    assert run.data.params == tracking.config_params(cfg)  # every config value, as logged
    assert TRAIN_METRICS <= set(run.data.metrics)
    assert steps(client, run, "train/student/loss") == [1, 2, 3, 4]
    assert steps(client, run, "val/student_acc") == [2, 4]
    assert steps(client, run, "test/student_acc") == [0]  # one value per run: the chart view draws bars
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
    return run


def check_provenance(run, dataset_dir: Path) -> None:
    """The run names its prepared dataset (an MLflow dataset input) and its code (source tags)."""
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == "omniglot"
    assert data.dataset.digest == tracking.dataset_info(dataset_dir)["digest"]
    assert json.loads(data.dataset.source) == {"uri": str(dataset_dir.resolve())}
    assert data.dataset.source_type == "local"
    assert json.loads(data.dataset.profile)["classes"] == {"train": 163, "val": 40, "test": 39}
    tags = {t.key: t.value for t in data.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["tsmd.splits"].startswith("meta-train: train (163 classes); meta-validation: val")
    assert run.data.tags["mlflow.source.name"] == "tsmd_ray.train"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.git.dirty"] in ("true", "false")
    commit = run.data.tags["mlflow.source.git.commit"]
    repo = Path(tracking.naming.PACKAGE_DIR).parent
    assert subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", commit, "HEAD"]).returncode == 0


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
def test_two_seeds_of_one_config_are_told_apart_and_overlay(mlflow_server, client, omniglot_dataset, tmp_path,
                                                            monkeypatch, as_train_command):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    runs = []
    for seed, flags in ((0, []), (1, ["--no-system-metrics"])):
        out = tmp_path / f"seed{seed}"
        assert train_main(tiny_args(omniglot_dataset, out, "--seed", str(seed), *flags)) == 0
        runs.append(check_tracked_run(client, out))
        assert runs[-1].data.tags["tsmd.out"] == str(out.resolve())
    first, second = runs
    experiment = client.get_experiment(first.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    digest = first.data.tags["tsmd.config_digest"]
    assert second.data.tags["tsmd.config_digest"] == digest  # one configuration ...
    assert first.info.run_name == f"tsmd-{digest}-seed0-omniglot-5w1s"  # ... two names
    assert second.info.run_name == f"tsmd-{digest}-seed1-omniglot-5w1s"
    for run in runs:
        check_provenance(run, omniglot_dataset)
    # one hue per method, a shade per seed: the charts tell the two seeds apart
    colors = [run.data.tags["mlflow.runColor"] for run in runs]
    assert colors[0] != colors[1] and set(colors) <= set(tracking.naming.METHOD_COLORS["tsmd"])
    # the chart view overlays the two runs: the same metric names at the same steps
    learned = [{k for k in run.data.metrics if not k.startswith("system/")} for run in runs]
    assert learned[0] == learned[1]
    for key in learned[0]:
        assert steps(client, first, key) == steps(client, second, key), key
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(first.data.metrics)
    assert not [k for k in second.data.metrics if k.startswith("system/")]  # --no-system-metrics
    check_student_model(client, first.info.run_id, first.info.experiment_id)


def test_unreachable_server_keeps_results_and_uploads_later(mlflow_server, client, omniglot_dataset, tmp_path,
                                                            monkeypatch, caplog, as_train_command):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    out = tmp_path / "offline"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tsmd_ray.tracking"):
        assert train_main(tiny_args(omniglot_dataset, out, "--run-name", "offline run")) == 0
    warnings = [r for r in caplog.records if r.name == "tsmd_ray.tracking" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "tsmd_ray.tracking upload" in warnings[0].getMessage()
    assert time.monotonic() - started < 240
    for name in ("checkpoint.pt", "evaluation.json", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    info = json.loads((out / tracking.RUN_FILE).read_text())
    assert info["status"] == "pending_upload" and info["tracking_uri"] == closed

    # later, from another command and with the server back: everything goes into MLflow
    monkeypatch.setattr(sys, "argv", ["upload"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert tracking.main(["upload", str(out)]) == 0
    run = check_tracked_run(client, out)
    assert run.data.tags["tsmd.uploaded"] == "true"
    assert run.info.run_name == "offline run"  # --run-name
    check_provenance(run, omniglot_dataset)  # the dataset and code version of the training, not the upload's
    # uploading again completes the same run and duplicates nothing
    assert tracking.main(["upload", str(out), "--no-models"]) == 0
    assert json.loads((out / tracking.RUN_FILE).read_text())["run_id"] == run.info.run_id
    assert len(client.get_metric_history(run.info.run_id, "train/student/loss")) == 4
    assert len(client.get_run(run.info.run_id).inputs.dataset_inputs) == 1


def test_upload_of_a_resumed_run_keeps_the_last_value_of_a_repeated_step(mlflow_server, client, omniglot_dataset,
                                                                       tmp_path, monkeypatch, as_train_command):
    """A resumed run re-trains the iterations after its checkpoint and appends them to metrics.jsonl
    again: the upload logs each step once, with its last value, and still logs the models (MLflow
    links a run's metrics to its logged models, and refused the repeated steps there)."""
    out = tmp_path / "resumed"
    assert train_main(tiny_args(omniglot_dataset, out, "--no-mlflow")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    again = [{**r, "train/student/loss": r["train/student/loss"] + 10.0} for r in records
             if "train/student/loss" in r and r["step"] > 2]
    with (out / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in again)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run_id = tracking.upload_run(out)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/student/loss")}
    assert len(client.get_metric_history(run_id, "train/student/loss")) == len(history) == 4
    assert {step: history[step] for step in (3, 4)} == {r["step"]: pytest.approx(r["train/student/loss"])
                                                       for r in again}
    check_student_model(client, run_id, client.get_run(run_id).info.experiment_id)


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


def test_run_names_tell_configs_and_seeds_apart(monkeypatch):
    cfg = Config(data_root=None)
    digest = tracking.config_digest(cfg)
    assert tracking.default_run_name(cfg) == f"tsmd-{digest}-seed0-omniglot-5w1s"
    assert tracking.default_run_name(cfg.replace(seed=3)) == f"tsmd-{digest}-seed3-omniglot-5w1s"
    assert tracking.config_digest(cfg.replace(alpha=0.2)) != digest  # another configuration
    # where a run computes and how it is recorded does not change what it trains
    assert tracking.config_digest(cfg.replace(out="elsewhere", workers=3, backend="local", profile="quick")) == digest
    other = cfg.replace(method="student", meta_algorithm="reptile", ways=20, shots=5)
    assert tracking.default_run_name(other) == f"student-reptile-{tracking.config_digest(other)}-seed0-omniglot-20w5s"
    assert tracking.run_name(cfg.replace(run_name="my run")) == "my run"
    assert tracking.run_tags(cfg.replace(profile="quick"))["tsmd.profile"] == "quick"
    assert "tsmd.profile" not in tracking.run_tags(cfg)
    colors = {tracking.run_tags(cfg.replace(method=m, allow_random_teacher=True))["mlflow.runColor"]
              for m in ("student", "fixed-teacher", "tsmd", "oracle")}
    assert len(colors) == 4  # the methods' runs look different in every chart
    assert "mlflow.runColor" not in tracking.run_tags(cfg, nested=True)  # sweep trials: MLflow's colours
    values = {"alpha": 0.0341234, "lam": 0.2, "inner_steps": 3}
    assert tracking.trial_run_name("tsmd_trial_1a2b3_00004", values) == "00004 alpha=0.0341 lam=0.2 inner_steps=3"
    package = tracking.naming.PACKAGE_DIR
    for argv0, entry in ((package / "train.py", "tsmd_ray.train"), (package / "tune" / "__main__.py", "tsmd_ray.tune"),
                         (Path("/usr/bin/pytest"), "pytest")):
        monkeypatch.setattr(sys, "argv", [str(argv0)])
        assert tracking.naming.entry_point() == entry


def test_dataset_digest_covers_every_file_of_the_prepared_directory(omniglot_dataset, tmp_path):
    data = tmp_path / "omniglot"
    shutil.copytree(omniglot_dataset, data)
    info = tracking.dataset_info(data)
    assert info["name"] == "omniglot" and set(info["profile"]["files"]) == {"images.arrow", "meta.json"}
    assert tracking.dataset_info(data, cached=info) is info  # unchanged files: the digest is not recomputed
    (data / "train.txt").write_text("Latin/character01\n")  # a split file next to the Arrow file
    with_split = tracking.dataset_info(data, cached=info)
    assert with_split["digest"] != info["digest"] and "train.txt" in with_split["profile"]["files"]
    # other bytes with the same size and modification time: the content is what is hashed
    arrow = data / "images.arrow"
    stat = arrow.stat()
    raw = bytearray(arrow.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    arrow.write_bytes(bytes(raw))
    os.utime(arrow, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tracking.dataset_info(data)["digest"] != with_split["digest"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        tracking.dataset_info(tmp_path / "missing")


def test_experiments_declare_model_training(mlflow_server, client, monkeypatch, capsys):
    kind = tracking.EXPERIMENT_KIND_TAG
    created = tracking.ensure_experiment(client, "test-tracking-new", mlflow_server)
    legacy = client.create_experiment("test-tracking-legacy")  # made before tsmd_ray declared the kind
    genai = client.create_experiment("test-tracking-genai", tags={kind: "genai_development"})
    assert tracking.ensure_experiment(client, "test-tracking-legacy", mlflow_server) == legacy
    assert tracking.ensure_experiment(client, "test-tracking-genai", mlflow_server) == genai
    for experiment_id in (created, legacy):
        assert client.get_experiment(experiment_id).tags[kind] == "custom_model_development"
    assert client.get_experiment(genai).tags[kind] == "genai_development"  # a kind someone chose stays
    # `where` links each model-training experiment to the UI's model-training pages
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert tracking.main(["where"]) == 0
    printed = capsys.readouterr().out
    assert f"test-tracking-new: {mlflow_server}/#/experiments/{created}?workflowType=machine_learning" in printed
    assert "test-tracking-genai" not in printed


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
