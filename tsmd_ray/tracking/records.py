"""What a run logs, as MLflow batches: params, metrics, the run file and the output artifacts."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from .store import log, short_error

RUN_FILE = "mlflow.json"  # in a run's output directory: where (and whether) it was tracked
CURVES_FILE = "learning_curves.png"
ARTIFACT_FILES = ("config.yaml", "evaluation.json", "metrics.jsonl", CURVES_FILE)
SUMMARY_PREFIX = "test/"  # one value per run (the final meta-test)
_METRIC_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_PARAM_BATCH = 100


def param_value(value: Any) -> str:
    """A config value as an MLflow param (lists and mappings as JSON)."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def config_params(cfg: Config | Mapping[str, Any]) -> dict[str, str]:
    """Every config key with its value as a param."""
    data = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    return {k: param_value(v) for k, v in data.items()}


def log_params(client: Any, run_id: str, params: Mapping[str, str], existing: Mapping[str, str] | None = None) -> None:
    """Log ``params`` in batches; keys already logged (a resumed run) are left as they are."""
    from mlflow.entities import Param

    existing = existing or {}
    todo = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v[:6000])
    if changed:
        log.info("run %s keeps its first values of %s (MLflow params cannot change)", run_id, ", ".join(changed))
    for start in range(0, len(todo), _PARAM_BATCH):
        client.log_batch(run_id, params=todo[start:start + _PARAM_BATCH])


def mlflow_step(name: str, step: int) -> int:
    """The MLflow step of a metric: the meta-iteration, except 0 for the one-value summaries
    (``test/...``), which the MLflow chart view then draws as bars comparing runs."""
    return 0 if name.startswith(SUMMARY_PREFIX) else int(step)


def log_metrics(client: Any, run_id: str, records: Sequence[tuple[int, Mapping[str, Any]]],
                skip: set[tuple[str, int]] | None = None) -> int:
    """Log ``(step, {name: value})`` records at :func:`mlflow_step`; ``(name, MLflow step)`` pairs
    in ``skip`` are left out. A step recorded twice (a resumed run re-trains the iterations after its
    checkpoint) keeps its last value, as the curves do."""
    from mlflow.entities import Metric

    latest = {(name, mlflow_step(name, step)): float(value)
              for step, values in records for name, value in values.items()
              if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, step) for (name, step), value in latest.items()
               if skip is None or (name, step) not in skip]
    for start in range(0, len(metrics), _METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _METRIC_BATCH])
    return len(metrics)


def logged_steps(client: Any, run_id: str) -> set[tuple[str, int]]:
    """``(name, step)`` of every metric value the run holds (what a replay must not repeat)."""
    run = client.get_run(run_id)
    return {(key, m.step) for key in run.data.metrics for m in client.get_metric_history(run_id, key)}


def read_run_file(out: str | Path) -> dict[str, Any]:
    """``mlflow.json`` of a run's output directory (empty when missing or unreadable)."""
    path = Path(out) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_run_file(out: str | Path, **info: Any) -> None:
    """Update ``mlflow.json`` of a run's output directory with ``info`` (atomically)."""
    from ..checkpoint import atomic_write

    data = {**read_run_file(out), **info}
    atomic_write(Path(out) / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def existing_run(client: Any, info: Mapping[str, Any], uri: str) -> Any | None:
    """The run (``mlflow.entities.Run``) a run file names, when it lives in this store and is not
    deleted."""
    run_id = info.get("run_id")
    if not run_id or info.get("tracking_uri") != uri:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:
        return None
    return run if run.info.lifecycle_stage != "deleted" else None


def run_parent(run: Any) -> str | None:
    """The run id a run is nested under in the store (``None``: a top-level run)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    return run.data.tags.get(MLFLOW_PARENT_RUN_ID)


def write_learning_curves(out: str | Path, title: str | None = None) -> Path | None:
    """Draw ``learning_curves.png`` from ``metrics.jsonl`` of ``out`` (``None`` without metrics)."""
    metrics = Path(out) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    from ..plots import plot_learning_curves

    return plot_learning_curves(metrics, Path(out) / CURVES_FILE, title=title)


def log_run_artifacts(client: Any, run_id: str, out: str | Path, title: str | None = None) -> list[str]:
    """Log ``config.yaml``, ``evaluation.json``, ``metrics.jsonl`` and the learning-curve PNG
    (drawn from ``metrics.jsonl``) of the output directory ``out``; returns the logged names."""
    out = Path(out)
    try:
        write_learning_curves(out, title)
    except Exception as exc:  # a figure is never worth failing a run
        log.warning("could not draw the learning curves of %s: %s", out, short_error(exc))
    logged = []
    for name in ARTIFACT_FILES:
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
            logged.append(name)
    return logged
