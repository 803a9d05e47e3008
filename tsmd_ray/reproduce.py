"""Run a grid of trainings and write the paper's Table 1: ``python -m tsmd_ray.reproduce --grid FILE``.

A grid file (``configs/*.yaml``, see ``configs/README.md``) holds

    name: omniglot-cpu                 # table title and default output folder runs/<name>
    base: {Config keys shared by every cell}
    methods: [student, fixed-teacher, tsmd, oracle]           # table rows
    settings:                                                  # table columns
      - {label: "5-way 1-shot", ways: 5, shots: 1}
    method_overrides: {fixed-teacher: {kd_loss: rkd}}          # optional, per method
    runner: tasks | inline                                     # optional, see below
    mlflow: true | false           # optional: log the table to MLflow (default: base.mlflow)

and expands to one :class:`~tsmd_ray.config.Config` per (setting, method) cell, trained in
``OUT/<setting>/<method>/`` by :func:`tsmd_ray.train.run` and meta-tested on ``test_episodes``
episodes (paper: 800). With ``backend: ray`` and ``runner: tasks`` (the default for Ray) every
cell is one Ray task (``threads_per_worker`` CPUs, ``gpus_per_worker`` GPUs) meta-trained in that
task's process, so the cluster runs cells side by side; ``runner: inline`` trains the cells one
after the other from this process, each on the cluster through its own Ray actors
(``tsmd_ray.distributed.RayRunner``). ``backend: local`` runs everything here, one cell at a time.

``--resume`` skips every cell whose ``evaluation.json`` exists (and whose ``config.yaml`` matches
the grid), and resumes unfinished cells from their ``checkpoint.pt``. The table (rows Student,
Fixed teacher, Ours, Oracle; one column per setting; mean ± 95% CI in percent) is written to
``OUT/results.md``, ``OUT/results.json`` and ``OUT/results.png``, and logged to MLflow when
``base.mlflow`` is true and a tracking store answers. ``--expand DIR`` only writes the cells'
configs (one YAML per cell, for ``python -m tsmd_ray.train --config``).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import METHODS, Config, load_yaml

log = logging.getLogger("tsmd_ray.reproduce")

ROW_NAMES = {"student": "Student", "fixed-teacher": "Fixed teacher", "tsmd": "Ours", "oracle": "Oracle"}
# the model whose accuracy a method's row reports: the oracle has no student, it is the adapted teacher
ROW_MODEL = {"student": "student", "fixed-teacher": "student", "tsmd": "student", "oracle": "teacher"}
# keys that may differ between a finished cell and the grid without invalidating it
FAILED = "failed.json"
RUNTIME_KEYS = {"resume", "out", "backend", "workers", "gpus_per_worker", "threads_per_worker", "mlflow",
                "experiment", "device", "data_root", "cache_dir", "task_batching", "vmap_chunk"}


@dataclass(frozen=True)
class Cell:
    setting: str
    method: str
    cfg: Config

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


# ---------------------------------------------------------------------- grid
def load_grid(path: str | Path) -> dict[str, Any]:
    grid = load_yaml(path)
    unknown = sorted(set(grid) - {"name", "description", "base", "methods", "settings", "method_overrides",
                                  "runner", "notes", "mlflow"})
    if unknown:
        raise ValueError(f"grid {path}: unknown key(s) {', '.join(unknown)}")
    if not grid.get("settings"):
        raise ValueError(f"grid {path} lists no settings (table columns)")
    methods = grid.setdefault("methods", list(METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"grid {path}: unknown method(s) {', '.join(bad)}; known: {', '.join(METHODS)}")
    grid.setdefault("name", Path(path).stem)
    grid.setdefault("base", {})
    grid.setdefault("method_overrides", {})
    if grid.get("runner", "tasks") not in ("tasks", "inline"):
        raise ValueError(f"grid {path}: runner must be tasks or inline, got {grid['runner']!r}")
    return grid


def setting_label(setting: dict[str, Any]) -> str:
    if "label" in setting:
        return str(setting["label"])
    return f"{setting.get('ways', 5)}-way {setting.get('shots', 1)}-shot"


def expand(grid: dict[str, Any], out: str | Path, resume: bool = False) -> list[Cell]:
    """The grid's cells, settings-major (the order of the table's columns, then rows)."""
    cells = []
    for setting in grid["settings"]:
        label = setting_label(setting)
        values = {k: v for k, v in setting.items() if k != "label"}
        for method in grid["methods"]:
            data = {**grid["base"], **values, **grid["method_overrides"].get(method, {}), "method": method,
                    "out": str(Path(out) / slug(label) / method), "resume": resume}
            cells.append(Cell(label, method, Config.from_dict(data)))
    return cells


def finished(cell: Cell) -> bool:
    """The cell's ``evaluation.json`` exists and its ``config.yaml`` is the cell's config."""
    evaluation, config = cell.out / "evaluation.json", cell.out / "config.yaml"
    if not evaluation.is_file():
        return False
    try:
        json.loads(evaluation.read_text())
        saved = yaml.safe_load(config.read_text()) if config.is_file() else {}
    except (json.JSONDecodeError, yaml.YAMLError):
        return False
    wanted = cell.cfg.to_dict()
    differ = sorted(k for k in wanted if k not in RUNTIME_KEYS and saved.get(k) != wanted[k])
    if differ:
        log.warning("cell %s/%s has results from another config (%s differ): training it again",
                    cell.setting, cell.method, ", ".join(differ[:5]))
        return False
    return True


# ---------------------------------------------------------------------- running cells
def run_cell(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Meta-train and meta-test one cell (here or inside a Ray task); returns its evaluation."""
    import torch

    from .train import run

    cfg = Config.from_dict(cfg_dict)
    if cfg.backend == "local":
        torch.set_num_threads(max(1, cfg.threads_per_worker))
    started = time.perf_counter()
    result = run(cfg)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(cfg.out, "wall.json").write_text(json.dumps({"wall_s": result["wall_s"]}))
    return result


