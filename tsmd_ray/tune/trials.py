"""One sweep trial: its resources, the trainable that meta-trains it, its reports to Tune, and the
driver-side callbacks that close its MLflow run and end a sweep after some trials."""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .. import tracking
from ..config import Config
from ..errors import one_line
from .space import coerce

log = logging.getLogger("tsmd_ray.tune")

TRIALS_DIR = "trials"


def trial_backend(backend: str) -> str:
    """``ray`` when the Ray runner can be imported, else ``local`` (with a warning)."""
    if backend != "ray":
        return backend
    try:
        from ..distributed import RayRunner  # noqa: F401
    except ImportError as exc:
        log.warning("tsmd_ray.distributed is not available (%s): trials run with backend=local", exc)
        return "local"
    return "ray"


def trial_bundles(cfg: Config, resources: Mapping[str, float]) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: its driver, then one bundle per worker actor
    (what ``RayRunner`` asks for: ``threads_per_worker`` CPUs, ``gpus_per_worker`` GPUs)."""
    driver_cpus = float(resources.get("driver_cpus", 1))
    driver_gpus = float(resources.get("driver_gpus", 0))
    if cfg.backend == "local":  # the driver computes everything itself
        head = {"CPU": max(driver_cpus, float(cfg.threads_per_worker), 1.0)}
        if driver_gpus:
            head["GPU"] = driver_gpus
        return [head]
    head = {k: v for k, v in (("CPU", driver_cpus), ("GPU", driver_gpus)) if v}
    worker = {"CPU": float(cfg.threads_per_worker)}
    if cfg.gpus_per_worker:
        worker["GPU"] = float(cfg.gpus_per_worker)
    return [head] + [dict(worker) for _ in range(cfg.workers)]


def concurrency(bundles: Sequence[Mapping[str, float]], available: Mapping[str, float]) -> int:
    """How many trials with ``bundles`` the free resources hold (at least 1)."""
    fits = []
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0.0) for b in bundles)
        if need > 0:
            fits.append(math.floor(float(available.get(resource, 0.0)) / need + 1e-9))
    return max(1, min(fits) if fits else 1)


# ---------------------------------------------------------------------- trials
class TuneReporter:
    """Reporter that sends each meta-validation (and the final test) to Ray Tune.

    Results carry ``iteration`` (ASHA's time), the latest ``val/...`` values, the iteration's
    ``train/...`` metrics and, when tracked, the trial's MLflow run id.
    """

    def __init__(self, metric: str, tracker: Any = None) -> None:
        self.metric = metric
        self.tracker = tracker
        self.last_val: dict[str, float] = {}

    def report(self, step: int, metrics: dict[str, float]) -> None:
        from ray import tune

        val = {k: v for k, v in metrics.items() if k.startswith("val/")}
        self.last_val.update(val)
        if not val and not any(k.startswith("test/") for k in metrics):
            return
        if self.metric not in self.last_val:
            return
        result: dict[str, Any] = {**metrics, **self.last_val, "iteration": step}
        run_id = getattr(self.tracker, "run_id", None)
        if run_id and getattr(self.tracker, "active", False):
            result["mlflow_run_id"] = run_id
        tune.report(result)


def trial_out_dir(experiment_dir: str | Path, trial_id: str) -> Path:
    return Path(experiment_dir) / TRIALS_DIR / trial_id


def finished_trial_result(cfg: Config, metric: str) -> dict[str, Any] | None:
    """The final Tune result of a trial whose run already completed in ``cfg.out`` (meta-tested,
    same config, tracked or marked for upload), else ``None``."""
    out = Path(cfg.out)
    if not (out / "evaluation.json").is_file() or not (out / "metrics.jsonl").is_file():
        return None
    try:
        if Config.from_yaml(out / "config.yaml").replace(resume=True) != cfg:
            return None
    except (OSError, ValueError):
        return None
    info = tracking.read_run_file(out)
    if cfg.mlflow and info.get("status") not in ("logged", "pending_upload"):
        return None  # its MLflow run was not completed: let the run finish it
    from ..plots import read_metrics

    result: dict[str, Any] = {}
    for record in read_metrics(out / "metrics.jsonl"):
        result.update(record)
    if metric not in result:
        return None
    result["iteration"] = int(result.pop("step"))
    if info.get("run_id") and info.get("status") == "logged":
        result["mlflow_run_id"] = info["run_id"]
    return result


def run_trial(config: dict[str, Any], *, base: dict[str, Any], experiment_dir: str, sweep: str, metric: str,
              parent_run_id: str | None, tracking_uri: str | None, log_models: bool,
              source: dict[str, str] | None = None, dataset: dict[str, Any] | None = None) -> None:
    """The Tune trainable: one meta-training with the trial's sampled values. ``source`` and
    ``dataset`` are the sweep driver's code version and dataset digest (the trial's run reuses them)."""
    from ray import tune

    from ..train import run

    context = tune.get_context()
    trial_id = context.get_trial_id()
    sampled = {k: coerce(k, v) for k, v in config.items()}
    # resume=True: a trial interrupted with its sweep continues from its own checkpoint.pt
    cfg = Config.from_dict({**base, **sampled, "out": str(trial_out_dir(experiment_dir, trial_id)), "resume": True})
    done = finished_trial_result(cfg, metric)
    if done is not None:  # it had finished when the sweep was interrupted: report, do not redo
        log.info("trial %s had already finished (%s): reporting its results again", trial_id, cfg.out)
        tune.report(done)
        return
    tracker = tracking.tracker(cfg, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                               run_name=tracking.trial_run_name(context.get_trial_name(), sampled),
                               log_models=log_models, source=source, dataset=dataset,
                               tags={"tsmd.sweep": sweep, "tsmd.trial_id": trial_id})
    run(cfg, [TuneReporter(metric, tracker)], tracker=tracker)


# The driver-side callbacks live at module level and read what they need from _RUNTIME, set by
# each sweep() call: Tune pickles its RunConfig (callbacks included) into the experiment state and
# Tuner.restore brings back those instances, so they must not carry the first invocation's options.
_RUNTIME: dict[str, Any] = {"tracking_uri": None, "experiment_dir": None, "stop_after": None, "finished": 0,
                            "stopping": False, "ended_by": None}
STOPPED = "stopped by --stop-after-trials"


class CloseTrialRuns(Callback):
    """Ends the MLflow run of a trial that did not end it itself (stopped early by ASHA, errored)."""

    def _close(self, trial: Any, status: str, error: str | None = None) -> None:
        if _RUNTIME["experiment_dir"] is None:
            return
        out = trial_out_dir(_RUNTIME["experiment_dir"], trial.trial_id)
        run_id = (trial.last_result or {}).get("mlflow_run_id") or tracking.read_run_file(out).get("run_id")
        if not run_id:
            return
        try:
            client = tracking.connect(_RUNTIME["tracking_uri"])
            if client.get_run(run_id).info.status != "RUNNING":
                return
            if out.is_dir():
                tracking.log_run_artifacts(client, run_id, out)
                tracking.write_run_file(out, status=status.lower())
            client.set_tag(run_id, "tsmd.ended_by", "scheduler" if status == "KILLED" else "error")
            tracking.end_run(client, run_id, status, error)
        except Exception as exc:  # tracking never breaks the sweep
            log.debug("could not end MLflow run %s: %s", run_id, exc)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED", _trial_error(trial))


def _trial_error(trial: Any) -> str:
    """The last line of the error Tune recorded for ``trial`` (its exception; the traceback is in
    Tune's error file)."""
    try:
        lines = str(trial.get_error() or "").strip().splitlines()
    except Exception as exc:  # noqa: BLE001 - the error file is gone: say so
        lines = [f"the trial failed (its error could not be read: {exc})"]
    return one_line(lines[-1] if lines else "the trial failed")


class StopAfterTrials(Callback):
    """Ends the sweep resumably (as Ctrl+C does) once ``--stop-after-trials`` trials have finished
    in this invocation, as soon as Tune has recorded them as terminated (so that the saved
    experiment state does not list them as running)."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _RUNTIME["finished"] += 1

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        limit = _RUNTIME["stop_after"]
        if not limit or _RUNTIME["finished"] < limit or _RUNTIME.get("stopping"):
            return
        if any(t.status == "RUNNING" and (t.last_result or {}).get("done") for t in trials):
            return  # a finished trial's actor is still being stopped
        _RUNTIME["stopping"] = True
        log.warning("%d trial(s) finished: ending the sweep (--stop-after-trials); continue it with --resume",
                    _RUNTIME["finished"])
        if not _interrupt_tune():
            raise KeyboardInterrupt


def _interrupt_tune() -> bool:
    """Tune's own graceful stop (it saves the experiment state for ``Tuner.restore``); ``False``
    when Tune is not running in this thread (nothing was done)."""
    if threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGUSR1)):
        os.kill(os.getpid(), signal.SIGUSR1)
        return True
    return False

