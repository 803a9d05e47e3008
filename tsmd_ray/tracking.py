"""MLflow tracking of training runs and sweeps, and the upload of runs that could not be tracked.

Every ``tsmd_ray.train`` run (and every Tune trial) with ``mlflow: true`` becomes one MLflow run:

- params: every :class:`~tsmd_ray.config.Config` value;
- metrics (stable, grouped names): ``train/<model>/loss``, ``train/<model>/acc`` and
  ``train/tasks_per_s`` per meta-iteration, ``val/<model>_acc`` at each meta-validation,
  ``test/<model>_acc`` and ``test/<model>_ci95`` (mean and 95% CI over the test episodes);
- artifacts: ``config.yaml``, ``evaluation.json``, ``metrics.jsonl``, ``learning_curves.png``;
- models: the meta-trained student (and the adapted teacher of ``tsmd``/``oracle``) as MLflow
  PyTorch models in the ``pt2`` format, with an input example shaped like the checkpoint's data.

Where: ``$MLFLOW_TRACKING_URI`` when set (a tracking server, ``http://host:5000``, for anything
multi-node), otherwise the SQLite database ``$TSMD_HOME/mlflow.db`` (``TSMD_HOME`` defaults to
``~/.tsmd_ray``) with artifacts in ``$TSMD_HOME/mlartifacts``: absolute paths, so a Ray job's
temporary working directory does not matter. The legacy ``./mlruns`` file store is never used.

When the tracking server cannot be reached, training goes on: one warning, the results stay in
the run's output directory (``checkpoint.pt``, ``metrics.jsonl``, ``evaluation.json``), and

    python -m tsmd_ray.tracking upload RUN_OUT_DIR [RUN_OUT_DIR ...]

replays them into MLflow later. ``python -m tsmd_ray.tracking where`` prints the tracking URI.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import Config

log = logging.getLogger(__name__)

RUN_FILE = "mlflow.json"  # in a run's output directory: where (and whether) it was tracked
CURVES_FILE = "learning_curves.png"
ARTIFACT_FILES = ("config.yaml", "evaluation.json", "metrics.jsonl", CURVES_FILE)
# MLflow retries HTTP requests 7 times with exponential backoff and waits 120 s for each by
# default, minutes per call when the server is down. These bounds apply unless already set.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PROBE_TIMEOUT_S = 5
_METRIC_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_PARAM_BATCH = 100


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI, ...)."""


# ---------------------------------------------------------------------- where
def tsmd_home() -> Path:
    """``$TSMD_HOME`` or ``~/.tsmd_ray`` (absolute)."""
    return Path(os.environ.get("TSMD_HOME") or Path.home() / ".tsmd_ray").expanduser().resolve()


def default_tracking_uri() -> str:
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


def _client(uri: str):
    from mlflow import MlflowClient

    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def connect(uri: str | None = None, timeout: float = PROBE_TIMEOUT_S):
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
    """Id of experiment ``name``, created (with an absolute artifact root) when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except Exception:  # created meanwhile by a concurrent trial
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# ---------------------------------------------------------------------- values
def param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def config_params(cfg: Config | Mapping[str, Any]) -> dict[str, str]:
    data = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    return {k: param_value(v) for k, v in data.items()}


def default_run_name(cfg: Config) -> str:
    return f"{cfg.method}-{cfg.dataset}-{cfg.ways}w{cfg.shots}s"


def run_tags(cfg: Config) -> dict[str, str]:
    return {"tsmd.method": cfg.method, "tsmd.dataset": cfg.dataset, "tsmd.setting": f"{cfg.ways}-way {cfg.shots}-shot",
            "tsmd.out": str(Path(cfg.out).resolve())}


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


def log_metrics(client: Any, run_id: str, records: Sequence[tuple[int, Mapping[str, Any]]],
                skip: set[tuple[str, int]] | None = None) -> int:
    """Log ``(step, {name: value})`` records; ``(name, step)`` pairs in ``skip`` are left out."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, int(step))
               for step, values in records for name, value in values.items()
               if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
               and (skip is None or (name, int(step)) not in skip)]
    for start in range(0, len(metrics), _METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _METRIC_BATCH])
    return len(metrics)


