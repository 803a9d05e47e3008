"""The results grid: cells as Ray tasks, the Table 1 markdown and chart, resuming finished cells."""
from __future__ import annotations

import json
import logging
import re

import pytest
import yaml

from tsmd_ray.grid import expand, finished, load_grid, progress
from tsmd_ray.reproduce import main, reproduce
from tsmd_ray.tables import across_seeds, collect, curve_label, markdown_table, plot_validation_curves

TINY_BASE = dict(dataset="omniglot", teacher="conv4", teacher_widths=[8, 8, 8, 8], student_widths=[4, 4, 4, 4],
                 iterations=2, meta_batch=2, inner_steps=1, query=2, eval_every=0, test_episodes=6, mlflow=False,
                 checkpoint_every=1, allow_random_teacher=True)


def write_grid(path, dataset, backend="local", methods=("student", "tsmd"), **base):
    grid = {"name": "tiny", "description": "tiny grid", "base": {**TINY_BASE, "data_root": str(dataset),
                                                                 "backend": backend, **base},
            "methods": list(methods), "settings": [{"label": "5-way 1-shot", "ways": 5, "shots": 1}],
            "method_overrides": {"fixed-teacher": {"kd_loss": "rkd"}}}
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_missing_grid_file_is_a_clear_error(tmp_path):
    assert main(["--grid", str(tmp_path / "missing.yaml")]) == 2


def test_markdown_layout():
    entry = lambda m, c: {"mean": m, "ci95": c, "episodes": 800, "all": {}}  # noqa: E731
    data = {"settings": ["5-way 1-shot", "5-way 5-shot"], "methods": ["student", "fixed-teacher", "tsmd", "oracle"],
            "table": {"student": {"5-way 1-shot": entry(0.5, 0.01)}, "fixed-teacher": {},
                      "tsmd": {"5-way 1-shot": entry(0.6, 0.012), "5-way 5-shot": entry(0.7, 0.01)},
                      "oracle": {"5-way 1-shot": entry(0.9, 0.005)}}}
    text = markdown_table(data, "t")
    lines = text.splitlines()
    assert lines[2] == "| Method | 5-way 1-shot | 5-way 5-shot |"
    assert lines[4] == "| Student | 50.00 ± 1.00 | — |"
    assert lines[5] == "| Fixed teacher | — | — |"
    assert lines[6] == "| Ours | **60.00 ± 1.20** | **70.00 ± 1.00** |"
    assert lines[7] == "| Oracle | 90.00 ± 0.50 | — |"
    assert "800 test episodes" in text


def test_grid_runs_as_ray_tasks_writes_the_table_and_resumes(ray_cluster, omniglot_dataset, tmp_path):
    grid = write_grid(tmp_path / "tiny.yaml", omniglot_dataset, backend="ray")
    out = tmp_path / "out"
    data = reproduce(grid, out)
    assert sorted(data["trained"]) == ["5-way 1-shot/student", "5-way 1-shot/tsmd"]
    text = (out / "results.md").read_text()
    assert "| Student |" in text and "| Ours |" in text and "6 test episodes" in text
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((out / "results.json").read_text())["table"]
    assert table["tsmd"]["5-way 1-shot"]["episodes"] == 6
    for method in ("student", "tsmd"):
        assert (out / "5-way-1-shot" / method / "evaluation.json").is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*/evaluation.json")}
    again = reproduce(grid, out, resume=True)
    assert again["trained"] == [] and again["skipped"] == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/evaluation.json")} == mtimes
    assert (out / "results.md").read_text() == text


