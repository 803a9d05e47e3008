"""How entry points end: a refused request is one line and exit 2 before anything starts (the
inventory in docs/errors.md, example by example); a failure, Ctrl+C (SIGINT) or kill (SIGTERM)
of a real process ends every MLflow run it opened (FAILED or KILLED, the error as a tag) with one
line and exit 1, 130 or 143; nothing is left RUNNING on the real MLflow server."""
from __future__ import annotations

import ast
import importlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tsmd_ray import errors, train
from tsmd_ray import tune as tsmd_tune

ROOT = Path(__file__).resolve().parent.parent
INVENTORY = ROOT / "docs" / "errors.md"
TINY = ["--backend", "local", "--teacher", "conv4", "--teacher-widths", "4", "4", "4", "4", "--student-widths",
        "4", "4", "4", "4", "--meta-batch", "1", "--inner-steps", "1", "--query", "1", "--test-episodes", "2",
        "--no-system-metrics"]


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def runs_of(uri: str, experiment: str) -> list:
    found = client(uri).get_experiment_by_name(experiment)
    return client(uri).search_runs([found.experiment_id]) if found else []


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


# ---------------------------------------------------------------------- the inventory, example by example
def inventory_rows() -> list[tuple[str, str, str]]:
    """``(rule, example command, message)`` of each row of the inventory's table."""
    rows = []
    for line in INVENTORY.read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 4 and cells[2].startswith("`python -m "), line
            rows.append((cells[0].strip("`"), cells[2].strip("`"), cells[3].strip("`")))
    return rows


def code_rules() -> set[str]:
    """Every rule a ``RequestError("rule", ...)`` of the package names."""
    rules = set()
    for path in (ROOT / "tsmd_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RequestError" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                rules.add(node.args[0].value)
    return rules


def test_every_refusal_rule_is_in_the_inventory():
    documented = {rule for rule, _, _ in inventory_rows()}
    assert code_rules() <= documented, sorted(code_rules() - documented)
    assert documented - code_rules() <= {"argparse", "CheckpointError", "ClientError", "DataError",
                                         "FileNotFoundError"}


# the inventory's $TMP/NAME.yaml: tune_spaces/omniglot.yaml with one change
SPACE_VARIANTS = {"mode": {"mode": "maximise"}, "bounds": {"search": {"lam": {"loguniform": [0.5, 0.01]}}},
                  "metric": {"metric": "val/oracle_acc"}, "scheduler": {"scheduler": {"reduction_factor": 1}}}


@pytest.fixture(scope="module")
def inventory_env(omniglot_dataset, tmp_path_factory):
    """What the inventory's examples refer to: ``$TSMD_DATA_ROOT`` (the prepared Omniglot),
    ``$CHECKPOINT`` (a student-only checkpoint), ``$A_LIST_YAML`` (a YAML file holding a list),
    ``$TMP`` (a folder with the space variants and a sweep that exists) and the checkout's files."""
    tmp = tmp_path_factory.mktemp("inventory")
    assert train.main([*TINY, "--method", "student", "--iterations", "1", "--eval-every", "0", "--no-mlflow",
                       "--data-root", str(omniglot_dataset), "--out", str(tmp / "student")]) == 0
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    space = yaml.safe_load((ROOT / "tune_spaces" / "omniglot.yaml").read_text())
    for name, change in SPACE_VARIANTS.items():
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump({**space, **change}))
    (tmp / "sweeps" / space["name"]).mkdir(parents=True)
    (tmp / "sweeps" / space["name"] / "tuner.pkl").write_bytes(b"")  # what Tune looks for to resume
    work = tmp / "checkout"  # the examples' relative paths, in a folder where nothing of the checkout is written
    work.mkdir()
    for name in ("README.md", "tune_spaces"):
        (work / name).symlink_to(ROOT / name)
    return work, {"TSMD_DATA_ROOT": str(omniglot_dataset), "CHECKPOINT": str(tmp / "student" / "checkpoint.pt"),
                  "A_LIST_YAML": str(tmp / "list.yaml"), "TMP": str(tmp)}


@pytest.mark.timeout(120)  # a refusal is fast; an example that is not refused would start training
@pytest.mark.parametrize("rule, command, message", inventory_rows(), ids=[r[0] for r in inventory_rows()])
def test_inventory_example_is_refused_with_its_message(rule, command, message, inventory_env, monkeypatch,
                                                       caplog, capsys):
    cwd, env = inventory_env
    monkeypatch.chdir(cwd)
    for key, value in {**env, "RAY_ADDRESS": ""}.items():  # resources: this machine's, not a cluster's
        monkeypatch.setenv(key, value)
    module, *argv = shlex.split(os.path.expandvars(command.removeprefix("python -m ")))
    main = importlib.import_module(module).main
    caplog.clear()
    with caplog.at_level(logging.INFO):
        if rule == "argparse":  # argparse's own usage error: usage, then one error line
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            assert exit_info.value.code == errors.EXIT_REFUSED
            lines = capsys.readouterr().err.strip().splitlines()[-1:]
        else:
            assert main(argv) == errors.EXIT_REFUSED
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines
    pattern = ".*".join(re.escape(part) for part in message.split("…"))
    assert re.fullmatch(pattern, lines[0]), (lines[0], message)