def record_failure(cell: Cell, exc: BaseException) -> None:
    """Write ``failed.json`` in the cell's folder; the table shows the cell as failed."""
    message = f"{type(exc).__name__}: {exc}".strip()
    log.error("cell %s / %s failed: %s", cell.setting, cell.method, message)
    cell.out.mkdir(parents=True, exist_ok=True)
    (cell.out / FAILED).write_text(json.dumps({"setting": cell.setting, "method": cell.method, "error": message}))


def run_cells(cells: Sequence[Cell], runner: str) -> dict[tuple[str, str], dict[str, Any]]:
    results: dict[tuple[str, str], dict[str, Any]] = {}
    ray_cells = [c for c in cells if c.cfg.backend == "ray" and runner == "tasks"]
    for cell in cells:
        if cell in ray_cells:
            continue
        log.info("training cell %s / %s in %s", cell.setting, cell.method, cell.out)
        try:
            results[(cell.setting, cell.method)] = run_cell(cell.cfg.to_dict())
        except (ValueError, FileNotFoundError, RuntimeError) as exc:  # one bad cell must not end the grid
            record_failure(cell, exc)
    if ray_cells:
        import ray

        if not ray.is_initialized():
            ray.init(logging_level=logging.WARNING)
        pending = {}
        for cell in ray_cells:
            # inside the task the cell trains in-process: the parallelism is across cells; a retried
            # task (its worker died) resumes from the cell's checkpoint (stale ones were removed)
            cfg = cell.cfg.replace(backend="local", resume=True)
            task = ray.remote(run_cell).options(num_cpus=max(1, cfg.threads_per_worker),
                                                num_gpus=cfg.gpus_per_worker, max_retries=2,
                                                name=f"cell:{slug(cell.setting)}/{cell.method}")
            pending[task.remote(cfg.to_dict())] = cell
        log.info("submitted %d cell(s) as Ray tasks", len(pending))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                results[(cell.setting, cell.method)] = ray.get(done[0])
                log.info("cell %s / %s finished (%d left)", cell.setting, cell.method, len(pending))
            except Exception as exc:  # the task raised (after its retries): record it, go on
                record_failure(cell, getattr(exc, "cause", None) or exc)
    return results


