"""Ending MLflow runs however their work ended: FINISHED, FAILED or KILLED (Ctrl+C, SIGTERM), with
the error on one line as the run's ``tsmd.error`` tag (:func:`tsmd_ray.errors.ending`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ending
from .records import read_run_file, write_run_file
from .store import connect, log, short_error

ERROR_TAG = "tsmd.error"
_TAG_LIMIT = 5000  # MLflow's limit on a tag value


def end_run(client: Any, run_id: str, status: str, error: str | None = None) -> None:
    """End ``run_id`` with ``status``; ``error`` becomes its ``tsmd.error`` tag."""
    if error:
        client.set_tag(run_id, ERROR_TAG, error[:_TAG_LIMIT])
    client.set_terminated(run_id, status=status)


def end_child_runs(client: Any, parent_run_id: str, status: str, error: str | None = None) -> list[str]:
    """End the nested runs of ``parent_run_id`` that are still RUNNING (a sweep's interrupted
    trials); returns their ids."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                   "and attributes.status = 'RUNNING'")
    for run in children:
        end_run(client, run.info.run_id, status, error)
    return [run.info.run_id for run in children]


def end_run_in(out: str | Path, status: str, error: str | None = None) -> bool:
    """End the run recorded in ``out``'s run file if MLflow still shows it RUNNING (its process
    could not: a Ray worker that was killed); ``True`` if it did. Never raises."""
    info = read_run_file(out)
    if not info.get("run_id") or not info.get("tracking_uri"):
        return False
    try:
        client = connect(info["tracking_uri"])
        if client.get_run(info["run_id"]).info.status != "RUNNING":
            return False
        end_run(client, info["run_id"], status, error)
        write_run_file(out, status=status.lower(), error=error)
        return True
    except Exception as exc:  # tracking never hides the error that ended the work
        log.warning("could not end MLflow run %s: %s", info["run_id"], short_error(exc))
        return False


@contextlib.contextmanager
def ends_run_in(out: str | Path) -> Iterator[None]:
    """However the block ends by an exception, the run recorded in ``out`` is not left RUNNING."""
    try:
        yield
    except BaseException as exc:
        end_run_in(out, *ending(exc))
        raise