# ---------------------------------------------------------------------- failures after the start
def test_a_failed_training_ends_its_run_failed_with_the_error(mlflow_server, omniglot_dataset, tmp_path,
                                                             monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with caplog.at_level(logging.INFO):
        rc = train.main([*TINY, "--method", "student", "--lam", "1e30", "--iterations", "3", "--eval-every", "0",
                         "--data-root", str(omniglot_dataset), "--out", str(tmp_path), "--experiment", "errors-fail"])
    assert rc == errors.EXIT_FAILED
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and lines[0].startswith("failed: NonFiniteLossError: non-finite"), lines
    assert lines[0].endswith(errors.RESUME_HINT)
    (run,) = runs_of(mlflow_server, "errors-fail")
    assert run.info.status == "FAILED"
    assert run.data.tags["tsmd.error"].startswith("NonFiniteLossError: non-finite")


def test_a_sweep_that_dies_ends_its_runs_failed_and_says_resume(ray_cluster, mlflow_server, omniglot_dataset,
                                                                tmp_path, monkeypatch, caplog):
    """Ray's OOM killer ends Tuner.fit with this RuntimeError (a fault injected here): the sweep's
    run ends FAILED with the message, one line says what happened and that --resume continues."""
    from tsmd_ray.tune import driver

    oom = ("Caught unexpected exception: 2 worker(s) were killed due to the node running low on memory")

    class DyingTuner:
        def fit(self):
            raise RuntimeError(oom)

    monkeypatch.setattr(driver, "_tuner", lambda *args, **kwargs: DyingTuner())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(sweep_space("errors-oom", omniglot_dataset)))
    with caplog.at_level(logging.INFO):
        rc = tsmd_tune.main(["--space", str(space), "--storage", str(tmp_path / "sweeps")])
    assert rc == errors.EXIT_FAILED
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and oom in lines[0] and lines[0].endswith(errors.RESUME_HINT), lines
    (parent,) = runs_of(mlflow_server, "errors-oom")
    assert parent.info.status == "FAILED" and oom in parent.data.tags["tsmd.error"]


def sweep_space(experiment: str, dataset: Path, iterations: int = 2) -> dict:
    return {"name": "s", "samples": 1, "searcher": "random", "experiment": experiment, "log_models": False,
            "scheduler": {"type": "fifo"}, "resources": {"driver_cpus": 1},
            "search": {"lam": {"loguniform": [0.05, 0.1]}},
            "base": {"method": "student", "student_widths": [4, 4, 4, 4], "meta_batch": 1, "inner_steps": 1,
                     "query": 1, "iterations": iterations, "eval_every": 1, "val_episodes": 1, "test_episodes": 2,
                     "backend": "local", "data_root": str(dataset), "system_metrics": False}}


# ---------------------------------------------------------------------- Ctrl+C and kill of real processes
def start(args: list[str], uri: str, dataset: Path, cwd: Path) -> subprocess.Popen:
    """``python -m ARGS`` in its own process and session (what its Ray processes signal on their way
    out stays there), with SIGINT at its default (a shell may have ignored it)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TSMD_DATA_ROOT": str(dataset), "RAY_ADDRESS": ""}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_runs(uri: str, experiment: str, count: int, proc: subprocess.Popen, timeout: float = 240.0) -> list:
    """The experiment's RUNNING runs once ``count`` of them have logged a training metric."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        running = [r for r in runs_of(uri, experiment) if r.info.status == "RUNNING"]
        if sum(1 for r in running if any(k.startswith("train/") for k in r.data.metrics)) >= count:
            return running
        time.sleep(1.0)
    proc.kill()
    pytest.fail(f"no {count} training run(s) in {experiment} within {timeout} s: {proc.communicate()[1][-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_signal_ends_the_training_run_as_killed(signum, mlflow_server, omniglot_dataset, tmp_path):
    experiment = f"errors-train-{signum.name}"
    proc = start(["tsmd_ray.train", *TINY, "--method", "student", "--iterations", "100000", "--eval-every", "0",
                  "--checkpoint-every", "1", "--experiment", experiment, "--out", str(tmp_path / "run")],
                 mlflow_server, omniglot_dataset, tmp_path)
    wait_for_runs(mlflow_server, experiment, 1, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = error_lines(stderr)
    assert line.endswith(("interrupted (Ctrl+C)" if signum == signal.SIGINT else "terminated (SIGTERM)")
                         + "; " + errors.RESUME_HINT)
    (run,) = runs_of(mlflow_server, experiment)
    assert run.info.status == "KILLED" and run.data.tags["tsmd.error"] in line


def test_a_killed_sweep_ends_its_runs_and_resumes_into_them(mlflow_server, omniglot_dataset, tmp_path):
    """SIGTERM stops the sweep as Ctrl+C does (resumably): the sweep's run and its trial's nested run
    end KILLED; --resume continues in the same runs and finishes them."""
    experiment = "errors-sweep"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(sweep_space(experiment, omniglot_dataset, iterations=40)))
    args = ["tsmd_ray.tune", "--space", str(space), "--storage", str(tmp_path / "sweeps")]
    proc = start(args, mlflow_server, omniglot_dataset, tmp_path)
    running = wait_for_runs(mlflow_server, experiment, 1, proc)
    assert len(running) == 2  # the sweep's run and its trial's
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == errors.EXIT_TERMINATED, stderr[-3000:]
    assert error_lines(stderr)[-1].endswith("terminated (SIGTERM); " + errors.RESUME_HINT)
    killed = runs_of(mlflow_server, experiment)
    assert sorted(r.info.status for r in killed) == ["KILLED", "KILLED"]
    resumed = start([*args, "--resume"], mlflow_server, omniglot_dataset, tmp_path)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    finished = runs_of(mlflow_server, experiment)
    assert {r.info.run_id for r in finished} == {r.info.run_id for r in killed}  # the same runs, continued
    assert sorted(r.info.status for r in finished) == ["FINISHED", "FINISHED"]
