"""Local (single-process) meta-training on the real Omniglot data."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsmd_ray.checkpoint import load_checkpoint
from tsmd_ray.config import Config
from tsmd_ray.train import run

TINY = dict(backend="local", mlflow=False, teacher="conv4", teacher_widths=[16, 16, 16, 16],
            student_widths=[8, 8, 8, 8], meta_batch=4, inner_steps=2, eval_every=0, test_episodes=40,
            query=5)


def tiny(tmp_path, dataset, **changes) -> Config:
    return Config(**{**TINY, "data_root": str(dataset), "out": str(tmp_path), **changes})


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, omniglot_dataset):
    """A short real meta-training of the paper's Conv-4 student (5-way 1-shot, MAML)."""
    out = tmp_path_factory.mktemp("student")
    cfg = Config(backend="local", mlflow=False, method="student", data_root=str(omniglot_dataset),
                 out=str(out), iterations=40, meta_batch=4, query=10, eval_every=20, val_episodes=20,
                 test_episodes=200)
    return cfg, run(cfg)


def test_meta_training_lifts_student_far_above_chance(student_run):
    # Chance is 20% for 5-way. 40 iterations of MAML (160 tasks) on the 163 training characters
    # reach about 75% on the two held-out alphabets; the bar, 55% (nearly three times chance),
    # leaves room for run-to-run noise while failing any model that did not learn.
    cfg, result = student_run
    student = result["results"]["student"]
    assert student["episodes"] == 200
    assert student["mean"] - student["ci95"] > 0.55, student


def test_outputs_are_written(student_run):
    cfg, result = student_run
    outdir = Path(cfg.out)
    assert json.loads((outdir / "evaluation.json").read_text()) == result
    lines = (outdir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[19])["val/student_acc"] > 0.2
    payload = load_checkpoint(outdir / "checkpoint.pt")
    assert payload["iteration"] == cfg.iterations - 1
    assert Config.from_dict(payload["config"]) == cfg