def test_resume_retrains_only_unfinished_or_changed_cells(omniglot_dataset, tmp_path, capsys):
    grid = write_grid(tmp_path / "tiny.yaml", omniglot_dataset, methods=("student", "fixed-teacher"))
    out = tmp_path / "out"
    assert main(["--grid", str(grid), "--out", str(out)]) == 0
    assert "| Fixed teacher |" in capsys.readouterr().out
    (out / "5-way-1-shot" / "student" / "evaluation.json").unlink()  # as if killed before meta-testing
    data = reproduce(grid, out, resume=True)
    assert data["trained"] == ["5-way 1-shot/student"]
    # a key added since a cell finished stands for its default there: the cell stays finished
    saved = out / "5-way-1-shot" / "fixed-teacher" / "config.yaml"
    saved.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(saved.read_text()).items() if k != "kd_views"}))
    assert all(finished(c) for c in expand(load_grid(grid), out, resume=True))
    # a changed setting invalidates finished cells
    write_grid(grid, omniglot_dataset, methods=("student", "fixed-teacher"), inner_steps=2)
    cells = expand(load_grid(grid), out, resume=True)
    assert not any(finished(c) for c in cells)
    # their checkpoints are of another config: the cells train from the start, not from them ...
    reproduce(grid, out, resume=True)
    assert _steps(out / "5-way-1-shot" / "student") == [1, 2, 2]  # iterations 1, 2, then the test record
    # ... while a cell that only runs longer goes on from its checkpoint
    write_grid(grid, omniglot_dataset, methods=("student", "fixed-teacher"), inner_steps=2, iterations=3)
    reproduce(grid, out, resume=True)
    assert _steps(out / "5-way-1-shot" / "student") == [1, 2, 2, 3, 3]


def _steps(cell_out):
    return [json.loads(line)["step"] for line in (cell_out / "metrics.jsonl").read_text().splitlines()]


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(omniglot_dataset, tmp_path):
    grid = write_grid(tmp_path / "tiny.yaml", omniglot_dataset, methods=("student", "tsmd"))
    spec = yaml.safe_load(grid.read_text())
    spec["method_overrides"]["tsmd"] = {"alpha": 1e30}  # the teacher's inner loop diverges at once
    grid.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    data = reproduce(grid, out)
    assert "failed" in data["table"]["tsmd"]["5-way 1-shot"]
    assert data["table"]["student"]["5-way 1-shot"]["episodes"] == 6
    text = (out / "results.md").read_text()
    assert "| Ours | failed† |" in text and "non-finite" in text
    assert (out / "results.png").is_file()
    del spec["method_overrides"]["tsmd"]  # mended: --resume trains the failed cell again, its failure goes
    grid.write_text(yaml.safe_dump(spec))
    data = reproduce(grid, out, resume=True)
    assert data["trained"] == ["5-way 1-shot/tsmd"] and not (out / "5-way-1-shot" / "tsmd" / "failed.json").exists()
    assert data["table"]["tsmd"]["5-way 1-shot"]["episodes"] == 6