# ---------------------------------------------------------------------- the table
def collect(cells: Sequence[Cell]) -> dict[str, Any]:
    """Table data from the cells' ``evaluation.json`` files (missing cells are left out)."""
    settings = list(dict.fromkeys(c.setting for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    table: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for cell in cells:
        path = cell.out / "evaluation.json"
        if not path.is_file():
            if (cell.out / FAILED).is_file():
                table[cell.method][cell.setting] = {"failed": json.loads((cell.out / FAILED).read_text())["error"]}
            continue
        evaluation = json.loads(path.read_text())
        model = ROW_MODEL[cell.method]
        entry = dict(evaluation["results"][model])
        entry["model"] = model
        entry["all"] = evaluation["results"]
        wall = cell.out / "wall.json"
        if wall.is_file():
            entry["wall_s"] = json.loads(wall.read_text())["wall_s"]
        table[cell.method][cell.setting] = entry
    return {"settings": settings, "methods": methods, "table": table}


def _fmt(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    if "failed" in entry:
        return "failed†"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['ci95']:.2f}"


def _scored(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m: {s: e for s, e in row.items() if "failed" not in e} for m, row in table.items()}


def markdown_table(data: dict[str, Any], title: str | None = None) -> str:
    settings, table, every = data["settings"], _scored(data["table"]), data["table"]
    best = {s: max((table[m][s]["mean"] for m in data["methods"] if s in table[m] and m != "oracle"), default=None)
            for s in settings}
    lines = [f"### {title}", ""] if title else []
    lines.append("| Method | " + " | ".join(settings) + " |")
    lines.append("|---|" + "---|" * len(settings))
    for method in data["methods"]:
        cells = []
        for s in settings:
            entry = table[method].get(s)
            text = _fmt(every[method].get(s))
            if entry is not None and method != "oracle" and entry["mean"] == best[s]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {ROW_NAMES[method]} | " + " | ".join(cells) + " |")
    episodes = sorted({e["episodes"] for row in table.values() for e in row.values()})
    lines.append("")
    lines.append(f"Test accuracy (%), mean ± 95% confidence interval over {'/'.join(map(str, episodes)) or '?'} "
                 "test episodes per cell; Oracle is the adapted teacher, every other row the student. "
                 "Bold: best student.")
    failures = [(m, s, e["failed"]) for m, row in every.items() for s, e in row.items() if "failed" in e]
    for method, setting, error in failures:
        lines.append(f"\n† {ROW_NAMES[method]}, {setting}: {error}")
    teacher_rows = [(m, s, table[m][s]["all"]["teacher"]) for m in data["methods"] if m in ("tsmd", "fixed-teacher")
                    for s in settings if s in table[m] and "teacher" in table[m][s]["all"]]
    if teacher_rows:
        lines += ["", "Teachers inside the student runs (query accuracy of the teacher after the same inner steps):", "",
                  "| Teacher of | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
        for method in ("fixed-teacher", "tsmd"):
            row = {s: t for m, s, t in teacher_rows if m == method}
            if row:
                lines.append(f"| {ROW_NAMES[method]} | " + " | ".join(_fmt(row.get(s)) for s in settings) + " |")
    return "\n".join(lines) + "\n"


def plot_table(data: dict[str, Any], out: str | Path, title: str | None = None) -> Path:
    """Grouped bars: one group per setting, one bar per method, 95% CI as error bars."""
    from .plots import plt, save_figure

    settings, methods, table = data["settings"], data["methods"], _scored(data["table"])
    colours = {"student": "#1f77b4", "fixed-teacher": "#2ca02c", "tsmd": "#d62728", "oracle": "#7f7f7f"}
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.55 * len(settings) * len(methods)), 4.8))
    for j, method in enumerate(methods):
        xs, means, cis = [], [], []
        for i, s in enumerate(settings):
            if s in table[method]:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                means.append(100 * table[method][s]["mean"])
                cis.append(100 * table[method][s]["ci95"])
        bars = ax.bar(xs, means, width, yerr=cis, capsize=3, label=ROW_NAMES[method], color=colours.get(method))
        for bar, mean in zip(bars, means):
            ax.annotate(f"{mean:.1f}", (bar.get_x() + bar.get_width() / 2, mean), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax.set_ylim(0, 100)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings)
    ax.set_ylabel("test accuracy (%), 95% CI")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(methods), fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    return save_figure(fig, out, dpi=110)