def test_evaluate_cli_prints_ci_and_json(student_run, tmp_path):
    cfg, _ = student_run
    proc = subprocess.run([sys.executable, "-m", "tsmd_ray.evaluate", "--checkpoint", f"{cfg.out}/checkpoint.pt",
                           "--episodes", "30", "--backend", "local", "--json", str(tmp_path / "e.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "student:" in proc.stdout and "+-" in proc.stdout
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["results"]["student"]["episodes"] == 30
    assert 0.0 < result["results"]["student"]["ci95"] < 0.2


def test_fixed_teacher_is_never_updated(tmp_path, omniglot_dataset):
    cfg = tiny(tmp_path, omniglot_dataset, method="fixed-teacher", allow_random_teacher=True, iterations=2, test_episodes=4)
    run(cfg)
    trained = load_checkpoint(tmp_path / "checkpoint.pt")["learner"]["psi"]
    from tsmd_ray.engine import DataSpec, build_models

    initial, _ = build_models(cfg, DataSpec(1, 28))
    for name, value in initial.state_dict().items():
        assert torch.equal(trained[name], value), name


def test_tsmd_updates_both_and_resume_reproduces_the_trajectory(tmp_path, omniglot_dataset):
    straight = tiny(tmp_path / "a", omniglot_dataset, iterations=4, test_episodes=4)
    run(straight)
    first = tiny(tmp_path / "b", omniglot_dataset, iterations=2, test_episodes=4)
    run(first)
    run(first.replace(iterations=4, resume=True))
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["learner"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["learner"]
    for key in ("psi", "theta"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert a["optimizers"]["psi"]["state"], "the teacher is meta-trained (Eq. 10a)"


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_from_iteration_0_starts_its_own_records(tmp_path, omniglot_dataset, caplog):
    cfg = tiny(tmp_path, omniglot_dataset, method="student", iterations=3, test_episodes=4)
    run(cfg)
    assert steps(tmp_path) == [1, 2, 3, 3]  # the last record is the test's
    (tmp_path / "checkpoint.pt").unlink()  # e.g. records kept, checkpoint lost with a machine
    with caplog.at_level("WARNING", logger="tsmd_ray.train"):
        result = run(cfg.replace(iterations=2, resume=True))
    assert steps(tmp_path) == [1, 2, 2]  # not the earlier run's records continued
    assert json.loads((tmp_path / "evaluation.json").read_text()) == result
    assert "(no checkpoint.pt to resume from): removed the earlier run's metrics.jsonl, evaluation.json" in caplog.text
    run(cfg.replace(iterations=4, resume=True))  # a resumed run keeps them and goes on
    assert steps(tmp_path) == [1, 2, 2, 3, 4, 4]
    caplog.clear()
    with caplog.at_level("WARNING", logger="tsmd_ray.train"):
        run(cfg.replace(iterations=1, resume=False))  # a new run in the same folder replaces the earlier one
    assert steps(tmp_path) == [1, 1]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 0
    assert "(resume is off): removed the earlier run's checkpoint.pt, metrics.jsonl, evaluation.json" in caplog.text


@pytest.mark.parametrize("method", ["oracle", "student"])
def test_reptile_variants_run(tmp_path, omniglot_dataset, method):
    result = run(tiny(tmp_path, omniglot_dataset, method=method, meta_algorithm="reptile", iterations=2,
                      test_episodes=4))
    model = "teacher" if method == "oracle" else "student"
    assert set(result["results"]) == {model}


def test_nan_loss_stops_with_iteration_and_keeps_last_checkpoint(tmp_path, omniglot_dataset, caplog):
    cfg = tiny(tmp_path, omniglot_dataset, method="student", iterations=6, checkpoint_every=1)
    run(cfg.replace(iterations=2))
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match=r"non-finite .* at iteration 2.*iteration 1\) is kept"):
        run(cfg.replace(resume=True, lam=1e38))
    # resuming under another learning rate is allowed (after a NaN, the advice is to lower it), and said
    assert re.search(r"resuming .*checkpoint.pt under other lam than it was trained with \(lam 0.1 -> 1e\+38\)",
                     caplog.text)
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["iteration"] == good["iteration"] == 1


def test_train_cli_names_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tsmd_ray.train", "--alpha", "-1", "--backend", "local"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "alpha must be a positive" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tsmd_ray.train", "--backend", "local", "--data-root",
                           str(tmp_path / "nowhere"), "--mlflow", "false"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--data-root" in proc.stderr


def test_early_stopping_tests_the_best_validated_weights(tmp_path, omniglot_dataset):
    """patience=1: training stops at the first validation that does not beat the best one, and the
    test uses best.pt's weights (an absurd outer rate makes validation accuracy bounce early)."""
    cfg = tiny(tmp_path, omniglot_dataset, method="student", iterations=30, eval_every=2, val_episodes=8,
               patience=1, test_episodes=8, eta=0.5, checkpoint_every=100)
    result = run(cfg)
    curve = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validations = [(m["step"], m["val/student_acc"]) for m in curve if "val/student_acc" in m]
    best_step, best = max(validations, key=lambda v: v[1])
    assert len(validations) < 15, "stopped before the last iteration"
    assert validations[-1][1] <= best and validations[-2][1] == best
    assert result["tested_iteration"] == best_step
    best_payload = load_checkpoint(tmp_path / "best.pt")
    assert best_payload["iteration"] + 1 == best_step
    from tsmd_ray.evaluate import evaluate_checkpoint

    again = evaluate_checkpoint(str(tmp_path / "best.pt"), episodes=8, split="test")
    assert again["results"]["student"]["per_episode"] == result["results"]["student"]["per_episode"]

    # Resuming under a higher cap does not train a run that early stopping ended: same test, no new steps.
    stopped_at = load_checkpoint(tmp_path / "checkpoint.pt")["iteration"]
    trained = (tmp_path / "metrics.jsonl").read_text().count("train/student/loss")
    resumed = run(cfg.replace(iterations=60, resume=True))
    assert resumed["tested_iteration"] == best_step
    assert resumed["results"]["student"]["per_episode"] == result["results"]["student"]["per_episode"]
    assert (tmp_path / "metrics.jsonl").read_text().count("train/student/loss") == trained == stopped_at + 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == stopped_at
