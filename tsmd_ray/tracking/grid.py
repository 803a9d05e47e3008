"""One MLflow run per results grid (``python -m tsmd_ray.reproduce``): the parent of every cell's
run, holding the table.

The grid's run opens before its cells train (``--resume`` reopens it from ``OUT/mlflow.json``), so
cells that track themselves nest under it as they run. When the grid ends, every finished cell not
yet nested there (trained with ``mlflow: false``, by ``train --config`` elsewhere, or while the
store was away) is uploaded into it from its folder, and the table goes in as metrics and files.
Tracking never stops the grid: a store that does not answer costs one warning.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from .ending import end_run
from .naming import source_tags
from .records import existing_run, log_metrics, read_run_file, run_parent, write_run_file
from .store import connect, ensure_experiment, log, resolve_tracking_uri, short_error
from .upload import upload_run

GRID_TAG = "tsmd.grid"


def open_grid_run(name: str, experiment: str, out: Path, resume: bool) -> str | None:
    """Create the grid's run, or on ``resume`` reopen the one ``out/mlflow.json`` names; its id, or
    ``None`` when the store does not answer."""
    uri = resolve_tracking_uri()
    try:
        client = connect(uri)
        experiment_id = ensure_experiment(client, experiment, uri)
        run = existing_run(client, read_run_file(out), uri) if resume else None
        run_id = run.info.run_id if run else None
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {**source_tags(), "tsmd.kind": "reproduce", GRID_TAG: name, "tsmd.out": str(out.resolve())}
            run_id = client.create_run(experiment_id, run_name=f"reproduce {name}", tags=tags).info.run_id
        write_run_file(out, tracking_uri=uri, experiment=experiment, experiment_id=experiment_id, run_id=run_id,
                       status="running", error=None)
        log.info("grid %s: MLflow run %s at %s%s", name, run_id, uri, " (resumed)" if resume else "")
        return run_id
    except Exception as exc:
        log.warning("grid %s is not tracked in MLflow (%s); its cells and table stay in %s", name,
                    short_error(exc), out)
        return None


def nest_cells(run_id: str, cells: Iterable[Path]) -> tuple[list[str], list[str]]:
    """Upload every finished cell (``evaluation.json``) not yet nested under ``run_id`` in this
    store; returns the cells' folders it uploaded and those it could not (each with a warning: one
    cell's failure does not keep the others out)."""
    uri = resolve_tracking_uri()
    client = connect(uri)
    uploaded, failed = [], []
    for out in cells:
        info = read_run_file(out)
        existing = existing_run(client, info, uri) if info.get("status") == "logged" else None
        if (out / "evaluation.json").is_file() and not (existing and run_parent(existing) == run_id):
            try:
                upload_run(out, tracking_uri=uri, parent_run_id=run_id)
            except Exception as exc:
                log.warning("cell %s is not in MLflow (%s)", out, short_error(exc))
                failed.append(str(out))
            else:
                uploaded.append(str(out))
    return uploaded, failed


def close_grid_run(run_id: str, out: Path, cells: Iterable[Path], table: Mapping[str, float],
                   status: str = "FINISHED", error: str | None = None) -> None:
    """Nest the finished cells, log ``table`` (metric name: value, stepped by the number of finished
    cells, so the history shows the table growing) and the grid's files; end the run with ``status``."""
    uri = resolve_tracking_uri()
    client = None
    try:
        client = connect(uri)
        cells = list(cells)
        _, failed = nest_cells(run_id, cells)
        if failed and status == "FINISHED":
            status, error = "FAILED", f"{len(failed)} cell(s) not uploaded, first {failed[0]}"
        step = sum((c / "evaluation.json").is_file() for c in cells)
        log_metrics(client, run_id, [(step, dict(table))])
        for name in ("results.md", "results.json", "results.png", "grid.yaml"):
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name))
        end_run(client, run_id, status, error)
        write_run_file(out, status="logged" if status == "FINISHED" else status.lower(), error=error)
        log.info("grid table and %d cell run(s) in MLflow run %s at %s (%s)", step - len(failed), run_id, uri,
                 status)
    except Exception as exc:
        with contextlib.suppress(Exception):
            if client is not None:
                end_run(client, run_id, "FAILED", short_error(exc))
        log.warning("the grid's MLflow run %s is incomplete (%s); the table is in %s", run_id, short_error(exc), out)