def read_run_file(out: str | Path) -> dict[str, Any]:
    path = Path(out) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_run_file(out: str | Path, **info: Any) -> None:
    from .checkpoint import atomic_write

    data = {**read_run_file(out), **info}
    atomic_write(Path(out) / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def _existing_run(client: Any, info: Mapping[str, Any], uri: str) -> str | None:
    """The run id recorded in a run file when it lives in this store and is not deleted."""
    run_id = info.get("run_id")
    if not run_id or info.get("tracking_uri") != uri:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:
        return None
    return run_id if run.info.lifecycle_stage != "deleted" else None


# ---------------------------------------------------------------------- artifacts and models
def write_learning_curves(out: str | Path, title: str | None = None) -> Path | None:
    metrics = Path(out) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    from .plots import plot_learning_curves

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


def input_example(in_channels: int, image_size: int, batch: int = 5):
    """A float32 NCHW batch shaped like the network input (batch > 1 keeps the batch dim dynamic)."""
    import numpy as np

    return np.random.default_rng(0).standard_normal((max(2, batch), in_channels, image_size, image_size)).astype("float32")


def _pip_requirements() -> list[str]:
    import mlflow
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]


def log_models_from_checkpoint(run_id: str, checkpoint: str | Path, uri: str) -> list[str]:
    """Log the student (and the adapted teacher) of ``checkpoint`` as MLflow PyTorch models.

    The models are the meta-learned initialisations (adapt them to a task before predicting);
    ``pt2`` format (``torch.export``) with an input example shaped from the checkpoint's data
    spec; where export fails, the pickle format is used instead (loading it needs tsmd_ray).
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from .checkpoint import load_checkpoint
    from .engine import DataSpec, MetaLearner

    payload = load_checkpoint(checkpoint)
    cfg = Config.from_checkpoint(payload["config"])
    data = payload["data"]
    learner = MetaLearner(cfg, DataSpec(int(data["in_channels"]), int(data["image_size"])))
    learner.load_state_dict(payload["learner"])
    example = input_example(int(data["in_channels"]), int(data["image_size"]), cfg.ways)
    metadata = {"iteration": int(payload["iteration"]) + 1, "dataset": data.get("dataset", cfg.dataset),
                "ways": cfg.ways, "shots": cfg.shots, "preprocess": data.get("preprocess", {}),
                "note": "meta-learned initialisation: adapt on a task's support set before predicting "
                        "(batch-norm statistics come from the batch)"}
    models = {"student": learner.student}
    if cfg.adapts_teacher:
        models["teacher"] = learner.teacher
    mlflow.set_tracking_uri(uri)
    logged = []
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        for name, module in models.items():
            if module is None:
                continue
            module = module.float().eval()
            with torch.no_grad():
                signature = infer_signature(example, module(torch.from_numpy(example)).numpy())
            kwargs = dict(name=name, input_example=example, signature=signature,
                          pip_requirements=_pip_requirements(), metadata=metadata)
            try:
                mlflow.pytorch.log_model(module, serialization_format="pt2", **kwargs)
            except Exception as exc:
                if isinstance(exc, (ConnectionError, OSError)) or "Connection" in type(exc).__name__:
                    raise
                log.warning("torch.export of the %s failed (%s); logging it in the pickle format",
                            name, short_error(exc))
                mlflow.pytorch.log_model(module, serialization_format="pickle", **kwargs)
            logged.append(name)
    return logged


def _run_status(out: Path) -> str:
    return "FINISHED" if (out / "evaluation.json").is_file() else "FAILED"


# ---------------------------------------------------------------------- the reporter
class NullTracker:
    """Tracking switched off: a reporter that does nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None
    active = False

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def report(self, step: int, metrics: dict[str, float]) -> None:
        pass