def test_a_bad_cell_is_refused_before_the_grid_starts(omniglot_dataset, tmp_path):
    grid = write_grid(tmp_path / "tiny.yaml", omniglot_dataset, methods=("student", "tsmd"))
    spec = yaml.safe_load(grid.read_text())
    spec["method_overrides"]["tsmd"] = {"teacher_init": str(tmp_path / "missing.pt")}
    grid.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="cell 5-way 1-shot/tsmd/seed 0: teacher_init=.*missing.pt': no such file"):
        reproduce(grid, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def _write_evaluation(out, per_episode: dict, teacher_sha: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {m: {"mean": sum(v) / len(v), "per_episode": v} for m, v in per_episode.items()}
    (out / "evaluation.json").write_text(json.dumps({"results": results, "teacher_init_sha256": teacher_sha}))


def test_the_table_names_the_teacher_file_and_flags_a_column_that_mixes_two(tmp_path):
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(yaml.safe_dump({"base": {}, "methods": ["student", "tsmd", "oracle"],
                                         "settings": [{"ways": 5, "shots": 1}, {"ways": 20, "shots": 1}]}))
    cells = expand(load_grid(grid_path), tmp_path / "out")
    old, new = "a" * 64, "b" * 64
    for cell in cells:
        sha = None if cell.method == "student" else new  # a student run records no teacher file
        _write_evaluation(cell.out, {"student": [0.5] * 4, "teacher": [0.9] * 4}, sha)
    text = markdown_table(collect(cells))
    assert "Teacher file (sha256 of `teacher_init`): `bbbbbbbb…bbbbbb` in every cell" in text
    oracle_20 = next(c for c in cells if c.method == "oracle" and c.setting == "20-way 1-shot")
    _write_evaluation(oracle_20.out, {"teacher": [0.9] * 4}, old)
    text = markdown_table(collect(cells))
    assert ("**Different teacher files in 20-way 1-shot**: `bbbbbbbb…bbbbbb` (Ours seed 0); "
            "`aaaaaaaa…aaaaaa` (Oracle seed 0).") in text
    assert "in every cell" not in text and "Different teacher files in 5-way" not in text


def test_seeds_are_pooled_and_methods_paired_episode_by_episode(tmp_path):
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(yaml.safe_dump({"base": {"iterations": 3}, "seeds": [0, 1], "methods": ["student", "tsmd"],
                                         "settings": [{"ways": 5, "shots": 1}]}))
    cells = expand(load_grid(grid_path), tmp_path / "out")
    assert [(c.method, c.seed) for c in cells] == [("student", 0), ("student", 1), ("tsmd", 0), ("tsmd", 1)]
    assert cells[1].out == tmp_path / "out" / "5-way-1-shot" / "student" / "seed1"
    # Episodes differ a lot in difficulty; Ours is exactly 0.04 above Student on every one of seed 0's
    # and 0.02 above on seed 1's: the paired interval is zero-width, the unpaired ones overlap widely.
    hard_and_easy = [0.2, 0.9, 0.4, 0.8, 0.3, 0.6]
    for cell in cells:
        gain = {("tsmd", 0): 0.04, ("tsmd", 1): 0.02}.get((cell.method, cell.seed), 0.0)
        _write_evaluation(cell.out, {"student": [a + gain for a in hard_and_easy], "teacher": [0.9] * 6})
    data = collect(cells)
    assert data["table"]["student"]["5-way 1-shot"]["episodes"] == 12
    assert data["table"]["tsmd"]["5-way 1-shot"]["seeds"][1]["mean"] == pytest.approx(sum(hard_and_easy) / 6 + 0.02)
    paired = data["paired"]["tsmd"]["5-way 1-shot"]
    assert paired["per_seed"][0]["mean"] == pytest.approx(0.04) and paired["per_seed"][0]["ci95"] == pytest.approx(0)
    assert paired["pooled"]["mean"] == pytest.approx(0.03) and paired["pooled"]["episodes"] == 12
    assert data["table"]["tsmd"]["5-way 1-shot"]["ci95"] > 0.1
    text = markdown_table(data)
    assert "| Ours − Student, seed 0 | +4.00 ± 0.00 |" in text
    assert "| **Ours − Student, pooled** | +3.00 ± " in text
    assert "pooled over 2 training seeds (0, 1)" in text
    # across seeds: differences 4 and 2 points, sd 1.41, t(1 df) = 12.706 -> +3.00 ± 12.71
    assert paired["across_seeds"]["ci95"] == pytest.approx(12.706 * 0.02 / 2 ** 0.5 / 2 ** 0.5)
    assert "| **Ours − Student, across seeds** | +3.00 ± 12.71 (n=2) |" in text
    (cells[3].out / "evaluation.json").unlink()  # Ours has only seed 0 now: its cell says so
    partial = markdown_table(collect(cells))
    # higher, but over one seed: not ranked against the Student's two (bold), which names no seeds
    assert re.search(r"\| Ours \| 57\.33 ± \d+\.\d\d \(seed 0\) \|", partial), partial
    assert re.search(r"\| Student \| \*\*53\.33 ± [\d.]+\*\* \|", partial), partial
    assert "Bold: best student among the cells with every seed" in partial


@pytest.mark.parametrize("n, t", [(2, 12.706), (4, 3.182), (21, 2.086), (61, 2.000)])
def test_the_across_seeds_interval_is_students_t(n, t):
    means = [(-1) ** i for i in range(n)]  # sd known in closed form
    mean = sum(means) / n
    sd = (sum((m - mean) ** 2 for m in means) / (n - 1)) ** 0.5
    assert across_seeds(means)["ci95"] == pytest.approx(t * sd / n ** 0.5, rel=2e-3)


def test_validation_curves_draw_unfinished_cells_as_such(tmp_path):
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(yaml.safe_dump({"base": {}, "seeds": [0, 1], "methods": ["student"], "settings": [{"ways": 5}]}))
    cells = expand(load_grid(grid_path), tmp_path / "out")
    assert plot_validation_curves(cells, tmp_path / "none.png") is None  # nothing trained yet
    for cell in cells:
        cell.out.mkdir(parents=True)
        (cell.out / "metrics.jsonl").write_text("".join(json.dumps({"step": 50 * k, "val/student_acc": 0.2 + 0.1 * k})
                                                        + "\n" for k in (1, 2, 3)))
    _write_evaluation(cells[0].out, {"student": [0.5] * 4})
    assert [curve_label(c) for c in cells] == ["Student (seed 0)", "Student (seed 1, unfinished)"]
    assert plot_validation_curves(cells, tmp_path / "curves.png").stat().st_size > 0


def test_status_says_where_each_cell_stands_and_writes_nothing(tmp_path, capsys):
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(yaml.safe_dump({"name": "g", "base": {"iterations": 300}, "seeds": [0, 1, 2],
                                         "methods": ["student", "oracle"], "settings": [{"ways": 5}]}))
    out = tmp_path / "out"
    student0, student1, student2, oracle0, oracle1, oracle2 = expand(load_grid(grid_path), out)
    for cell, accs in ((student0, (0.3, 0.5, 0.4)), (oracle0, (0.6, 0.7, 0.65)), (oracle1, (0.2,)),
                       (student2, (0.1,))):
        cell.out.mkdir(parents=True)
        records = [{"step": s, "train/student/loss": 1.0} for s in range(1, 50 * len(accs) + 2)]
        records += [{"step": 50 * k, f"val/{m}_acc": a + (0.1 if m == "teacher" else 0)}
                    for k, a in enumerate(accs, 1) for m in ("student", "teacher")]
        (cell.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with (oracle0.out / "metrics.jsonl").open("a") as f:  # early stopping's test record is at step `iterations`
        f.write(json.dumps({"step": 300, "test/teacher_acc": 0.75}) + "\n")
    _write_evaluation(oracle0.out, {"teacher": [0.5, 1.0], "student": [0.0, 0.0]})
    evaluation = json.loads((oracle0.out / "evaluation.json").read_text())
    evaluation["results"]["teacher"]["ci95"] = 0.0123
    (oracle0.out / "evaluation.json").write_text(json.dumps({**evaluation, "tested_iteration": 100}))
    oracle0.cfg.to_yaml(oracle0.out / "config.yaml")
    (oracle1.out / "failed.json").write_text(json.dumps({"error": "NonFiniteLossError: non-finite |\n loss"}))
    _write_evaluation(student2.out, {"student": [0.5]})
    student2.cfg.replace(inner_steps=7).to_yaml(student2.out / "config.yaml")  # a result of another config
    assert progress(student0) == {"state": "unfinished", "iterations": 300, "iteration": 151,
                                  "best_val": 0.5, "best_at": 100, "last_val": 0.4, "last_at": 150}
    assert progress(student1) == {"state": "not started", "iterations": 300, "iteration": 0}
    done = progress(oracle0)
    assert (done["state"], done["iteration"], done["test"], done["tested_at"]) == ("finished", 151, 0.75, 100)
    assert done["best_val"] == pytest.approx(0.8)  # the oracle's row model is the teacher
    assert progress(oracle1)["state"] == "failed"
    assert progress(student2)["state"] == "results of another config (inner_steps)"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["--grid", str(grid_path), "--out", str(out), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("| 5-way 1-shot / Student / seed 0 | unfinished | 151 / 300 | 50.00 (at 100) "
                        "| 40.00 (at 150) | — |")
    assert lines[5] == ("| 5-way 1-shot / Oracle / seed 0 | finished | 151 / 300 | 80.00 (at 100) "
                        "| 75.00 (at 150) | 75.00 ± 1.23 (at 100) |")
    assert "failed: NonFiniteLossError: non-finite \\| loss |" in lines[6]  # one line, the pipe escaped
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # --status writes nothing
    with pytest.raises(SystemExit):
        main(["--grid", str(grid_path), "--status", "--resume"])
    with pytest.raises(SystemExit):
        main(["--grid", str(grid_path), "--expand", str(tmp_path / "cfgs"), "--resume"])
    assert not (tmp_path / "cfgs").exists()


def test_pairing_refuses_different_episode_counts(tmp_path):
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(yaml.safe_dump({"base": {}, "methods": ["student", "tsmd"], "settings": [{"ways": 5}]}))
    cells = expand(load_grid(grid_path), tmp_path / "out")
    _write_evaluation(cells[0].out, {"student": [0.5] * 4})
    _write_evaluation(cells[1].out, {"student": [0.5] * 5})
    with pytest.raises(ValueError, match="same episodes"):
        collect(cells)


def test_the_grid_is_one_mlflow_run_with_every_cell_nested(mlflow_server, omniglot_dataset, tmp_path, monkeypatch):
    """A cell that tracks itself nests under the grid's run as it trains; an untracked one is uploaded
    into it at the end; the table is on the grid's run; --resume reopens that run, adding no cell twice."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    grid = write_grid(tmp_path / "tiny.yaml", omniglot_dataset, experiment="reproduce-grid")
    spec = yaml.safe_load(grid.read_text())
    spec.update(mlflow=True, method_overrides={"student": {"mlflow": True, "system_metrics": False}})
    grid.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    reproduce(grid, out)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("reproduce-grid").experiment_id
    parents = client.search_runs([experiment], "tags.`tsmd.kind` = 'reproduce'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags["tsmd.method"]: r for r in
                client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert set(children) == {"student", "tsmd"}
    assert "tsmd.uploaded" not in children["student"].data.tags  # tracked live, nested as it trained
    assert children["tsmd"].data.tags["tsmd.uploaded"] == "true"  # mlflow: false, uploaded at the end
    table = json.loads((out / "results.json").read_text())["table"]
    for method, child in children.items():
        assert child.info.status == "FINISHED"
        assert child.data.metrics["test/student_acc"] == pytest.approx(table[method]["5-way 1-shot"]["mean"])
        assert parent.data.metrics[f"5-way-1-shot/{method}/acc"] == pytest.approx(table[method]["5-way 1-shot"]["mean"])
    assert "5-way-1-shot/tsmd_minus_student/mean" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.md", "results.png", "grid.yaml"}

    reproduce(grid, out, resume=True)
    assert [r.info.run_id for r in client.search_runs([experiment], "tags.`tsmd.kind` = 'reproduce'")] \
        == [parent.info.run_id]
    assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")) == 2


def test_table_only_records_cells_trained_elsewhere(mlflow_server, omniglot_dataset, tmp_path, monkeypatch):
    """Cells trained without the grid's run (here: a grid without MLflow, one cell never finished) are
    recorded by ``--table-only``: one grid run, the finished cells nested, nothing trained or deleted."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    grid = write_grid(tmp_path / "tiny.yaml", omniglot_dataset, experiment="reproduce-table-only")
    out = tmp_path / "out"
    reproduce(grid, out)  # mlflow: false
    (out / "5-way-1-shot" / "tsmd" / "evaluation.json").unlink()  # unfinished
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    spec = yaml.safe_load(grid.read_text())
    grid.write_text(yaml.safe_dump({**spec, "mlflow": True}))
    assert main(["--grid", str(grid), "--out", str(out), "--table-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == files  # (the upload adds its records beside them)
    table = json.loads((out / "results.json").read_text())["table"]
    assert "mean" in table["student"]["5-way 1-shot"] and "mean" not in table["tsmd"].get("5-way 1-shot", {})
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("reproduce-table-only").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`tsmd.kind` = 'reproduce'")
    (child,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.data.tags["tsmd.method"] == "student" and child.data.tags["tsmd.uploaded"] == "true"
    assert parent.data.metrics["5-way-1-shot/student/acc"] == pytest.approx(table["student"]["5-way 1-shot"]["mean"])


def test_a_cell_copied_into_a_second_grid_stays_nested_in_the_first(mlflow_server, omniglot_dataset, tmp_path,
                                                                     monkeypatch):
    """Grids share finished cells by copying their folders (the claim grid's Student cells in its
    variants): recording the second grid gives the copy a run of its own and leaves the first grid's."""
    import shutil

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    first = write_grid(tmp_path / "first.yaml", omniglot_dataset, methods=("student",),
                       experiment="reproduce-shared-cell")
    first.write_text(yaml.safe_dump({**yaml.safe_load(first.read_text()), "mlflow": True}))
    reproduce(first, tmp_path / "first")
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({**yaml.safe_load(first.read_text()), "name": "second"}))
    shutil.copytree(tmp_path / "first" / "5-way-1-shot", tmp_path / "second" / "5-way-1-shot")
    for grid, out in ((second, "second"), (first, "first")):  # the first grid again: nothing moves
        assert main(["--grid", str(grid), "--out", str(tmp_path / out), "--table-only"]) == 0
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("reproduce-shared-cell").experiment_id
    parents = client.search_runs([experiment], "tags.`tsmd.kind` = 'reproduce'")
    children = {p.data.tags["mlflow.runName"]: client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{p.info.run_id}'") for p in parents}
    assert sorted(children) == ["reproduce second", "reproduce tiny"]
    assert [len(c) for c in children.values()] == [1, 1]
    assert children["reproduce tiny"][0].info.run_id != children["reproduce second"][0].info.run_id


def test_a_cell_that_cannot_be_uploaded_does_not_keep_the_others_out(mlflow_server, omniglot_dataset, tmp_path,
                                                                     monkeypatch, caplog):
    """``--table-only`` nests every cell it can; one it cannot (here an unreadable checkpoint) gets a
    warning that names it, and the grid's run ends FAILED saying so."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    grid = write_grid(tmp_path / "tiny.yaml", omniglot_dataset, experiment="reproduce-upload-failure")
    out = tmp_path / "out"
    reproduce(grid, out)  # mlflow: false
    broken = out / "5-way-1-shot" / "student"
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    grid.write_text(yaml.safe_dump({**yaml.safe_load(grid.read_text()), "mlflow": True}))
    with caplog.at_level(logging.WARNING, logger="tsmd_ray.tracking"):
        assert main(["--grid", str(grid), "--out", str(out), "--table-only"]) == 0
    assert any(str(broken) in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("reproduce-upload-failure").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`tsmd.kind` = 'reproduce'")
    assert parent.info.status == "FAILED"
    nested = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((r.data.tags["tsmd.method"], r.info.status) for r in nested) == [("student", "FAILED"),
                                                                                   ("tsmd", "FINISHED")]
    assert json.loads((broken / "mlflow.json").read_text())["status"] == "pending_upload"
