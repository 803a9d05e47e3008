"""The one Config: YAML, validation, defaults."""
from dataclasses import fields

import pytest

from tsmd_ray.config import Config
from tsmd_ray.errors import RequestError


def test_yaml_round_trip_and_dashed_keys(tmp_path):
    cfg = Config(student_widths=[8, 8, 8, 8], kd_loss="rkd")
    cfg.to_yaml(tmp_path / "a.yaml")
    assert Config.from_yaml(tmp_path / "a.yaml") == Config.from_dict(cfg.to_dict())
    (tmp_path / "b.yaml").write_text("inner-steps: 3\n")
    assert Config.from_yaml(tmp_path / "b.yaml").inner_steps == 3


@pytest.mark.parametrize("changes,message", [
    ({"alpha": -1.0}, "alpha must be a positive"),
    ({"eta": float("nan")}, "eta must be a positive"),
    ({"ways": 1}, "ways must be at least 2"),
    ({"meta_batch": 0}, "meta_batch must be a positive"),
    ({"method": "maml"}, "method='maml' is not one of"),
    ({"kd_weight": -0.5}, "kd_weight must be zero or"),
])
def test_invalid_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(**changes)


def test_unknown_yaml_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("alpah: 0.1\n")
    with pytest.raises(ValueError, match="alpah"):
        Config.from_yaml(tmp_path / "c.yaml")


def test_method_properties():
    fixed = Config(method="fixed-teacher", teacher_init="teacher.pt")
    assert fixed.resolved_kd_loss == "rkd"
    assert Config(method="tsmd").resolved_kd_loss == "kl"
    assert not fixed.adapts_teacher
    assert not Config(method="student").has_teacher
    assert not Config(method="oracle").has_student


def test_fixed_teacher_needs_trained_weights_and_rkd():
    with pytest.raises(ValueError, match="--teacher-init"):
        Config(method="fixed-teacher")
    with pytest.raises(ValueError, match="kd_loss=kl"):
        Config(method="fixed-teacher", teacher_weights="w.pt", kd_loss="kl")
    assert Config(method="fixed-teacher", allow_random_teacher=True).resolved_kd_loss == "rkd"


def test_paper_defaults_are_marked_in_help():
    cfg = Config()
    assert (cfg.beta, cfg.eta, cfg.inner_steps, cfg.test_episodes) == (1e-5, 1e-3, 5, 800)
    helps = {f.name: f.metadata["help"] for f in fields(Config)}
    assert "[paper: 1e-5]" in helps["beta"] and "[ours" in helps["alpha"]


@pytest.mark.parametrize("changes, message", [
    ({"checkpoint_every": 0}, "checkpoint_every must be a positive integer, got 0"),
    ({"meta_batch": 4, "vmap_chunk": 8}, r"vmap_chunk must be between 0 \(all tasks at once\) and meta_batch \(4\)"),
    ({"patience": 2, "iterations": 20}, r"patience=2 needs meta-validation: eval_every must be between 1 and "
                                        r"iterations \(20\)"),
    ({"patience": 2, "eval_every": 5, "val_episodes": 0}, "val_episodes at least 1"),
    ({"learn_to_teach": True, "method": "fixed-teacher", "teacher_init": "t.pt"}, "learn_to_teach needs method=tsmd"),
    ({"learn_to_teach": True, "kd_weight": 0.0}, r"learn_to_teach needs method=tsmd and kd_weight > 0"),
    ({"kd_views": -1}, "kd_views must be zero or positive, got -1"),
    ({"kd_views": 2, "method": "oracle"}, r"kd_views needs a student \(tsmd, fixed-teacher, or student, whose views "
                                          r"take the labels\) and kd_weight > 0, got kd_views=2, method='oracle'"),
    ({"kd_views": 2, "method": "student", "kd_weight": 0.0}, "kd_views needs a student .* method='student', "
                                                             "kd_weight=0.0"),
    ({"kd_views": 2, "kd_weight": 0.0}, r"kd_views needs .* kd_weight > 0, got kd_views=2, method='tsmd', "
                                        r"kd_weight=0.0"),
    ({"kd_views": 1.0}, "kd_views must be an integer, got 1.0"),
    ({"kd_views": 17}, r"kd_views must be at most 16 \(each view .*\), got 17"),
    ({"gpus_per_worker": 1.0, "device": "cpu"}, "gpus_per_worker must be 0 with device=cpu, got 1.0"),
    ({"device": "gpu"}, "device='gpu' is not one of auto, cpu, cuda, cuda:N"),
    ({"iterations": "20"}, "iterations must be an integer, got '20'"),
    ({"iterations": 2.0}, "iterations must be an integer, got 2.0"),
    ({"learn_to_teach": "yes"}, "learn_to_teach must be true or false, got 'yes'"),
    ({"alpha": "fast"}, "alpha must be a number, got 'fast'"),
    ({"student_widths": [8, 0]}, r"student_widths must be a non-empty list of positive integers, got \[8, 0\]"),
    ({"alpah": 0.1}, r"unknown configuration key\(s\): alpah \(did you mean alpha\?\)"),
])
def test_types_and_combinations_are_refused_naming_the_key(changes, message):
    with pytest.raises(RequestError, match=message) as info:
        Config.from_dict(changes)
    assert "\n" not in str(info.value)


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("beta: 1e-5\neta: 2\n")  # YAML 1.1 reads 1e-5 as a string
    cfg = Config.from_yaml(tmp_path / "c.yaml")
    assert (cfg.beta, cfg.eta) == (1e-5, 2.0) and type(cfg.eta) is float


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(RequestError, match="list.yaml must hold a mapping of keys to values, got list"):
        Config.from_yaml(tmp_path / "list.yaml")
    with pytest.raises(RequestError, match="bad.yaml is not valid YAML at line 2"):
        Config.from_yaml(tmp_path / "bad.yaml")


def test_inert_keys_follow_the_method_and_kd_loss():
    assert {"alpha", "beta", "kd_weight", "teacher"} <= Config(method="student").inert_keys
    assert {"lam", "eta", "kd_weight"} <= Config(method="oracle").inert_keys
    fixed = Config(method="fixed-teacher", teacher_init="t.pt").inert_keys
    assert {"alpha", "beta", "kd_temperature", "learn_to_teach"} <= fixed and "kd_weight" not in fixed
    assert Config(method="tsmd").inert_keys == {"rkd_distance_weight", "rkd_angle_weight"}
    assert "kd_views" not in Config(method="student").inert_keys  # a student's views take the labels
    assert "kd_weight" not in Config(method="student", kd_views=2).inert_keys
    assert "kd_views" in Config(method="oracle").inert_keys


def test_kd_views_go_with_every_method_that_distils():
    for changes in ({}, {"meta_algorithm": "reptile"}, {"method": "fixed-teacher", "teacher_init": "t.pt"},
                    {"method": "student"}):
        assert Config(kd_views=2, **changes).kd_views == 2


def test_null_paths_stand_for_their_environment_defaults(monkeypatch, tmp_path):
    """A YAML ``data_root: null`` (as ``reproduce --expand`` writes without one) means $TSMD_DATA_ROOT."""
    monkeypatch.setenv("TSMD_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("TSMD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = Config.from_dict({"data_root": None, "cache_dir": None})
    assert (cfg.data_root, cfg.cache_dir) == (str(tmp_path / "data"), str(tmp_path / "cache"))
    with pytest.raises(RequestError, match="unknown configuration key"):
        Config.from_dict({"data_rot": None})