class MlflowTracker:
    """One MLflow run for one training run: a :class:`~tsmd_ray.training.Reporter` and a context
    manager (enter: create or resume the run and log the params; exit: log artifacts and models
    and end the run with the right status).

    Never raises for tracking problems: the first one is logged as a single warning, tracking
    stops, ``mlflow.json`` in the output directory records ``pending_upload`` and the results
    stay on disk for ``python -m tsmd_ray.tracking upload``.
    """

    def __init__(self, cfg: Config, *, tracking_uri: str | None = None, parent_run_id: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None,
                 log_models: bool = True) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.parent_run_id = parent_run_id
        self.name = run_name or default_run_name(cfg)
        self.tags = {**run_tags(cfg), **(tags or {})}
        self.log_models = log_models
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.active = False
        self.failed: str | None = None

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "MlflowTracker":
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            status = "KILLED"
        else:
            status = "FAILED"
        self.finish(status, with_models=exc_type is None)

    def start(self) -> "MlflowTracker":
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.client = connect(self.tracking_uri)
            self.experiment_id = ensure_experiment(self.client, self.cfg.experiment, self.tracking_uri)
            info = read_run_file(self.out)
            resumed = _existing_run(self.client, info, self.tracking_uri) if self.cfg.resume else None
            params = config_params(self.cfg)
            if resumed:
                self.run_id = resumed
                self.client.update_run(resumed, status="RUNNING")
                log_params(self.client, resumed, params, self.client.get_run(resumed).data.params)
            else:
                from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

                tags = dict(self.tags)
                if self.parent_run_id:
                    tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
                run = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags)
                self.run_id = run.info.run_id
                log_params(self.client, self.run_id, params)
            if self.cfg.resume and (self.out / "metrics.jsonl").is_file():
                self._replay_earlier_metrics()
            self.active = True
            write_run_file(self.out, tracking_uri=self.tracking_uri, experiment=self.cfg.experiment,
                           experiment_id=self.experiment_id, run_id=self.run_id,
                           parent_run_id=self.parent_run_id, status="running", error=None)
            log.info("MLflow run %s (%s) in experiment %r at %s%s", self.run_id, self.name, self.cfg.experiment,
                     self.tracking_uri, " (resumed)" if resumed else "")
        except Exception as exc:
            self._fail(exc)
        return self

    def _replay_earlier_metrics(self) -> None:
        """A resumed run's earlier records (untracked, or tracked before the server went away)."""
        from .plots import read_metrics

        run = self.client.get_run(self.run_id)
        skip = {(key, m.step) for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key)}
        records = [(int(r["step"]), r) for r in read_metrics(self.out / "metrics.jsonl")]
        log_metrics(self.client, self.run_id, records, skip)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        try:
            log_metrics(self.client, self.run_id, [(step, metrics)])
        except Exception as exc:
            self._fail(exc)

    def finish(self, status: str = "FINISHED", with_models: bool = True) -> None:
        if not self.active:
            return
        try:
            log_run_artifacts(self.client, self.run_id, self.out, title=self.name)
            if with_models and self.log_models and (self.out / "checkpoint.pt").is_file():
                log_models_from_checkpoint(self.run_id, self.out / "checkpoint.pt", self.tracking_uri)
            self.client.set_terminated(self.run_id, status=status)
            write_run_file(self.out, status="logged" if status == "FINISHED" else status.lower())
            self.active = False
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        first = self.failed is None
        self.failed = short_error(exc)
        self.active = False
        with contextlib.suppress(Exception):
            write_run_file(self.out, tracking_uri=self.tracking_uri, experiment=self.cfg.experiment,
                           run_id=self.run_id, parent_run_id=self.parent_run_id,
                           status="pending_upload", error=self.failed)
        if first:
            log.warning("MLflow tracking stopped (%s). Training goes on and keeps its results in %s; "
                        "upload them later with: python -m tsmd_ray.tracking upload %s",
                        self.failed, self.out.resolve(), self.out.resolve())


