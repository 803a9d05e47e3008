"""Command-line flags from the Config fields: precedence over YAML and defaults, boolean forms."""
import argparse

import pytest

from tsmd_ray.config import Config
from tsmd_ray.flags import add_config_arguments, config_from_args


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    Config(ways=3, alpha=0.5, method="student").to_yaml(path)
    cfg = _parse(["--config", str(path), "--alpha", "0.25", "--first-order-teacher"])
    assert (cfg.ways, cfg.alpha, cfg.method, cfg.first_order_teacher) == (3, 0.25, "student", True)
    assert cfg.shots == Config().shots


@pytest.mark.parametrize("argv, expected", [
    (["--no-mlflow"], False), (["--mlflow", "false"], False), (["--mlflow"], True), ([], True)])
def test_boolean_flags_in_both_forms(argv, expected):
    assert _parse(argv).mlflow is expected


def test_negated_flag_takes_no_value():
    with pytest.raises(SystemExit):
        _parse(["--no-augment", "true"])
