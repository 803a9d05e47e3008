"""The run tracker: one MLflow run per training run, fed by the Trainer as a reporter."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ending
from .datasets import dataset_input, try_dataset_info
from .ending import end_run
from .models import log_models_from_checkpoint
from .naming import run_name as config_run_name
from .naming import run_tags, source_tags
from .records import (config_params, existing_run, log_metrics, log_params, log_run_artifacts, logged_steps,
                      read_run_file, write_run_file)
from .store import connect, ensure_experiment, log, resolve_tracking_uri, short_error, ui_link


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


def _psutil_importable() -> bool:
    """MLflow's system metrics need psutil; Ray ships a copy that ``import ray`` puts on the path."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        try:
            import ray  # noqa: F401
            import psutil  # noqa: F401, F811
        except ImportError:
            return False
    return True


def start_system_metrics(run_id: str, uri: str, resumed: bool) -> Any:
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) for a
    run created with a client; ``None`` with a warning when psutil is missing."""
    if not _psutil_importable():
        log.warning("system metrics are off: MLflow needs psutil for them (pip install psutil)")
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class FinalSampleMonitor(SystemMetricsMonitor):
        """MLflow's monitor, but ``finish`` also logs a last sample with the unpublished window
        (MLflow drops it), so every run, even one shorter than the sampling interval, has them."""

        def finish(self) -> None:
            if self._process is not None:
                self._shutdown_event.set()
                self._process.join()
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
            super().finish()

    monitor = FinalSampleMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
    if not any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in monitor.monitors) and _has_cuda():
        log.warning("GPU system metrics are off: MLflow needs nvidia-ml-py for them (pip install nvidia-ml-py)")
    monitor.start()
    return monitor


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class MlflowTracker:
    """One MLflow run for one training run: a :class:`~tsmd_ray.training.Reporter` and a context
    manager (enter: create or resume the run, log the params, the dataset input and the code
    version, start the system metrics; exit: log artifacts and models and end the run with the
    right status).

    ``source``: MLflow source tags (default: this process's entry point and git commit);
    ``dataset_path``: the prepared dataset the run reads; ``dataset``: its
    :func:`~tsmd_ray.tracking.datasets.dataset_info` computed earlier (reused while its files are unchanged).

    Never raises for tracking problems: the first one is logged as a single warning, tracking
    stops, ``mlflow.json`` in the output directory records ``pending_upload`` and the results
    stay on disk for ``python -m tsmd_ray.tracking upload``.
    """

    def __init__(self, cfg: Config, *, tracking_uri: str | None = None, parent_run_id: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None, log_models: bool = True,
                 source: Mapping[str, str] | None = None, dataset_path: str | Path | None = None,
                 dataset: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.parent_run_id = parent_run_id
        self.name = run_name or config_run_name(cfg)
        self.source = dict(source) if source is not None else source_tags()
        self.tags = {**run_tags(cfg, nested=parent_run_id is not None), **(tags or {})}
        self.log_models = log_models
        self.dataset_path = dataset_path or (dataset or {}).get("source")
        self.dataset = dataset
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.monitor: Any = None
        self.active = False
        self.failed: str | None = None

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "MlflowTracker":
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        status, error = ending(exc)
        self.finish(status, with_models=exc is None, error=error)

    def start(self) -> "MlflowTracker":
        self.out.mkdir(parents=True, exist_ok=True)
        info = read_run_file(self.out)
        self._digest_dataset(info)
        try:
            self.client = connect(self.tracking_uri)
            self.experiment_id = ensure_experiment(self.client, self.cfg.experiment, self.tracking_uri)
            resumed = self._open_run(info)
            if self.dataset:
                self.client.log_inputs(self.run_id, datasets=[dataset_input(self.dataset)])
            if self.cfg.resume and (self.out / "metrics.jsonl").is_file():
                self._replay_earlier_metrics()
            self.active = True
            write_run_file(self.out, tracking_uri=self.tracking_uri, experiment=self.cfg.experiment,
                           experiment_id=self.experiment_id, run_id=self.run_id,
                           parent_run_id=self.parent_run_id, status="running", error=None)
            log.info("MLflow run %s (%s) in experiment %r at %s%s: %s", self.run_id, self.name, self.cfg.experiment,
                     self.tracking_uri, " (resumed)" if resumed else "",
                     ui_link(self.tracking_uri, self.experiment_id, self.run_id))
            if self.cfg.system_metrics:
                self.monitor = start_system_metrics(self.run_id, self.tracking_uri, resumed)
        except Exception as exc:
            self._fail(exc)
        return self

    def _digest_dataset(self, info: Mapping[str, Any]) -> None:
        """The dataset input (reusing the digest of the run file), kept in the run file for an upload."""
        if self.dataset_path is None:
            log.info("no prepared dataset path given: run %s gets no dataset input", self.name)
        self.dataset = try_dataset_info(self.dataset_path, self.dataset or info.get("dataset"))
        write_run_file(self.out, dataset=self.dataset, source=self.source)

    def _open_run(self, info: Mapping[str, Any]) -> bool:
        """Continue the run that the run file names (``--resume``, same store), else create one;
        log the params. Returns whether the run was resumed."""
        resumed = existing_run(self.client, info, self.tracking_uri) if self.cfg.resume else None
        if resumed:
            self.run_id = resumed.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            log_params(self.client, self.run_id, config_params(self.cfg), resumed.data.params)
        else:
            self.run_id = self._create_run()
            log_params(self.client, self.run_id, config_params(self.cfg))
        return resumed is not None

    def _create_run(self) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {**self.source, **self.tags}
        if self.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        return self.client.create_run(self.experiment_id, run_name=self.name, tags=tags).info.run_id

    def _replay_earlier_metrics(self) -> None:
        """A resumed run's earlier records (untracked, or tracked before the server went away)."""
        from ..plots import read_metrics

        records = [(int(r["step"]), r) for r in read_metrics(self.out / "metrics.jsonl")]
        log_metrics(self.client, self.run_id, records, logged_steps(self.client, self.run_id))

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        try:
            log_metrics(self.client, self.run_id, [(step, metrics)])
        except Exception as exc:
            self._fail(exc)

    def finish(self, status: str = "FINISHED", with_models: bool = True, error: str | None = None) -> None:
        """Log the artifacts (and models), end the run with ``status`` and ``error`` as its
        ``tsmd.error`` tag."""
        if not self.active:
            return
        try:
            self._stop_system_metrics()
            log_run_artifacts(self.client, self.run_id, self.out, title=self.name)
            if with_models and self.log_models and (self.out / "checkpoint.pt").is_file():
                log_models_from_checkpoint(self.run_id, self.out / "checkpoint.pt", self.tracking_uri)
            end_run(self.client, self.run_id, status, error)
            write_run_file(self.out, status="logged" if status == "FINISHED" else status.lower(), error=error)
            self.active = False
        except Exception as exc:
            self._fail(exc)

    def _stop_system_metrics(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.finish()

    def _fail(self, exc: BaseException) -> None:
        first = self.failed is None
        self.failed = short_error(exc)
        self.active = False
        with contextlib.suppress(Exception):
            self._stop_system_metrics()
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