def tracker(cfg: Config, **kwargs: Any) -> MlflowTracker | NullTracker:
    """The tracker of ``cfg``: an :class:`MlflowTracker` when ``cfg.mlflow``, else a no-op."""
    return MlflowTracker(cfg, **kwargs) if cfg.mlflow else NullTracker()


# ---------------------------------------------------------------------- upload later
def upload_run(out: str | Path, *, tracking_uri: str | None = None, experiment: str | None = None,
               parent_run_id: str | None = None, log_models: bool = True) -> str:
    """Replay a run's output directory into MLflow: params from ``config.yaml``, every record of
    ``metrics.jsonl``, the artifacts and the models of ``checkpoint.pt``. A run this store
    already holds (partly tracked before the server went away) is completed, not duplicated.
    Returns the run id; raises :class:`TrackingError` when the store does not answer."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from .plots import read_metrics

    out = Path(out).resolve()
    if not (out / "config.yaml").is_file():
        raise FileNotFoundError(f"{out} holds no config.yaml: not the output directory of a tsmd_ray run")
    cfg = Config.from_yaml(out / "config.yaml")
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    info = read_run_file(out)
    experiment = experiment or cfg.experiment
    experiment_id = ensure_experiment(client, experiment, uri)
    parent_run_id = parent_run_id or info.get("parent_run_id")
    run_id = _existing_run(client, info, uri)
    skip: set[tuple[str, int]] = set()
    if run_id:
        run = client.get_run(run_id)
        for key in run.data.metrics:
            skip |= {(key, m.step) for m in client.get_metric_history(run_id, key)}
        log_params(client, run_id, config_params(cfg), run.data.params)
    else:
        tags = {**run_tags(cfg), "tsmd.uploaded": "true"}
        tags["tsmd.out"] = str(out)
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run_id = client.create_run(experiment_id, run_name=default_run_name(cfg), tags=tags).info.run_id
        log_params(client, run_id, config_params(cfg))
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    count = log_metrics(client, run_id, [(int(r["step"]), r) for r in records], skip)
    log_run_artifacts(client, run_id, out, title=default_run_name(cfg))
    if log_models and (out / "checkpoint.pt").is_file():
        log_models_from_checkpoint(run_id, out / "checkpoint.pt", uri)
    client.set_terminated(run_id, status=_run_status(out))
    write_run_file(out, tracking_uri=uri, experiment=experiment, experiment_id=experiment_id, run_id=run_id,
                   parent_run_id=parent_run_id, status="logged", error=None)
    log.info("uploaded %s as MLflow run %s (%d metric values) to %s", out, run_id, count, uri)
    return run_id


# ---------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.tracking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="put runs that could not be tracked into MLflow")
    up.add_argument("out", nargs="+", help="output directories of tsmd_ray.train runs (or Tune trials)")
    up.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the local SQLite store")
    up.add_argument("--experiment", help="default: the run's configured experiment")
    up.add_argument("--parent-run-id", help="nest the uploaded runs under this run (a sweep)")
    up.add_argument("--no-models", action="store_true", help="do not log the student/teacher models")
    sub.add_parser("where", help="print the tracking URI in use and how to open the UI")
    args = parser.parse_args(argv)
    if args.command == "where":
        uri = resolve_tracking_uri()
        print(uri)
        if uri.startswith("sqlite:"):
            print(f"open the UI with: mlflow ui --backend-store-uri {uri}")
        return 0
    status = 0
    for out in args.out:
        try:
            run_id = upload_run(out, tracking_uri=args.tracking_uri, experiment=args.experiment,
                                parent_run_id=args.parent_run_id, log_models=not args.no_models)
            print(f"{out}: MLflow run {run_id}")
        except (TrackingError, FileNotFoundError, ValueError) as exc:
            log.error("%s: %s", out, exc)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
