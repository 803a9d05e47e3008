"""Cells compared across grids: the deployed model's accuracies, paired on the same seeded episodes."""
from __future__ import annotations

import json

import pytest

from tsmd_ray.compare import compare, load_row, main, markdown
from tsmd_ray.config import Config

HARD_AND_EASY = [0.2, 0.9, 0.4, 0.8, 0.3, 0.6]


def write_cell(out, method="student", seed=0, student=HARD_AND_EASY, teacher=None, **keys):
    """A finished cell as train writes it: its config.yaml and evaluation.json."""
    out.mkdir(parents=True)
    Config(method=method, seed=seed, data_root=None, allow_random_teacher=True, **keys).to_yaml(out / "config.yaml")
    results = {"student": {"per_episode": list(student)}, "teacher": {"per_episode": list(teacher or [0.9] * 6)}}
    (out / "evaluation.json").write_text(json.dumps({"method": method, "results": results}))
    return out


def test_rows_from_other_grids_are_paired_episode_by_episode(tmp_path):
    base = tmp_path / "grid" / "student"
    for seed in (0, 1):
        write_cell(base / f"seed{seed}", seed=seed)
    (base / "seed2").mkdir()  # an unfinished cell: skipped
    views = tmp_path / "views" / "tsmd"
    write_cell(views / "seed0", "tsmd", 0, [a + 0.05 for a in HARD_AND_EASY])
    write_cell(views / "seed1", "tsmd", 1, [a + 0.01 for a in HARD_AND_EASY])
    oracle = write_cell(tmp_path / "oracle" / "seed1", "oracle", 1, teacher=[a + 0.1 for a in HARD_AND_EASY])
    rows = [load_row(f"Student={base}"), load_row(f"Ours, views={views}"), load_row(str(oracle))]
    assert sorted(rows[0].episodes) == [0, 1] and rows[2].label == str(oracle)
    data = compare(rows)
    views_paired = data["paired"]["Ours, views"]
    assert views_paired["per_seed"][0]["mean"] == pytest.approx(0.05) and views_paired["per_seed"][0]["ci95"] == pytest.approx(0, abs=1e-12)
    assert views_paired["pooled"]["mean"] == pytest.approx(0.03) and views_paired["pooled"]["episodes"] == 12
    # the oracle's deployed model is its adapted teacher; it shares seed 1 only with the baseline
    assert list(data["paired"][str(oracle)]["per_seed"]) == [1]
    assert data["paired"][str(oracle)]["pooled"]["mean"] == pytest.approx(0.1)
    assert data["accuracy"][str(oracle)]["pooled"]["mean"] == pytest.approx(sum(HARD_AND_EASY) / 6 + 0.1)
    text = markdown(data)
    assert "| Ours, views − Student | +5.00 ± 0.00 | +1.00 ± 0.00 | +3.00 ± 1.18 | +3.00 ± 25.41 (n=2) |" in text
    assert f"(seed 1) | — | {100 * (sum(HARD_AND_EASY) / 6 + 0.1):.2f} ± " in text


def test_cells_of_other_episodes_are_refused(tmp_path):
    base = write_cell(tmp_path / "a" / "seed0")
    other_ways = write_cell(tmp_path / "b" / "seed0", "tsmd", ways=20)
    with pytest.raises(ValueError, match=r"B and A, seed 0: not the same test episodes \(ways 20 vs 5\)"):
        compare([load_row(f"A={base}"), load_row(f"B={other_ways}")])
    fewer = write_cell(tmp_path / "c" / "seed0", "tsmd", student=HARD_AND_EASY[:4])
    with pytest.raises(ValueError, match=r"C and A \(seed 0\) were tested on 4 and 6 episodes"):
        compare([load_row(f"A={base}"), load_row(f"C={fewer}")])
    (fewer / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml: no such file"):
        load_row(str(fewer))


def test_the_command_writes_the_table_and_refuses_bad_rows_in_one_line(tmp_path, capsys, caplog):
    base = write_cell(tmp_path / "a" / "seed0")
    better = write_cell(tmp_path / "b" / "seed0", "tsmd", student=[a + 0.02 for a in HARD_AND_EASY])
    assert main([f"A={base}", f"B={better}", "--out", str(tmp_path / "out" / "cmp")]) == 0
    assert "| B − A | +2.00 ± 0.00 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "cmp.json").read_text())["baseline"] == "A"
    assert (tmp_path / "out" / "cmp.md").read_text().startswith("| Row | pooled | seed 0 |")
    assert main([f"A={base}", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} is not a folder" in caplog.text
    assert main([f"A={tmp_path}", f"B={better}"]) == 2
    assert "no finished cell in" in caplog.text
    assert main([f"A={base}"]) == 2
    assert "give a baseline and at least one row" in caplog.text
