"""Run a grid of trainings and write the paper's Table 1: ``python -m tsmd_ray.reproduce --grid FILE``.

A grid file (``configs/*.yaml``, see ``configs/README.md``) holds

    name: omniglot-cpu                 # table title and default output folder runs/<name>
    base_from: other.yaml              # optional: that grid's base and method_overrides, this file's on top
    base: {Config keys shared by every cell}
    methods: [student, fixed-teacher, tsmd, oracle]           # table rows
    seeds: [0, 1, 2]               # optional: one training per seed, pooled; paired differences per seed
    settings:                                                  # table columns
      - {label: "5-way 1-shot", ways: 5, shots: 1}             # may hold its own method_overrides
    method_overrides: {fixed-teacher: {kd_loss: rkd}}          # optional, per method
    runner: tasks | inline                                     # optional, see below
    mlflow: true | false           # optional: the grid as one MLflow run over its cells (default: base.mlflow)

and expands to one :class:`~tsmd_ray.config.Config` per (setting, method) cell, trained in
``OUT/<setting>/<method>/`` by :func:`tsmd_ray.train.run` and meta-tested on ``test_episodes``
episodes (paper: 800). With ``backend: ray`` and ``runner: tasks`` (the default for Ray) every
cell is one Ray task (``threads_per_worker`` CPUs, ``gpus_per_worker`` GPUs) meta-trained in that
task's process, so the cluster runs cells side by side; ``runner: inline`` trains the cells one
after the other from this process, each on the cluster through its own Ray actors
(``tsmd_ray.distributed.RayRunner``). ``backend: local`` runs everything here, one cell at a time.

``--resume`` skips every cell whose ``evaluation.json`` exists (and whose ``config.yaml`` matches
the grid), and resumes unfinished cells from their ``checkpoint.pt`` unless it was trained with
another config (keys beyond ``iterations``, ``patience`` and the other ones a run may change when
resumed): such a cell trains from the start. The table (rows Student,
Fixed teacher, Ours, Oracle; one column per setting; mean ± 95% CI in percent) is written to
``OUT/results.md``, ``OUT/results.json`` and ``OUT/results.png`` with, below it, the paired
differences of every method against Student on the same seeded test episodes (``tsmd_ray.tables``).

MLflow (grid key ``mlflow``, default ``base.mlflow``): the grid is one run, ``reproduce <name>``,
opened before its cells train (``--resume`` reopens it) and the parent of every cell's run: cells
with ``mlflow: true`` nest under it as they train; finished cells that were not tracked (``mlflow:
false``, trained elsewhere with ``train --config``, or while the store was away) are uploaded into
it when the grid ends. The table goes in as metrics (``<setting>/<method>/acc``, ``.../ci95``,
``<setting>/<method>_minus_student/mean``) and files. ``--expand DIR`` only writes the cells'
configs (one YAML per cell, of ``--methods`` if given, for ``python -m tsmd_ray.train --config``);
``--table-only`` trains nothing and writes the table of the cells finished so far, recording them
in the grid's run;
``--status`` only prints where each cell stands (the last iteration, the best and last validation,
the test accuracy of a finished cell), for grids that train over several sessions.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from . import tracking
from .config import Config
from .errors import RequestError, ending, entry_point, failure_message
from .grid import (Cell, check_methods, expand, finished, grid_out, load_grid, progress_table, slug,
                   stale_checkpoint, write_configs)
from .preflight import check_out_dir, check_training
from .tables import FAILED, collect, markdown_table, plot_table
from .training import clear_run

log = logging.getLogger("tsmd_ray.reproduce")

CANCEL_WAIT_S = 30.0  # how long interrupted cells get to end their MLflow runs


def check_cells(cells: Sequence[Cell], runner: str) -> None:
    """What each cell's training needs (files, data, models, resources), before anything starts."""
    datasets: dict[tuple[Any, ...], str] = {}
    for cell in cells:
        cfg = cell.cfg
        key = (cfg.dataset, cfg.data_root, cfg.cache_dir)
        try:
            if cfg.backend == "ray" and runner == "tasks":  # one Ray task per cell, trained in its process:
                cfg.replace(backend="local")  # what the task trains, and
                cfg = cfg.replace(workers=1)  # its CPUs and GPUs, those of one worker
            datasets[key] = check_training(cfg, datasets.get(key))
        except RequestError as exc:
            raise RequestError(exc.rule, f"cell {cell.name}: {exc}") from None


