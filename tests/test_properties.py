"""Property-based (hypothesis): a generated request either runs to the end, or is refused before
anything starts with exit 2 and one line naming a key at fault; never a traceback (exit 1) and
never an MLflow run left RUNNING. Requests are a valid tiny base with one or two keys changed to
values that are valid, out of range, of the wrong type, or at odds with another key. A fixed,
derandomised example budget keeps it within CI time: most examples are refused (fast), a few train
one iteration of tiny models (or run one Tune trial) against the session's real MLflow server.
"""
from __future__ import annotations

import logging
import math
from itertools import count
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tsmd_ray import train
from tsmd_ray import tune as tsmd_tune

EXPERIMENT = "test-properties"
TINY = dict(method="tsmd", dataset="omniglot", teacher="conv4", teacher_widths=[4, 4, 4, 4],
            student_widths=[4, 4, 4, 4], iterations=1, meta_batch=2, inner_steps=1, query=1, eval_every=0,
            val_episodes=2, test_episodes=2, checkpoint_every=1, backend="local", mlflow=True,
            system_metrics=False, experiment=EXPERIMENT)
# one change each: valid alternatives, out of range, wrong types, combinations the run cannot honour
CONFIG_CHANGES = [
    {"iterations": 0}, {"iterations": "2"}, {"iterations": 2}, {"eval_every": 1}, {"eval_every": -1},
    {"patience": 1}, {"patience": 2, "eval_every": 5}, {"checkpoint_every": 0}, {"checkpoint_every": 5},
    {"meta_batch": 0}, {"meta_batch": 1}, {"vmap_chunk": 2}, {"vmap_chunk": 3}, {"ways": 1}, {"ways": 3},
    {"ways": 500}, {"shots": 0}, {"shots": 30}, {"query": 40}, {"inner_steps": -1}, {"inner_steps": 0},
    {"method": "student"}, {"method": "oracle"}, {"method": "fixed-teacher"}, {"method": "maml"},
    {"kd_loss": "rkd"}, {"kd_loss": "l2"}, {"kd_weight": -1.0}, {"kd_weight": math.nan}, {"kd_weight": 0.0},
    {"learn_to_teach": True}, {"learn_to_teach": "yes"}, {"alpha": 0.0}, {"alpha": "fast"}, {"eta": "1e-3"},
    {"meta_algorithm": "reptile"}, {"task_batching": "gpu"}, {"device": "tpu"}, {"device": "cuda:7"},
    {"gpus_per_worker": 0.5, "device": "cpu"}, {"gpus_per_worker": -1.0},
    {"backend": "ray", "workers": 100_000}, {"aggregation": "allreduce"}, {"teacher": "resnet9000"},
    {"student_widths": [4, 4]}, {"student_widths": []}, {"teacher_widths": [0, 4, 4, 4]},
    {"teacher_init": "missing-teacher.pt"}, {"dataset": "cifar_fs"}, {"alpah": 0.1}, {"threads_per_worker": 0},
]


