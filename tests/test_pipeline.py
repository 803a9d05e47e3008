"""``make train``'s pipeline at a tiny size on real Ray and the real Omniglot data: pre-train the
teacher (Ray Train), meta-train TSMD with ``--teacher-init``, meta-test, and the student alone."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from tsmd_ray import pipeline
from tsmd_ray.checkpoint import load_checkpoint
from tsmd_ray.config import Config
from tsmd_ray.pretrain import cached_pretrain, pretrain_args

TINY_PROFILE = {
    "profile": "tiny",
    "pretrain": {"epochs": 1, "max_steps": 3, "batch_size": 16, "workers": 2},
    "train": {"method": "tsmd", "teacher": "conv4", "teacher_widths": [8, 8, 8, 8], "student_widths": [4, 4, 4, 4],
              "iterations": 2, "meta_batch": 2, "inner_steps": 1, "query": 2, "eval_every": 0, "test_episodes": 4,
              "backend": "ray", "workers": 2, "mlflow": False},
    "baseline": {"iterations": 1},
}


def write_profile(tmp_path, **changes) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_PROFILE, **changes}))
    return str(path)


def plan_of(*argv: str) -> pipeline.Plan:
    return pipeline.make_plan(pipeline.build_parser().parse_args(list(argv)))


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, omniglot_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    argv = ["--config", write_profile(tmp), "--data-root", str(omniglot_dataset), "--cache-dir", str(tmp / "cache"),
            "--out", str(tmp / "run")]
    return tmp, argv, pipeline.main(argv)


def test_tiny_pipeline_pretrains_meta_trains_and_evaluates(tiny_run, capsys):
    tmp, _, status = tiny_run
    assert status == 0
    record = json.loads((tmp / "run" / pipeline.RESULT_FILE).read_text())
    teacher = record["teacher"]
    assert not teacher["cached"] and teacher["backend"] == "ray" and teacher["workers"] == 2
    assert teacher["out"].startswith(str(tmp / "cache" / "teachers" / "omniglot-conv4-"))
    # meta-training started from the pre-trained teacher (its body; the head is a new 5-way one)
    cfg = Config.from_yaml(tmp / "run" / "config.yaml")
    assert cfg.teacher_init == teacher["out"] and cfg.profile == "tiny"
    assert set(record["train"]["results"]) == {"teacher", "student"}
    assert record["train"]["results"]["student"]["episodes"] == 4
    baseline = Config.from_yaml(tmp / "run-student" / "config.yaml")
    assert baseline.method == "student" and baseline.iterations == 1 and baseline.profile == "tiny"
    assert set(record["baseline"]["results"]) == {"student"}
    difference = pipeline.paired_difference(record["train"], record["baseline"])
    per_episode = zip(record["train"]["results"]["student"]["per_episode"],
                      record["baseline"]["results"]["student"]["per_episode"])
    assert difference["mean"] == pytest.approx(sum(a - b for a, b in per_episode) / 4)
    assert "alone (MAML), for comparison" in pipeline.format_results(record)
    assert "taught minus alone, paired over the same episodes" in pipeline.format_results(record)
    assert set(record["seconds"]) == {"pretrain", "train", "baseline", "total"}
    assert load_checkpoint(tmp / "run" / "checkpoint.pt")["iteration"] == 1


def test_output_names_the_profile_first_and_ends_with_next_steps(tiny_run, capsys):
    tmp, argv, _ = tiny_run
    assert pipeline.main(argv + ["--no-baseline"]) == 0  # the second run reuses the cached teacher
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"tsmd-ray: profile tiny, from {tmp / 'tiny.yaml'} (--config)"
    assert "pre-train the teacher" in out and "alone (MAML)" not in out
    assert "reused by the next run" in out
    record = json.loads((tmp / "run" / pipeline.RESULT_FILE).read_text())
    assert record["teacher"]["cached"] and "baseline" not in record
    results = out[out.index("Results"):]
    assert "teacher  conv4 8-8-8-8" in results and "student  conv4 4-4-4-4" in results and "+-" in results
    assert "paired" not in results  # no comparison run this time
    assert f"python -m tsmd_ray.evaluate --checkpoint {tmp / 'run' / 'checkpoint.pt'}" in out
    assert f"python -m tsmd_ray.adapt --checkpoint {tmp / 'run' / 'checkpoint.pt'}" in out
    assert f"python -m tsmd_ray.predict --model {tmp / 'run' / 'my_student'}" in out


def test_cached_teacher_is_the_one_the_pipeline_trained(tiny_run, omniglot_dataset):
    tmp, _, _ = tiny_run
    args = pretrain_args(**TINY_PROFILE["pretrain"], data_root=str(omniglot_dataset), cache_dir=str(tmp / "cache"),
                         teacher="conv4", teacher_widths=[8, 8, 8, 8], seed=0, backend="ray")
    summary = cached_pretrain(args)
    assert summary["cached"]
    assert torch.load(summary["out"], weights_only=True)["head.weight"].shape == (163, 8)


def test_profiles_shipped_in_configs_are_valid():
    laptop, gpu = plan_of("--profile", "laptop"), plan_of("--profile", "gpu")
    assert laptop.train.profile == "laptop" and gpu.train.profile == "gpu"
    assert laptop.pretrain["workers"] == 2 and gpu.pretrain["use_gpu"] is True
    for plan in (laptop, gpu):  # the paper's settings
        cfg = plan.train
        assert (cfg.method, cfg.inner_steps, cfg.beta, cfg.eta, cfg.resolved_kd_loss) == ("tsmd", 5, 1e-5, 1e-3, "kl")
        assert plan.baseline == {}
    assert gpu.train.test_episodes == 800 and not gpu.train.first_order_teacher  # the paper's protocol


def test_default_profile_follows_the_hardware():
    expected = "gpu" if torch.cuda.is_available() else "laptop"
    plan = plan_of()
    assert plan.profile == expected and plan.train.profile == expected
    assert ("no GPU found" in plan.source) != torch.cuda.is_available()


def test_flags_override_the_profile(tmp_path):
    plan = plan_of("--config", write_profile(tmp_path), "--iterations", "7", "--no-mlflow", "--no-baseline",
                   "--teacher-init", "t.pt")
    assert plan.train.iterations == 7 and plan.train.meta_batch == 2 and plan.baseline is None
    assert plan.pretrain is None  # a given teacher is not pre-trained again


def test_plain_config_file_is_trained_as_it_is(tmp_path):
    path = tmp_path / "mine.yaml"
    Config(method="student", iterations=3).to_yaml(path)
    plan = plan_of("--config", str(path))
    assert plan.profile == "config" and plan.train.profile == "config" and plan.train.iterations == 3
    assert plan.pretrain is None and plan.baseline is None


@pytest.mark.parametrize("content, message", [
    ({"base": {}, "settings": []}, "is a reproduce grid: run it with python -m tsmd_ray.reproduce"),
    ({**TINY_PROFILE, "extra": 1}, "unknown key.*extra"),
    ({**TINY_PROFILE, "pretrain": {"epoch": 1}}, "unknown pre-training setting.*epoch"),
])
def test_bad_profiles_get_one_line_naming_the_fault(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    assert pipeline.main(["--config", str(path)]) == 2
    assert capsys.readouterr().out == ""  # nothing ran


def test_unknown_profile_lists_the_known_ones(capsys):
    with pytest.raises(FileNotFoundError, match="profile file .*nope.yaml does not exist.*gpu, laptop"):
        plan_of("--profile", "nope")


def test_mlflow_line_shows_the_run():
    info = {"tracking_uri": "sqlite:////home/u/.tsmd_ray/mlflow.db", "experiment_id": "3", "run_id": "abc"}
    assert pipeline._mlflow_lines(info, "runs/x") == [
        "  mlflow ui --backend-store-uri sqlite:////home/u/.tsmd_ray/mlflow.db"
        "     # then open http://127.0.0.1:5000/#/experiments/3/runs/abc"]
    assert "open http://h:5000/#/experiments/3/runs/abc" in pipeline._mlflow_lines(
        {**info, "tracking_uri": "http://h:5000/"}, "runs/x")[0]
    assert "tracking upload runs/x" in pipeline._mlflow_lines({**info, "status": "pending_upload"}, "runs/x")[0]
    assert pipeline._mlflow_lines({}, "runs/x") == []