# ---------------------------------------------------------------------- running cells
def run_cell(cfg_dict: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Meta-train and meta-test one cell (here or inside a Ray task), its MLflow run nested under the
    grid's run ``parent_run_id``; returns its evaluation."""
    import torch

    from .train import run

    cfg = Config.from_dict(cfg_dict)
    if cfg.backend == "local":
        torch.set_num_threads(max(1, cfg.threads_per_worker))
    started = time.perf_counter()
    result = run(cfg, parent_run_id=parent_run_id)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(cfg.out, "wall.json").write_text(json.dumps({"wall_s": result["wall_s"]}))
    return result


def record_failure(cell: Cell, exc: BaseException) -> None:
    """Write ``failed.json`` in the cell's folder; the table shows the cell as failed."""
    message = failure_message(exc)
    log.error("cell %s failed: %s", cell.name, message)
    cell.out.mkdir(parents=True, exist_ok=True)
    (cell.out / FAILED).write_text(json.dumps({"setting": cell.setting, "method": cell.method, "seed": cell.seed,
                                               "error": message}))


def run_cells(cells: Sequence[Cell], runner: str, parent_run_id: str | None = None) -> dict[str, dict[str, Any]]:
    """Train the cells (here, or as Ray tasks); ``{cell name: evaluation}`` of those that finished."""
    results: dict[str, dict[str, Any]] = {}
    ray_cells = [c for c in cells if c.cfg.backend == "ray" and runner == "tasks"]
    for cell in cells:
        if cell in ray_cells:
            continue
        log.info("training cell %s in %s", cell.name, cell.out)
        try:
            results[cell.name] = run_cell(cell.cfg.to_dict(), parent_run_id)
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
                                                name=f"cell:{slug(cell.setting)}/{cell.method}/{cell.seed}")
            pending[task.remote(cfg.to_dict(), parent_run_id)] = cell
        log.info("submitted %d cell(s) as Ray tasks", len(pending))
        try:
            _collect(pending, results)
        except BaseException as exc:  # Ctrl+C, SIGTERM, a lost cluster: the cells end their runs too
            _cancel(pending, exc)
            raise
    return results


def _collect(pending: dict[Any, Cell], results: dict[str, dict[str, Any]]) -> None:
    """Wait for the cells' Ray tasks; a failed cell is recorded and the others go on."""
    import ray

    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(done[0])
        try:
            results[cell.name] = ray.get(done[0])
            log.info("cell %s finished (%d left)", cell.name, len(pending))
        except Exception as exc:  # the task raised (after its retries): record it, go on
            record_failure(cell, getattr(exc, "cause", None) or exc)


def _cancel(pending: dict[Any, Cell], exc: BaseException) -> None:
    """Interrupt the cells' running tasks (``KeyboardInterrupt`` in each, so that its training ends
    its MLflow run as KILLED), give them a moment to do so, and end the runs of those that could not."""
    import ray

    for ref in pending:
        ray.cancel(ref)
    ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
    for cell in pending.values():
        tracking.end_run_in(cell.out, *ending(exc))


def table_metrics(data: dict[str, Any]) -> dict[str, float]:
    """The table as MLflow metrics: ``<setting>/<method>/acc`` and ``/ci95``, and the paired differences
    pooled over seeds, ``<setting>/<method>_minus_student/mean`` and ``/ci95``."""
    metrics: dict[str, float] = {}
    for method, row in data["table"].items():
        for setting, entry in row.items():
            if "mean" in entry:
                key = f"{slug(setting)}/{method}"
                metrics |= {f"{key}/acc": entry["mean"], f"{key}/ci95": entry["ci95"]}
    for method, by_setting in data["paired"].items():
        for setting, entry in by_setting.items():
            key = f"{slug(setting)}/{method}_minus_student"
            metrics |= {f"{key}/mean": entry["pooled"]["mean"], f"{key}/ci95": entry["pooled"]["ci95"]}
    return metrics


def write_table(grid: dict[str, Any], cells: Sequence[Cell], out: Path) -> dict[str, Any]:
    data = collect(cells)
    title = grid.get("description") or grid["name"]
    (out / "results.md").write_text(markdown_table(data, title))
    (out / "results.json").write_text(json.dumps(data, indent=2))
    if any("mean" in e for row in data["table"].values() for e in row.values()):
        plot_table(data, out / "results.png", title)
    return data