def log_to_mlflow(grid: dict[str, Any], data: dict[str, Any], out: Path) -> str | None:
    """One MLflow run for the grid: the table as metrics and artifacts. Never raises."""
    base = grid["base"]
    if not grid.get("mlflow", base.get("mlflow", True)):
        return None
    try:
        from . import tracking

        client = tracking.connect()
        uri = tracking.resolve_tracking_uri()
        experiment = tracking.ensure_experiment(client, base.get("experiment", "tsmd-ray"), uri)
        run = client.create_run(experiment, run_name=f"reproduce {grid['name']}",
                                tags={"tsmd_ray.kind": "reproduce", "tsmd_ray.grid": grid["name"]})
        run_id = run.info.run_id
        for method, row in data["table"].items():
            for setting, entry in row.items():
                if "failed" in entry:
                    continue
                key = f"{slug(setting)}/{method}"
                client.log_metric(run_id, f"{key}/acc", entry["mean"])
                client.log_metric(run_id, f"{key}/ci95", entry["ci95"])
        for name in ("results.md", "results.json", "results.png", "grid.yaml"):
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name))
        client.set_terminated(run_id, "FINISHED")
        log.info("table logged to MLflow run %s at %s", run_id, uri)
        return run_id
    except Exception as exc:  # tracking must never lose the results on disk
        log.warning("table not logged to MLflow (%s); it is in %s", exc, out)
        return None


def write_table(grid: dict[str, Any], cells: Sequence[Cell], out: Path) -> dict[str, Any]:
    data = collect(cells)
    title = grid.get("description") or grid["name"]
    (out / "results.md").write_text(markdown_table(data, title))
    serialisable = {**data, "table": {m: {s: {k: v for k, v in e.items()} for s, e in row.items()}
                                      for m, row in data["table"].items()}}
    (out / "results.json").write_text(json.dumps(serialisable, indent=2))
    if any(_scored(data["table"]).values()):
        plot_table(data, out / "results.png", title)
    return data


def reproduce(grid_path: str | Path, out: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Run the grid (skipping finished cells with ``resume``) and write the table; returns its data."""
    grid = load_grid(grid_path)
    out = Path(out or Path("runs") / grid["name"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    cells = expand(grid, out, resume)
    todo = [c for c in cells if not (resume and finished(c))]
    skipped = len(cells) - len(todo)
    if not resume:  # a fresh grid: outputs of an earlier run of these cells must not be resumed from
        for cell in todo:
            for name in ("checkpoint.pt", "evaluation.json", "metrics.jsonl", "wall.json", FAILED):
                (cell.out / name).unlink(missing_ok=True)
    log.info("grid %s: %d cell(s), %d finished and skipped, %d to train", grid["name"], len(cells), skipped, len(todo))
    started = time.perf_counter()
    run_cells(todo, grid.get("runner", "tasks"))
    data = write_table(grid, cells, out)
    data.update(trained=[f"{c.setting}/{c.method}" for c in todo], skipped=skipped,
                wall_s=round(time.perf_counter() - started, 1), out=str(out))
    log_to_mlflow(grid, data, out)
    return data


def write_configs(grid_path: str | Path, folder: str | Path, out: str | Path | None = None) -> list[Path]:
    """One ``python -m tsmd_ray.train --config`` YAML per cell of the grid."""
    grid = load_grid(grid_path)
    paths = []
    for cell in expand(grid, out or Path("runs") / grid["name"]):
        path = Path(folder) / f"{grid['name']}-{slug(cell.setting)}-{cell.method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        cell.cfg.to_yaml(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="grid YAML (configs/*.yaml)")
    parser.add_argument("--out", help="output folder (default runs/<grid name>)")
    parser.add_argument("--resume", action="store_true", help="skip finished cells, resume unfinished ones")
    parser.add_argument("--expand", metavar="DIR", help="only write one train config per cell into DIR")
    args = parser.parse_args(argv)
    try:
        if args.expand:
            for path in write_configs(args.grid, args.expand, args.out):
                print(path)
            return 0
        data = reproduce(args.grid, args.out, args.resume)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    print((Path(data["out"]) / "results.md").read_text())
    print(f"trained {len(data['trained'])} cell(s), skipped {data['skipped']} in {data['wall_s']} s; "
          f"table in {data['out']}/results.md and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
