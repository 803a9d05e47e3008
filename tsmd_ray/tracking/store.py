"""Where runs go and how to reach the store: tracking URI, artifact roots, connection, experiments."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("tsmd_ray.tracking")

# MLflow retries HTTP requests 7 times with exponential backoff and waits 120 s for each by
# default, minutes per call when the server is down. These bounds apply unless already set.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PROBE_TIMEOUT_S = 5
# The experiment-kind tag the MLflow UI reads to open an experiment on its runs table and charts
# (model training) rather than on its GenAI overview (traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


# MLflow 3.17's UI opens experiments on its GenAI or its model-training pages by a switch kept in
# the browser; this query parameter of a link selects model training.
UI_QUERY = "?workflowType=machine_learning"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI, ...)."""


def tsmd_home() -> Path:
    """``$TSMD_HOME`` or ``~/.tsmd_ray`` (absolute)."""
    return Path(os.environ.get("TSMD_HOME") or Path.home() / ".tsmd_ray").expanduser().resolve()


def default_tracking_uri() -> str:
    """The local SQLite store ``$TSMD_HOME/mlflow.db``."""
    return f"sqlite:///{tsmd_home() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the default SQLite store; a relative SQLite
    path is made absolute (a Ray job runs in a temporary working directory)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    path = _sqlite_path(uri)
    if path is not None and not path.is_absolute():
        uri = f"sqlite:///{path.resolve()}"
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Absolute artifact root for experiments created in a SQLite store (MLflow's own default
    is the relative ``./mlruns``); ``None`` leaves the choice to the server."""
    path = _sqlite_path(uri)
    if path is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (path.resolve().parent / "mlartifacts" / safe).as_uri()


def ui_link(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """Where the MLflow UI shows the experiments (an experiment, one of its runs) on its
    model-training pages: on the tracking server, or at ``mlflow ui``'s default address."""
    path = "/#/experiments" + (f"/{experiment_id}" if experiment_id else "") + (f"/runs/{run_id}" if run_id else "")
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return base + path + UI_QUERY


def bound_http_retries() -> None:
    """Short MLflow HTTP retries and timeouts unless the user set them."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def connect(uri: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> Any:
    """An ``MlflowClient`` for ``uri`` after one quick request (no retries, ``timeout`` s);
    raises :class:`TrackingError` when the store does not answer."""
    uri = resolve_tracking_uri(uri)
    bound_http_retries()
    try:
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, int(timeout)))):
            client = _client(uri)
            client.search_experiments(max_results=1)
    except Exception as exc:  # connection refused, DNS, auth, unsupported store, ...
        raise TrackingError(f"MLflow tracking at {uri} is not usable: {short_error(exc)}") from exc
    return client


def short_error(exc: BaseException) -> str:
    """First line of an exception, with its type, at most 300 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """Id of experiment ``name``, created (with an absolute artifact root) when missing, and
    marked as a model-training experiment unless it already declares a kind."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        kind = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name), tags=kind)
        except Exception:  # created meanwhile by a concurrent trial
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # created before tsmd_ray declared the kind
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id