def reproduce(grid_path: str | Path, out: str | Path | None = None, resume: bool = False,
              methods: Sequence[str] | None = None, table_only: bool = False) -> dict[str, Any]:
    """Run the grid (skipping finished cells with ``resume``; only ``methods`` if given; no cell with
    ``table_only``, which implies ``resume``) and write the table of every finished cell; returns its data."""
    resume = resume or table_only
    grid = load_grid(grid_path)
    check_methods(grid, methods, grid_path)
    out = grid_out(grid, out)
    check_out_dir("--out", out)
    cells = expand(grid, out, resume)
    todo = [] if table_only else [c for c in cells if not (resume and finished(c))
                                  and (not methods or c.method in methods)]
    check_cells(todo, grid.get("runner", "tasks"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    skipped = len(cells) - len(todo)
    for cell in todo:  # outputs of an earlier run: all stale on a fresh grid, those of another config on --resume
        stale = stale_checkpoint(cell) if resume else []
        if stale:
            log.warning("cell %s: its checkpoint was trained with other %s: training it from the start",
                        cell.name, ", ".join(stale[:5]))
        (cell.out / FAILED).unlink(missing_ok=True)  # an earlier failure: this cell is trained again
        if stale or not resume:
            clear_run(cell.out)
            for name in ("wall.json", tracking.RUN_FILE):
                (cell.out / name).unlink(missing_ok=True)
    log.info("grid %s: %d cell(s), %d finished and skipped, %d to train", grid["name"], len(cells), skipped, len(todo))
    started = time.perf_counter()
    parent = tracking.open_grid_run(grid["name"], grid["base"].get("experiment", Config.experiment), out, resume) \
        if grid.get("mlflow", grid["base"].get("mlflow", True)) else None
    try:
        run_cells(todo, grid.get("runner", "tasks"), parent)
    except BaseException as exc:  # the cells that finished are nested, the grid's run ends KILLED or FAILED
        if parent:
            tracking.close_grid_run(parent, out, [c.out for c in cells], {}, *ending(exc))
        raise
    data = write_table(grid, cells, out)
    data.update(trained=[c.name if grid.get("seeds") else f"{c.setting}/{c.method}" for c in todo], skipped=skipped,
                wall_s=round(time.perf_counter() - started, 1), out=str(out),
                finished=sum(finished(c) for c in cells), cells=len(cells))
    if parent:
        tracking.close_grid_run(parent, out, [c.out for c in cells], table_metrics(data))
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="grid YAML (configs/*.yaml)")
    parser.add_argument("--out", help="output folder (default runs/<grid name>)")
    parser.add_argument("--resume", action="store_true", help="skip finished cells, resume unfinished ones")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="train (or --expand) only these rows now (the table shows every finished cell)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--table-only", action="store_true",
                      help="train nothing: write the table of the finished cells and record them in the grid's "
                           "MLflow run (cells trained elsewhere, e.g. with train --config on --expand's configs)")
    only.add_argument("--expand", metavar="DIR", help="only write one train config per cell into DIR")
    only.add_argument("--status", action="store_true",
                      help="train and write nothing: print where each cell stands (iteration, best and last "
                           "validation, test accuracy once finished)")
    return parser


def _main(args: argparse.Namespace) -> int:
    if args.expand:
        for path in write_configs(args.grid, args.expand, args.out, args.methods):
            print(path)
        return 0
    if args.status:
        grid = load_grid(args.grid)
        out = grid_out(grid, args.out)
        if not out.is_dir():
            log.warning("%s does not exist: no cell of grid %s has started there (is --out right?)", out, grid["name"])
        print(progress_table(expand(grid, out, resume=True)), end="")
        return 0
    data = reproduce(args.grid, args.out, args.resume, args.methods, args.table_only)
    print((Path(data["out"]) / "results.md").read_text())
    print(f"trained {len(data['trained'])} cell(s) in {data['wall_s']} s; {data['finished']} of {data['cells']} "
          f"cells finished; table in {data['out']}/results.md and results.png")
    return 0


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.status and (args.resume or args.methods):
        parser.error("--status trains nothing: drop --resume and --methods")
    if args.expand and args.resume:
        parser.error("--expand only writes configs: drop --resume here and pass it to train --config")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(_parse_args(argv)), resumable=True)


if __name__ == "__main__":
    sys.exit(main())