def _changed(base: dict[str, Any], changes: list[dict[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """``base`` with ``changes`` applied, and the keys they change (nested ones included)."""
    request, keys = dict(base), set()
    for change in changes:
        request.update(change)
        for key, value in change.items():
            keys.add(key)
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                keys |= {k for k, v in value.items() if base[key].get(k, object()) != v}
    return request, keys


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def _check_outcome(rc: int, caplog: pytest.LogCaptureFixture, keys: set[str]) -> None:
    """Ran (0), or refused (2) with one error line that names a changed key; nothing else."""
    errors = _errors(caplog)
    assert rc in (0, 2), [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    if rc == 2:
        assert len(errors) == 1, [r.getMessage() for r in errors]
        line = errors[0].getMessage()
        assert "\n" not in line and any(key in line for key in keys), line
    else:
        assert not errors, [r.getMessage() for r in errors]


def _running_runs(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    return [run.info.run_name for run in runs]


@pytest.fixture(scope="module")
def workspace(mlflow_server, omniglot_dataset, tmp_path_factory):
    """A folder per example, runs tracked on the session's MLflow server, data from the prepared copy."""
    root, numbers = tmp_path_factory.mktemp("properties"), count()
    with pytest.MonkeyPatch.context() as mp:
        # no cluster named from outside: a request too large for this machine is refused, not queued
        for key, value in {"MLFLOW_TRACKING_URI": mlflow_server, "TSMD_DATA_ROOT": str(omniglot_dataset),
                           "RAY_ADDRESS": ""}.items():
            mp.setenv(key, value)
        yield lambda: root / f"example{next(numbers)}", mlflow_server


# a fixed budget, the same examples on every run (CI), no shrinking unless an example fails
PROPERTY = dict(deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(**PROPERTY, max_examples=20)
@given(changes=st.lists(st.sampled_from(CONFIG_CHANGES), min_size=2, max_size=2))
@example(changes=[{"iterations": 2}])  # one that trains, whatever is generated
def test_a_config_trains_or_is_refused_in_one_line(workspace, caplog, changes):
    new_folder, uri = workspace
    folder = new_folder()
    folder.mkdir()
    request, keys = _changed({**TINY, "out": str(folder / "run")}, changes)
    (folder / "config.yaml").write_text(yaml.safe_dump(request))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = train.main(["--config", str(folder / "config.yaml")])
    _check_outcome(rc, caplog, keys)
    assert (folder / "run" / "evaluation.json").is_file() == (rc == 0)
    assert _running_runs(uri) == []


TINY_SPACE = dict(name="prop", samples=1, searcher="random", seed=0, experiment=EXPERIMENT,
                  scheduler={"grace_period": 1, "reduction_factor": 2}, resources={"driver_cpus": 1},
                  log_models=False, search={"lam": {"loguniform": [0.01, 0.5]}},
                  base={**TINY, "iterations": 2, "eval_every": 1, "meta_batch": 1})
SPACE_CHANGES = [
    {"scheduler": {"grace_period": 100}}, {"scheduler": {"grace_period": 1, "max_t": 50}},
    {"scheduler": {"grace_period": 0}}, {"scheduler": {"reduction_factor": 1}}, {"scheduler": {"type": "hyperband"}},
    {"scheduler": {"type": "fifo"}}, {"metric": "val/teacher_acc"}, {"metric": "val/oracle_acc"},
    {"metric": "train/student/loss"}, {"mode": "maximise"}, {"samples": 0}, {"searcher": "grid"},
    {"search": {"lam": {"loguniform": [0.5, 0.01]}}}, {"search": {"lam": {"loguniform": [0.0, 0.5]}}},
    {"search": {"lam": {"uniform": [-1.0, 0.5]}}}, {"search": {"lamda": {"uniform": [0.1, 0.5]}}},
    {"search": {"kd_temperature": {"choice": [1.0, 4.0]}}, "base": {**TINY_SPACE["base"], "method": "student"}},
    {"search": {"inner_steps": {"randint": [1, 3]}}}, {"search": {"lam": {"normal": [0.1, 0.5]}}},
    {"base": {**TINY_SPACE["base"], "eval_every": 5}}, {"base": {**TINY_SPACE["base"], "eval_every": 0}},
    {"base": {**TINY_SPACE["base"], "val_episodes": 0}}, {"base": {**TINY_SPACE["base"], "iterations": "two"}},
    {"resources": {"driver_cpus": 100_000}}, {"resources": {"driver_gpus": -1}}, {"resources": {"memory": 1}},
    {"max_concurrent": -1}, {"serach": {}},
]


@settings(**PROPERTY, max_examples=10)
@given(changes=st.lists(st.sampled_from(SPACE_CHANGES), min_size=1, max_size=2))
@example(changes=[{"scheduler": {"type": "fifo"}}])  # one sweep that runs its trial
def test_a_space_runs_its_trial_or_is_refused_in_one_line(ray_cluster, workspace, caplog, changes):
    new_folder, uri = workspace
    folder = new_folder()
    folder.mkdir()
    space, keys = _changed(TINY_SPACE, changes)
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = tsmd_tune.main(["--space", str(folder / "space.yaml"), "--storage", str(folder / "sweeps")])
    _check_outcome(rc, caplog, keys)
    assert (folder / "sweeps").exists() == (rc == 0)  # refused: nothing written
    assert _running_runs(uri) == []
