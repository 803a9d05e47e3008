"""Distillation diagnostics on a tiny meta-trained TSMD pair (real Omniglot episodes)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tsmd_ray.algorithms import Outputs
from tsmd_ray.config import Config
from tsmd_ray.diagnostics import diagnose, format_diagnostics, main, soft_targets
from tsmd_ray.train import run


@pytest.fixture(scope="module")
def tsmd_checkpoint(omniglot_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("tsmd")
    run(Config(backend="local", mlflow=False, method="tsmd", teacher="conv4", teacher_widths=[8] * 4,
               student_widths=[4] * 4, data_root=str(omniglot_dataset), out=str(out), iterations=2, meta_batch=2,
               inner_steps=2, query=2, eval_every=0, test_episodes=2))
    return str(out / "checkpoint.pt")


def test_gradients_and_soft_targets_are_measured_per_inner_step(tsmd_checkpoint):
    result = diagnose(tsmd_checkpoint, "val", episodes=3)
    assert [s["step"] for s in result["steps"]] == [0, 1, 2]
    for step in result["steps"]:
        assert step["kd_grad_norm"]["mean"] > 0 and step["ce_grad_norm"]["mean"] > 0
        assert -1.0 <= step["cosine"]["mean"] <= 1.0
    assert 0.0 < result["soft_targets"]["off_target_mass"]["mean"] < 1.0
    assert set(result["accuracy"]) == {"with_kd", "without_kd", "teacher", "with_kd_minus_without"}
    assert "KD/CE" in format_diagnostics(result)


def test_zero_kd_weight_means_no_kd_gradient_and_no_accuracy_change(tsmd_checkpoint):
    result = diagnose(tsmd_checkpoint, "val", episodes=3, kd_weight=0.0)
    assert all(step["kd_grad_norm"]["mean"] == 0.0 for step in result["steps"])
    difference = result["accuracy"]["with_kd_minus_without"]
    assert difference["mean"] == 0.0 and difference["ci95"] == 0.0


def test_kd_views_enter_the_kd_gradient_and_not_the_support_targets(tsmd_checkpoint):
    """The views use the support set's batch-norm statistics: the support rows (the teacher's soft
    targets, the student's CE) are as without views, up to float32 rounding."""
    plain, viewed = (diagnose(tsmd_checkpoint, "val", episodes=3, kd_views=views) for views in (0, 2))
    assert "teacher_views_acc" not in plain["soft_targets"]
    assert 0.0 <= viewed["soft_targets"]["teacher_views_acc"]["mean"] <= 1.0
    for name, summary in plain["soft_targets"].items():
        assert viewed["soft_targets"][name]["mean"] == pytest.approx(summary["mean"], rel=1e-4), name
    first = [run["steps"][0] for run in (plain, viewed)]
    assert first[1]["ce_grad_norm"]["mean"] == pytest.approx(first[0]["ce_grad_norm"]["mean"], rel=1e-4)
    assert first[1]["kd_grad_norm"]["mean"] != pytest.approx(first[0]["kd_grad_norm"]["mean"], rel=1e-2)


def test_the_command_line_measures_with_views(tsmd_checkpoint, tmp_path):
    out = tmp_path / "d.json"
    assert main(["--checkpoint", tsmd_checkpoint, "--episodes", "2", "--kd-views", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["kd_views"] == 2


def test_hotter_soft_targets_carry_more_off_target_mass(tsmd_checkpoint):
    cold, hot = (diagnose(tsmd_checkpoint, "val", episodes=3, kd_temperature=t)["soft_targets"]["off_target_mass"]
                 for t in (1.0, 8.0))
    assert hot["mean"] > cold["mean"]


def test_a_student_only_checkpoint_is_refused(omniglot_dataset, tmp_path):
    run(Config(backend="local", mlflow=False, method="student", student_widths=[4] * 4,
               data_root=str(omniglot_dataset), out=str(tmp_path), iterations=1, meta_batch=2, inner_steps=1,
               query=2, eval_every=0, test_episodes=2))
    assert main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--episodes", "2"]) == 2


def test_a_fixed_teacher_reports_no_soft_targets_and_no_teacher_accuracy(omniglot_dataset, tmp_path):
    """RKD from a fixed teacher: its head is never trained, so its predictions (chance level) are not
    reported; the KD gradient and the with/without comparison are."""
    run(Config(backend="local", mlflow=False, method="fixed-teacher", teacher="conv4", teacher_widths=[8] * 4,
               student_widths=[4] * 4, data_root=str(omniglot_dataset), out=str(tmp_path), iterations=1,
               meta_batch=2, inner_steps=2, query=2, eval_every=0, test_episodes=2, allow_random_teacher=True))
    result = diagnose(str(tmp_path / "checkpoint.pt"), "val", episodes=2)
    assert result["kd_loss"] == "rkd" and result["soft_targets"] == {}
    assert set(result["accuracy"]) == {"with_kd", "without_kd", "with_kd_minus_without"}
    assert all(step["kd_grad_norm"]["mean"] > 0 for step in result["steps"])
    assert "no soft targets: rkd" in format_diagnostics(result)


def test_the_views_targets_are_scored_against_their_images_labels():
    """Views are view-major (row v * N + i is view v of support image i): a teacher that names each
    view's image's label is 100% accurate on them, and one that names the image-major order is not."""
    y = torch.tensor([0, 1, 2, 3, 4])
    rows = torch.cat([y, y.repeat(3)])
    right = soft_targets(Outputs(30.0 * F.one_hot(rows, 5).float(), torch.zeros(20, 1)), y, 1.0)
    assert right["teacher_views_acc"] == 1.0 and right["views_off_target_mass"] < 1e-6
    wrong = torch.cat([y, y.repeat_interleave(3)])
    shifted = soft_targets(Outputs(30.0 * F.one_hot(wrong, 5).float(), torch.zeros(20, 1)), y, 4.0)
    assert shifted["teacher_support_acc"] == 1.0 and shifted["teacher_views_acc"] == pytest.approx(3 / 15)
    assert shifted["views_off_target_mass"] > shifted["off_target_mass"]
