"""Ray Tune sweeps: space files, and a real small sweep (3 trials, tiny models, CPU) on one Ray
cluster, tracked in a real ``mlflow server``: interrupted after its first trial, resumed with
``--resume`` without redoing finished trials, every trial a nested MLflow run, and the best
config trains."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tsmd_ray import tracking
from tsmd_ray import tune as tsmd_tune
from tsmd_ray.config import Config

SPACES = Path(__file__).resolve().parent.parent / "tune_spaces"
PAPER_DATASETS = {"mini_imagenet", "cifar_fs", "fc100", "fgvc_aircraft", "cub200", "stanford_dogs"}


# ---------------------------------------------------------------------- space files
def write_space(path: Path, **changes) -> Path:
    space = {
        "name": "tiny", "samples": 3, "searcher": "optuna", "seed": 0,
        "scheduler": {"grace_period": 2, "reduction_factor": 2}, "resources": {"driver_cpus": 0},
        "experiment": "test-tune",
        "search": {"alpha": {"loguniform": [0.01, 1.0]}, "beta": {"loguniform": ["1e-4", "1e-2"]},
                   "lambda": {"loguniform": [0.01, 1.0]}, "eta": {"loguniform": [1.0e-4, 1.0e-2]}},
        "base": {"method": "tsmd", "dataset": "omniglot", "teacher": "conv4", "teacher_widths": [8, 8, 8, 8],
                 "student_widths": [8, 8, 8, 8], "inner_steps": 1, "meta_batch": 2, "query": 2,
                 "iterations": 4, "eval_every": 2, "val_episodes": 4, "test_episodes": 4,
                 "backend": "ray", "workers": 1, "mlflow": True},
    }
    for key, value in changes.items():
        space[key] = value
    path.write_text(yaml.safe_dump(space))
    return path


def test_committed_best_configs_train_as_configs():
    for path in sorted((SPACES / "best").glob("*.yaml")):
        cfg = Config.from_yaml(path)  # a train config, not a space
        assert cfg.method in ("tsmd", "fixed-teacher") and cfg.kd_weight > 0, path


def test_shipped_spaces_parse():
    datasets = {}
    for path in sorted(SPACES.glob("*.yaml")):
        spec = tsmd_tune.load_space(path)  # every shipped space is valid
        assert spec.metric == "val/student_acc" and spec.searcher == "optuna"
        if path.stem not in PAPER_DATASETS | {"omniglot"}:
            continue  # a focused space (e.g. KD settings only)
        datasets[spec.base_config.dataset] = spec
        assert {"alpha", "beta", "lam", "eta"} <= set(spec.search), path  # the learning rates of every setting
        for key in ("alpha", "beta", "lam", "eta"):
            assert "loguniform" in spec.search[key], (path, key)
    assert set(datasets) == PAPER_DATASETS | {"omniglot"}
    for name in PAPER_DATASETS:  # paper 5.1: 5-way 1-shot, ResNet-50 teacher, Conv-4 32 student, 5 steps
        cfg = datasets[name].base_config
        assert (cfg.ways, cfg.shots, cfg.teacher, cfg.student, cfg.inner_steps) == (5, 1, "resnet50", "conv4", 5)
        assert list(cfg.student_widths) == [32, 32, 32, 32]


def test_space_errors(tmp_path):
    with pytest.raises(ValueError, match="not a Config key"):
        tsmd_tune.load_space(write_space(tmp_path / "a.yaml", search={"alpah": {"uniform": [0, 1]}}))
    with pytest.raises(ValueError, match="loguniform needs a positive"):
        tsmd_tune.load_space(write_space(tmp_path / "b.yaml", search={"alpha": {"loguniform": [0, 1]}}))
    with pytest.raises(ValueError, match="expected one of"):
        tsmd_tune.load_space(write_space(tmp_path / "c.yaml", search={"alpha": {"normal": [0, 1]}}))
    with pytest.raises(ValueError, match="unknown key"):
        tsmd_tune.load_space(write_space(tmp_path / "d.yaml", serach={}))
    with pytest.raises(ValueError, match="eval_every"):
        tsmd_tune.load_space(write_space(tmp_path / "e.yaml"), {"eval_every": 0})
    with pytest.raises(ValueError, match="metric must be one of val/teacher_acc .*method oracle"):
        tsmd_tune.load_space(write_space(tmp_path / "f.yaml"), {"method": "oracle"})
    with pytest.raises(ValueError, match=r"scheduler.grace_period must be between 1 and max_t \(= iterations, 4\)"):
        tsmd_tune.load_space(write_space(tmp_path / "h.yaml", scheduler={"grace_period": 5}))
    with pytest.raises(ValueError, match=r"scheduler.max_t must be between 1 and iterations \(4\), got 8"):
        tsmd_tune.load_space(write_space(tmp_path / "i.yaml", scheduler={"max_t": 8}))
    with pytest.raises(ValueError, match="search.alpha changes nothing with method=student"):
        tsmd_tune.load_space(write_space(tmp_path / "j.yaml"), {"method": "student"})
    with pytest.raises(ValueError, match="base.val_episodes must be a positive integer"):
        tsmd_tune.load_space(write_space(tmp_path / "k.yaml"), {"val_episodes": 0})
    with pytest.raises(ValueError, match="must be a positive"):  # a sampled value the Config rejects
        tsmd_tune.load_space(write_space(tmp_path / "g.yaml", search={"alpha": {"uniform": [-1, 1]}}))
    spec = tsmd_tune.load_space(write_space(tmp_path / "ok.yaml"), tsmd_tune.parse_overrides(["iterations=6"]))
    assert spec.base["iterations"] == 6 and spec.search["beta"] == {"loguniform": [1e-4, 1e-2]}
    assert spec.search["lam"] == {"loguniform": [0.01, 1.0]}  # "lambda" is an alias of lam


def test_searchers_schedulers_and_resources(tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    spec = tsmd_tune.load_space(write_space(tmp_path / "s.yaml"))
    assert isinstance(tsmd_tune.make_searcher(spec), OptunaSearch)
    spec.searcher = "random"
    assert isinstance(tsmd_tune.make_searcher(spec), BasicVariantGenerator)
    assert isinstance(tsmd_tune.make_scheduler(spec), ASHAScheduler)
    cfg = Config.from_dict({**spec.base, "workers": 2, "gpus_per_worker": 0.5, "threads_per_worker": 2})
    bundles = tsmd_tune.trial_bundles(cfg, {"driver_cpus": 1})
    assert bundles == [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 0.5}, {"CPU": 2.0, "GPU": 0.5}]
    assert tsmd_tune.concurrency(bundles, {"CPU": 16, "GPU": 2}) == 2  # GPUs bound it
    assert tsmd_tune.concurrency(bundles, {"CPU": 6, "GPU": 8}) == 1
    assert tsmd_tune.trial_bundles(cfg.replace(backend="local"), {}) == [{"CPU": 2.0}]
    assert tsmd_tune.coerce("inner_steps", np.int64(3)) == 3 and type(tsmd_tune.coerce("alpha", np.float32(0.5))) is float


# ---------------------------------------------------------------------- a real sweep
def trial_snapshot(experiment_dir: Path) -> dict[str, tuple[int, str]]:
    """Trials Tune recorded as ended, with their evaluation.json time and metrics.jsonl text."""
    from ray.tune import ExperimentAnalysis

    snap = {}
    for trial in ExperimentAnalysis(str(experiment_dir)).trials:
        out = experiment_dir / "trials" / trial.trial_id
        if trial.status == "TERMINATED" and (out / "evaluation.json").is_file():
            snap[trial.trial_id] = ((out / "evaluation.json").stat().st_mtime_ns, (out / "metrics.jsonl").read_text())
    return snap


@pytest.fixture(scope="module")
def sweep(ray_cluster, mlflow_server, omniglot_dataset, tmp_path_factory):
    """The sweep, interrupted after its first finished trial, then resumed to the end."""
    root = tmp_path_factory.mktemp("sweep")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # FIFO: every trial runs to its meta-test, so what resume must keep is known in advance
    # (ASHA's construction is checked in test_searchers_schedulers_and_resources).
    space = write_space(root / "tiny.yaml", scheduler={"type": "fifo"})
    args = ["--space", str(space), "--storage", str(root / "tune"), "--set", f"data_root={omniglot_dataset}"]
    try:
        assert tsmd_tune.main([*args, "--stop-after-trials", "1"]) == 0
        experiment_dir = root / "tune" / "tiny"
        first = trial_snapshot(experiment_dir)
        finished_first = tsmd_tune.finished_trials(experiment_dir)
        assert tsmd_tune.main([*args, "--resume"]) == 0
        yield {"root": root, "dir": experiment_dir, "first": first, "finished_first": finished_first,
               "uri": mlflow_server, "monkeypatch": mp}
    finally:
        mp.undo()


def test_interrupted_sweep_resumes_without_redoing_finished_trials(sweep):
    assert 1 <= sweep["finished_first"] < 3
    assert sweep["first"], "a trial had finished its meta-test before the interruption"
    assert tsmd_tune.finished_trials(sweep["dir"]) == 3
    after = trial_snapshot(sweep["dir"])
    for trial_id, (mtime, metrics) in sweep["first"].items():  # neither re-trained nor re-tested
        assert after[trial_id] == (mtime, metrics), trial_id
    assert len(list((sweep["dir"] / "trials").iterdir())) == 3


def test_every_trial_is_a_nested_mlflow_run(sweep, omniglot_dataset):
    from mlflow import MlflowClient

    client = MlflowClient(sweep["uri"])
    experiment = client.get_experiment_by_name("test-tune")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parents = client.search_runs([experiment.experiment_id], "tags.`tsmd.kind` = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-tiny"
    assert json.loads((sweep["dir"] / tsmd_tune.SWEEP_FILE).read_text())["parent_run_id"] == parent.info.run_id
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trial_ids = {p.name for p in (sweep["dir"] / "trials").iterdir()}
    assert sorted(r.data.tags["tsmd.trial_id"] for r in children) == sorted(trial_ids)  # one run per trial
    digest = tracking.dataset_info(omniglot_dataset)["digest"]
    for run in [parent, *children]:  # the driver's dataset digest and code version, everywhere
        assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [digest]
        assert run.data.tags["mlflow.source.name"] == "tsmd_ray.tune"
        assert run.data.tags["mlflow.source.git.commit"] == parent.data.tags["mlflow.source.git.commit"]
    for run in children:
        assert run.info.status in ("FINISHED", "KILLED"), run.info  # KILLED: stopped early by ASHA
        assert {"alpha", "beta", "lam", "eta"} <= set(run.data.params)
        assert "mlflow.runColor" not in run.data.tags  # trials keep MLflow's own colours
        # named by its searched values, as sampled
        sampled = {key: float(run.data.params[key]) for key in ("alpha", "beta", "lam", "eta")}
        number, *values = run.info.run_name.split()
        assert run.data.tags["tsmd.trial_id"].endswith(number)
        assert {v.split("=")[0]: float(v.split("=")[1]) for v in values} == pytest.approx(sampled, rel=1e-2)
        assert "val/student_acc" in run.data.metrics
        if run.info.status == "FINISHED":
            assert "test/student_acc" in run.data.metrics
    assert len({r.info.run_name for r in children}) == len(children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "space.yaml", "trials.csv", "best_trials.png"} <= artifacts
    # the sweep's run shows its best trial's metrics under the trials' own names
    best = client.get_run(parent.data.tags["tsmd.best_run_id"])
    assert parent.data.tags["tsmd.best_trial"] == best.data.tags["tsmd.trial_id"]
    for key in ("val/student_acc", "test/student_acc", "test/student_ci95", "val/teacher_acc"):
        assert parent.data.metrics[key] == pytest.approx(best.data.metrics[key]), key
    assert parent.data.metrics["val/student_acc"] == max(r.data.metrics["val/student_acc"] for r in children)


def test_best_config_trains(sweep, capsys):
    from tsmd_ray.train import main as train_main

    best = sweep["dir"] / tsmd_tune.BEST_CONFIG
    cfg = Config.from_yaml(best)
    trials = {p.name: Config.from_yaml(p / "config.yaml") for p in (sweep["dir"] / "trials").iterdir()}
    assert any((t.alpha, t.beta, t.lam, t.eta) == (cfg.alpha, cfg.beta, cfg.lam, cfg.eta) for t in trials.values())
    out = sweep["root"] / "best-run"
    assert train_main(["--config", str(best), "--out", str(out), "--mlflow", "false"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["results"]["student"]["episodes"] == cfg.test_episodes
