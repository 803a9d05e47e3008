"""Teacher pre-training on Ray Train (two CPU workers, real Omniglot) and fixed pretrained teachers."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision

from tsmd_ray.config import Config
from tsmd_ray.data import ArrowFewShotDataset
from tsmd_ray.engine import DataSpec, build_models
from tsmd_ray.models import build_model
from tsmd_ray.pretrain import build_parser, cached_pretrain, pretrain, pretrain_args
from tsmd_ray.train import run

TINY_TEACHER = ["--teacher", "conv4", "--teacher-widths", "8", "8", "8", "8"]


@pytest.fixture(scope="module")
def pretrained(ray_cluster, omniglot_dataset, tmp_path_factory):
    """Two epochs of two Ray Train workers; worker 1 raises once in the middle of epoch 1."""
    tmp = tmp_path_factory.mktemp("pretrain")
    args = build_parser().parse_args([
        "--dataset", "omniglot", "--data-root", str(omniglot_dataset), *TINY_TEACHER, "--epochs", "2",
        "--max-steps", "3", "--batch-size", "16", "--workers", "2", "--max-failures", "2",
        "--storage-path", str(tmp / "storage"), "--out", str(tmp / "teacher.pt"),
        "--fail-marker", str(tmp / "failed-once")])
    return tmp, pretrain(args)


def test_worker_failure_is_recovered_from_the_last_checkpoint(pretrained):
    tmp, summary = pretrained
    assert (tmp / "failed-once").is_file()  # the injected failure happened ...
    assert summary["epochs"] == 2  # ... and training still finished
    # the attempt that finished started at epoch 1: epoch 0 came from the checkpoint, not a rerun
    assert summary["metrics"]["start_epoch"] == 1
    assert json.loads((tmp / "teacher.pt.json").read_text())["num_classes"] == 163


def test_weights_match_the_teacher_and_load_into_meta_training(pretrained, omniglot_dataset, tmp_path):
    tmp, _ = pretrained
    state = torch.load(tmp / "teacher.pt", weights_only=True)
    teacher = build_model("conv4", 5, 1, 28, widths=(8, 8, 8, 8))
    own = teacher.state_dict()
    assert set(state) == set(own)
    assert state["head.weight"].shape == (163, 8)  # the pre-training head; psi gets a 5-way one
    assert all(state[k].shape == own[k].shape for k in own if not k.startswith("head."))

    cfg = Config(backend="local", mlflow=False, method="tsmd", data_root=str(omniglot_dataset), out=str(tmp_path),
                 teacher="conv4", teacher_widths=[8, 8, 8, 8], student_widths=[4, 4, 4, 4],
                 teacher_init=str(tmp / "teacher.pt"), iterations=2, meta_batch=2, inner_steps=1, query=2,
                 eval_every=0, test_episodes=4)
    psi, _ = build_models(cfg, DataSpec(1, 28))
    assert torch.equal(psi.state_dict()["features.0.0.weight"], state["features.0.0.weight"])
    assert psi.head.weight.shape == (5, 8)
    result = run(cfg)
    assert result["results"]["student"]["episodes"] == 4
    # the run records which teacher file it started from; a resume keeps that, not the path's new bytes
    sha = hashlib.sha256((tmp / "teacher.pt").read_bytes()).hexdigest()
    assert result["teacher_init_sha256"] == sha
    assert json.loads((tmp_path / "evaluation.json").read_text())["teacher_init_sha256"] == sha
    moved = tmp_path / "teacher-copy.pt"
    torch.save({k: v + 1 for k, v in state.items()}, moved)
    resumed = run(cfg.replace(teacher_init=str(moved), iterations=3, resume=True))
    assert resumed["teacher_init_sha256"] == sha != hashlib.sha256(moved.read_bytes()).hexdigest()


def test_existing_run_needs_resume(pretrained, omniglot_dataset):
    tmp, _ = pretrained
    args = build_parser().parse_args(["--data-root", str(omniglot_dataset), *TINY_TEACHER,
                                      "--storage-path", str(tmp / "storage"),
                                      "--name", "pretrain-omniglot-conv4-8-8-8-8"])
    with pytest.raises(ValueError, match="holds a previous pre-training run; accepted: --resume"):
        pretrain(args)


def test_torchvision_model_from_a_local_file_is_a_fixed_rkd_teacher(omniglot_dataset, tmp_path):
    """Table 2: a torchvision classifier's weights file (any head size) serves as a fixed teacher."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    net.train()
    with torch.no_grad():  # give batch norm non-trivial running statistics
        net(torch.randn(8, 3, 32, 32))
    net.eval()
    weights = tmp_path / "mobilenet_v3_small.pth"
    torch.save(net.state_dict(), weights)
    saved = torch.load(weights, weights_only=True)

    cfg = Config(backend="local", mlflow=False, method="fixed-teacher", data_root=str(omniglot_dataset),
                 out=str(tmp_path / "run"), teacher="mobilenet_v3_small", teacher_weights=str(weights),
                 student_widths=[4, 4, 4, 4], iterations=2, meta_batch=2, inner_steps=1, query=2, eval_every=0,
                 test_episodes=4)
    assert cfg.resolved_kd_loss == "rkd"
    from tsmd_ray.data import resolve_dataset
    from tsmd_ray.training import LocalRunner, Trainer

    path = resolve_dataset("omniglot", str(omniglot_dataset), cfg.cache_dir)
    dataset = ArrowFewShotDataset(path)
    runner = LocalRunner(cfg, path)
    trainer = Trainer(cfg, runner, DataSpec.of(dataset), dataset.meta)
    teacher = trainer.learner.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.learner.student.state_dict().items()}
    for key, value in saved.items():  # the body is the saved network, running statistics included
        if not key.startswith("classifier.3."):
            assert torch.equal(before[f"body.{key}"], value), key
    result = trainer.fit()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # never updated
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in trainer.learner.student.state_dict().items())
    assert set(result["results"]) == {"student"}  # the fixed teacher's N-way head is random: not scored
    assert "psi" not in trainer.learner.optimizers


