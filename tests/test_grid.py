"""Grid files: expansion into cells (base, setting, method overrides, seeds) and refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tsmd_ray.grid import expand, load_grid, write_configs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_grid_expands_settings_by_methods(tmp_path):
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(yaml.safe_dump({"base": {"iterations": 3, "allow_random_teacher": True}, "settings": [
        {"ways": 5, "shots": 1},
        {"label": "20w5s", "ways": 20, "shots": 5, "method_overrides": {"fixed-teacher": {"kd_weight": 0.5}}}],
        "method_overrides": {"fixed-teacher": {"kd_loss": "rkd", "kd_weight": 0.1}}}))
    grid = load_grid(grid_path)
    cells = expand(grid, tmp_path / "out")
    assert [(c.setting, c.method) for c in cells][:5] == [
        ("5-way 1-shot", "student"), ("5-way 1-shot", "fixed-teacher"), ("5-way 1-shot", "tsmd"),
        ("5-way 1-shot", "oracle"), ("20w5s", "student")]
    by = {(c.setting, c.method): c.cfg for c in cells}
    assert by[("20w5s", "oracle")].ways == 20 and by[("20w5s", "oracle")].shots == 5
    assert by[("5-way 1-shot", "fixed-teacher")].resolved_kd_loss == "rkd"
    assert by[("5-way 1-shot", "fixed-teacher")].kd_weight == 0.1  # the grid's method overrides, then the setting's
    assert by[("20w5s", "fixed-teacher")].kd_weight == 0.5 and by[("20w5s", "fixed-teacher")].resolved_kd_loss == "rkd"
    assert by[("5-way 1-shot", "tsmd")].resolved_kd_loss == "kl"
    assert len({c.cfg.out for c in cells}) == 8
    assert len(write_configs(grid_path, tmp_path / "cfgs")) == 8
    written = write_configs(grid_path, tmp_path / "some", methods=["tsmd"])
    assert [p.name for p in written] == ["g-5-way-1-shot-tsmd.yaml", "g-20w5s-tsmd.yaml"]
    with pytest.raises(ValueError, match="--methods teacher: accepted the grid's methods"):
        write_configs(grid_path, tmp_path / "none", methods=["teacher"])
    assert not (tmp_path / "none").exists()


def test_bad_grids_are_refused(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"settings": [{"ways": 5}], "methods": ["student", "nope"]}))
    with pytest.raises(ValueError, match="nope"):
        load_grid(path)
    path.write_text(yaml.safe_dump({"settings": [{"ways": 5}], "base": {"itrations": 3}}))
    with pytest.raises(ValueError, match="itrations"):
        expand(load_grid(path), tmp_path)
    path.write_text(yaml.safe_dump({"settings": [{"label": "s", "ways": 5, "method_overrides": {"tsmd": 3}}]}))
    with pytest.raises(ValueError, match="method_overrides of setting 's'"):
        load_grid(path)


def test_base_from_takes_the_other_grids_base_and_method_overrides_under_this_ones(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({
        "base": {"iterations": 3, "ways": 20, "query": 2}, "settings": [{"ways": 5}],
        "method_overrides": {"tsmd": {"kd_weight": 0.3, "kd_temperature": 2.0}, "oracle": {"seeds": [0]}}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base_from": "a.yaml", "base": {"query": 4},
                                                     "settings": [{"shots": 1}], "methods": ["student"],
                                                     "method_overrides": {"tsmd": {"kd_weight": 0.5}}}))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base_from": "b.yaml", "settings": [{"shots": 2}],
                                                     "methods": ["student", "tsmd"]}))
    grid = load_grid(tmp_path / "c.yaml")
    student, tsmd = expand(grid, tmp_path / "out")
    assert (student.cfg.iterations, student.cfg.ways, student.cfg.query, student.cfg.shots) == (3, 20, 4, 2)
    assert (tsmd.cfg.kd_weight, tsmd.cfg.kd_temperature) == (0.5, 2.0)
    assert student.cfg.kd_weight != 0.5
    (tmp_path / "copy").mkdir()  # reproduce's OUT/grid.yaml stands on its own, away from a.yaml and b.yaml
    (tmp_path / "copy" / "grid.yaml").write_text(yaml.safe_dump(grid))
    assert expand(load_grid(tmp_path / "copy" / "grid.yaml"), tmp_path / "out") == [student, tsmd]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"base_from": "c.yaml", "settings": [{"ways": 5}]}))
    with pytest.raises(ValueError, match="base_from must be a grid that does not lead back"):
        load_grid(tmp_path / "c.yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base_from": "missing.yaml", "settings": [{"ways": 5}]}))
    with pytest.raises(ValueError, match="missing.yaml"):
        load_grid(tmp_path / "b.yaml")


@pytest.mark.parametrize("path", [p for p in sorted(CONFIGS.glob("*.yaml"))
                                  if "settings" in (yaml.safe_load(p.read_text()) or {})], ids=lambda p: p.name)
def test_committed_grids_expand_to_valid_cells_in_their_own_folders(path, tmp_path):
    cells = expand(load_grid(path), tmp_path)  # every cell's Config is validated here
    assert cells and len({cell.out for cell in cells}) == len(cells)