def test_cli_rejects_bad_values():
    from tsmd_ray.pretrain import main

    assert main(["--epochs", "0"]) == 2
    assert main(["--lr", "-1"]) == 2
    assert main(["--teacher", "resnet9000", "--backend", "local"]) == 2  # before anything is written
    assert not Path("runs/pretrain/pretrain-omniglot-resnet9000").exists()
    assert isinstance(build_parser().parse_args([]), argparse.Namespace)
    with pytest.raises(ValueError, match="unknown pre-training setting.*epoch$"):
        pretrain_args(epoch=3)


@pytest.mark.parametrize("argv, augment", [([], True), (["--no-augment"], False), (["--augment", "false"], False),
                                           (["--augment"], True)])
def test_augment_flag_in_both_forms(argv, augment):
    assert build_parser().parse_args(argv).augment is augment


def local_args(dataset, tmp, **changes) -> argparse.Namespace:
    return pretrain_args(**{"data_root": str(dataset), "cache_dir": str(tmp / "cache"), "teacher": "conv4",
                            "teacher_widths": [8, 8, 8, 8], "epochs": 2, "max_steps": 2, "batch_size": 16,
                            "backend": "local", "storage_path": str(tmp / "storage"), "out": str(tmp / "t.pt"),
                            **changes})


def test_local_backend_trains_and_resumes_without_ray(omniglot_dataset, tmp_path):
    summary = pretrain(local_args(omniglot_dataset, tmp_path))
    assert summary["backend"] == "local" and summary["workers"] == 1 and summary["epochs"] == 2
    state = torch.load(tmp_path / "t.pt", weights_only=True)
    assert state["head.weight"].shape == (163, 8)
    resumed = pretrain(local_args(omniglot_dataset, tmp_path, epochs=3, resume=True))
    assert resumed["epochs"] == 3 and resumed["metrics"]["start_epoch"] == 2  # only the third epoch ran


def test_cached_pretrain_reuses_a_teacher_of_the_same_settings(omniglot_dataset, tmp_path):
    first = cached_pretrain(local_args(omniglot_dataset, tmp_path))
    again = cached_pretrain(local_args(omniglot_dataset, tmp_path))
    other = cached_pretrain(local_args(omniglot_dataset, tmp_path, lr=0.01))
    assert not first["cached"] and again["cached"] and not other["cached"]
    assert again["out"] == first["out"] != other["out"]
    assert first["out"].startswith(str(tmp_path / "cache" / "teachers" / "omniglot-conv4-"))
