"""Hyperparameter sweeps with Ray Tune: ``python -m tsmd_ray.tune --space tune_spaces/NAME.yaml``.

A space file (see ``tune_spaces/`` and docs/tracking.md) names the searched Config keys and
their distributions, the fixed base training config, the searcher (Optuna by default, ``random``
as a fallback) and the ASHA scheduler over meta-validation accuracy (``val/student_acc``).

Each trial is one meta-training (``tsmd_ray.train.run``: the trial's driver plus its Ray worker
actors) whose resources are reserved up front in a placement group; it reports meta-validation
accuracy at every ``eval_every`` iterations, so ASHA can stop poor trials early. As many trials
run at once as the cluster's free CPUs/GPUs hold. ``Ctrl+C`` (or ``--stop-after-trials``) ends a
sweep resumably: ``--resume`` continues it without redoing finished trials, and unfinished
trials continue from their own ``checkpoint.pt``. At the end the best config is printed and
written as YAML for ``python -m tsmd_ray.train --config``.

With ``mlflow: true`` in the base config the sweep is an MLflow run with one nested run per trial.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from . import tracking
from .config import Config, load_yaml

log = logging.getLogger("tsmd_ray.tune")

SWEEP_FILE = "tsmd_sweep.json"  # in the experiment directory: parent MLflow run, for --resume
SPACE_COPY = "space.yaml"
BEST_CONFIG = "best_config.yaml"
TRIALS_DIR = "trials"
DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "qloguniform", "randint", "qrandint", "lograndint", "choice")
SPACE_KEYS = {"name", "description", "metric", "mode", "samples", "searcher", "seed", "max_concurrent",
              "scheduler", "resources", "log_models", "experiment", "search", "base"}
ALIASES = {"lambda": "lam"}  # the paper's names for Config keys


# ---------------------------------------------------------------------- the space file
@dataclass
class SweepSpec:
    """A parsed space file."""

    name: str
    search: dict[str, dict[str, Any]]
    base: dict[str, Any]
    metric: str = "val/student_acc"
    mode: str = "max"
    samples: int = 16
    searcher: str = "optuna"
    seed: int = 0
    max_concurrent: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    log_models: bool = True
    experiment: str | None = None
    description: str = ""

    @property
    def base_config(self) -> Config:
        return Config.from_dict(self.base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what}: {value!r} is not finite")
    return number


def parse_distribution(key: str, spec: Any) -> dict[str, Any]:
    """``{"loguniform": [low, high]}`` and friends; a plain value is a constant."""
    if not isinstance(spec, Mapping):
        return {"constant": spec}
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ValueError(f"search.{key}: expected one of {', '.join(DISTRIBUTIONS)} with its arguments, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"search.{key}: choice needs a non-empty list")
        return {"choice": args}
    if not isinstance(args, list) or len(args) not in (2, 3) or (kind.startswith("q") != (len(args) == 3)):
        raise ValueError(f"search.{key}: {kind} needs [low, high{', q' if kind.startswith('q') else ''}]")
    values = [_number(a, f"search.{key}") for a in args]
    low, high = values[0], values[1]
    if not low < high:
        raise ValueError(f"search.{key}: low {low} must be below high {high}")
    if "log" in kind and low <= 0:
        raise ValueError(f"search.{key}: {kind} needs a positive low bound, got {low}")
    if "randint" in kind:
        values = [int(v) for v in values]
    return {kind: values}


def load_space(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and check a space file; ``overrides`` replace keys of its base config."""
    path = Path(path)
    data = load_yaml(path)
    unknown = sorted(set(data) - SPACE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SPACE_KEYS))}")
    base = {ALIASES.get(k, k).replace("-", "_"): v for k, v in (data.get("base") or {}).items()}
    base.update({ALIASES.get(k, k).replace("-", "_"): v for k, v in (overrides or {}).items()})
    cfg = Config.from_dict(base)  # validates
    search_raw = data.get("search") or {}
    if not isinstance(search_raw, Mapping) or not search_raw:
        raise ValueError(f"{path}: 'search' must map Config keys to distributions")
    names = {f.name for f in dataclasses.fields(Config)}
    search = {}
    for key, spec in search_raw.items():
        name = ALIASES.get(key, key).replace("-", "_")
        if name not in names:
            raise ValueError(f"{path}: search key {key!r} is not a Config key")
        search[name] = parse_distribution(key, spec)
    spec = SweepSpec(name=str(data.get("name") or path.stem), search=search, base=cfg.to_dict(),
                     metric=str(data.get("metric", "val/student_acc")), mode=str(data.get("mode", "max")),
                     samples=int(data.get("samples", 16)), searcher=str(data.get("searcher", "optuna")),
                     seed=int(data.get("seed", 0)), max_concurrent=int(data.get("max_concurrent") or 0),
                     scheduler=dict(data.get("scheduler") or {}), resources=dict(data.get("resources") or {}),
                     log_models=bool(data.get("log_models", True)), experiment=data.get("experiment"),
                     description=str(data.get("description", "")))
    check_spec(spec)
    return spec


def check_spec(spec: SweepSpec) -> None:
    cfg = spec.base_config
    if spec.mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {spec.mode!r}")
    if spec.searcher not in ("optuna", "random"):
        raise ValueError(f"searcher must be optuna or random, got {spec.searcher!r}")
    if spec.samples < 1:
        raise ValueError(f"samples must be positive, got {spec.samples}")
    if not spec.metric.startswith("val/"):
        raise ValueError(f"metric must be a meta-validation metric (val/<model>_acc), got {spec.metric!r}")
    model = spec.metric.removeprefix("val/").removesuffix("_acc")
    if (model == "student" and not cfg.has_student) or (model == "teacher" and not cfg.has_teacher):
        raise ValueError(f"method {cfg.method} has no {model}: metric {spec.metric} is never reported")
    if not cfg.eval_every or cfg.eval_every > cfg.iterations:
        raise ValueError(f"base.eval_every must be between 1 and iterations ({cfg.iterations}): trials report "
                         f"{spec.metric} at each meta-validation, got {cfg.eval_every}")
    unknown = set(spec.scheduler) - {"grace_period", "reduction_factor", "max_t", "brackets", "type"}
    if unknown or spec.scheduler.get("type", "asha") not in ("asha", "fifo", "none"):
        raise ValueError(f"scheduler: type asha|fifo with grace_period, reduction_factor, max_t, brackets; "
                         f"got {spec.scheduler}")
    unknown = set(spec.resources) - {"driver_cpus", "driver_gpus"}
    if unknown:
        raise ValueError(f"resources: driver_cpus and driver_gpus only, got {sorted(unknown)}")
    for key, dist in spec.search.items():  # every sampled value must give a valid Config
        for value in _extremes(dist):
            Config.from_dict({**spec.base, key: coerce(key, value)})


def _extremes(dist: Mapping[str, Any]) -> list[Any]:
    kind, args = next(iter(dist.items()))
    if kind == "constant":
        return [args]
    if kind == "choice":
        return list(args)
    return [args[0], args[1] - 1 if "randint" in kind else args[1]]


def tune_domain(dist: Mapping[str, Any]) -> Any:
    from ray import tune

    kind, args = next(iter(dist.items()))
    if kind == "constant":
        return args
    if kind == "choice":
        return tune.choice(list(args))
    return getattr(tune, kind)(*args)


def coerce(key: str, value: Any) -> Any:
    """A sampled value as the plain Python type of Config field ``key`` (no numpy scalars)."""
    kind = next(f.type for f in dataclasses.fields(Config) if f.name == key)
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if hasattr(value, "item"):
        value = value.item()
    if value is None:
        return None
    if kind.startswith("bool"):
        return bool(value)
    if kind.startswith("int"):
        return int(round(float(value)))
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("list"):
        return [int(v) for v in value]
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE read as YAML) for the base config."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


# ---------------------------------------------------------------------- resources
def trial_backend(backend: str) -> str:
    """``ray`` when the Ray runner can be imported, else ``local`` (with a warning)."""
    if backend != "ray":
        return backend
    try:
        from .distributed import RayRunner  # noqa: F401
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
    from .plots import read_metrics

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
              parent_run_id: str | None, tracking_uri: str | None, log_models: bool) -> None:
    """The Tune trainable: one meta-training with the trial's sampled values."""
    from ray import tune

    from .train import run

    context = tune.get_context()
    trial_id = context.get_trial_id()
    values = {**base, **{k: coerce(k, v) for k, v in config.items()}}
    # resume=True: a trial interrupted with its sweep continues from its own checkpoint.pt
    cfg = Config.from_dict({**values, "out": str(trial_out_dir(experiment_dir, trial_id)), "resume": True})
    done = finished_trial_result(cfg, metric)
    if done is not None:  # it had finished when the sweep was interrupted: report, do not redo
        log.info("trial %s had already finished (%s): reporting its results again", trial_id, cfg.out)
        tune.report(done)
        return
    tracker = tracking.tracker(cfg, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                               run_name=f"{sweep}/{context.get_trial_name()}", log_models=log_models,
                               tags={"tsmd.sweep": sweep, "tsmd.trial_id": trial_id})
    run(cfg, [TuneReporter(metric, tracker)], tracker=tracker)


# The driver-side callbacks live at module level and read what they need from _RUNTIME, set by
# each sweep() call: Tune pickles its RunConfig (callbacks included) into the experiment state and
# Tuner.restore brings back those instances, so they must not carry the first invocation's options.
_RUNTIME: dict[str, Any] = {"tracking_uri": None, "experiment_dir": None, "stop_after": None, "finished": 0,
                            "stopping": False}


class CloseTrialRuns(Callback):
    """Ends the MLflow run of a trial that did not end it itself (stopped early by ASHA, errored)."""

    def _close(self, trial: Any, status: str) -> None:
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
            client.set_terminated(run_id, status=status)
        except Exception as exc:  # tracking never breaks the sweep
            log.debug("could not end MLflow run %s: %s", run_id, exc)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")


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
        _interrupt_tune()


def _interrupt_tune() -> None:
    """Tune's own graceful stop (it saves the experiment state for ``Tuner.restore``)."""
    if threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGUSR1)):
        os.kill(os.getpid(), signal.SIGUSR1)
    else:
        raise KeyboardInterrupt


# ---------------------------------------------------------------------- the sweep
def _absolute(values: dict[str, Any]) -> dict[str, Any]:
    """Relative paths of the base config made absolute (trials run in other working dirs)."""
    out = dict(values)
    for key in ("data_root", "cache_dir", "teacher_init", "teacher_weights"):
        if out.get(key) and not str(out[key]).startswith(("s3://", "gs://")):
            out[key] = str(Path(out[key]).expanduser().resolve())
    return out


def _open_parent_run(spec: SweepSpec, experiment_dir: Path, uri: str, resume: bool) -> str | None:
    """Create (or, on --resume, reopen) the sweep's MLflow run; ``None`` if tracking is unusable."""
    cfg = spec.base_config
    experiment = spec.experiment or cfg.experiment
    state_file = experiment_dir / SWEEP_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    try:
        client = tracking.connect(uri)
        experiment_id = tracking.ensure_experiment(client, experiment, uri)
        run_id = state.get("parent_run_id") if resume and state.get("tracking_uri") == uri else None
        if run_id:
            try:
                client.update_run(run_id, status="RUNNING")
                log.info("resuming sweep MLflow run %s", run_id)
            except Exception as exc:  # deleted meanwhile: start a new parent run
                log.warning("sweep MLflow run %s cannot be resumed (%s): starting a new one",
                            run_id, tracking.short_error(exc))
                run_id = None
        if not run_id:
            run = client.create_run(experiment_id, run_name=f"sweep-{spec.name}",
                                    tags={"tsmd.sweep": spec.name, "tsmd.kind": "sweep",
                                          "tsmd.experiment_dir": str(experiment_dir)})
            run_id = run.info.run_id
            params = {"sweep.metric": spec.metric, "sweep.mode": spec.mode, "sweep.samples": str(spec.samples),
                      "sweep.searcher": spec.searcher, "sweep.seed": str(spec.seed),
                      "sweep.scheduler": json.dumps(spec.scheduler)}
            params |= {f"search.{k}": json.dumps(v) for k, v in spec.search.items()}
            params |= {f"base.{k}": v for k, v in tracking.config_params(cfg).items() if k not in spec.search}
            tracking.log_params(client, run_id, params)
            log.info("sweep MLflow run %s in experiment %r at %s", run_id, experiment, uri)
        state_file.write_text(json.dumps({"parent_run_id": run_id, "tracking_uri": uri, "experiment": experiment},
                                         indent=2))
        return run_id
    except Exception as exc:
        log.warning("MLflow tracking of the sweep is off (%s); trials still try to track themselves "
                    "and keep their results in %s", tracking.short_error(exc), experiment_dir / TRIALS_DIR)
        return None


def _finish_parent_run(run_id: str, uri: str, experiment_dir: Path, status: str,
                       best: dict[str, Any] | None, files: Sequence[Path]) -> None:
    try:
        client = tracking.connect(uri)
        if best:
            metrics = {f"best/{k.replace('/', '_')}": v for k, v in best["metrics"].items()}
            tracking.log_metrics(client, run_id, [(0, metrics)])
            client.set_tag(run_id, "tsmd.best_trial", best["trial_id"])
            if best.get("mlflow_run_id"):
                client.set_tag(run_id, "tsmd.best_run_id", best["mlflow_run_id"])
        for path in files:
            if path.is_file():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status=status)
    except Exception as exc:
        log.warning("could not finish the sweep's MLflow run %s: %s", run_id, tracking.short_error(exc))


def _summary(results: Any, spec: SweepSpec, experiment_dir: Path) -> tuple[dict[str, Any] | None, list[Path]]:
    """Best trial, trials.csv and a bar chart of the finished trials' test accuracies."""
    files: list[Path] = []
    try:
        frame = results.get_dataframe()
        frame.to_csv(experiment_dir / "trials.csv", index=False)
        files.append(experiment_dir / "trials.csv")
    except Exception as exc:
        log.debug("no trials.csv: %s", exc)
    try:
        best = results.get_best_result(metric=spec.metric, mode=spec.mode, scope="last")
    except Exception as exc:
        log.error("no trial reported %s: %s", spec.metric, exc)
        return None, files
    trial_id = best.metrics.get("trial_id") or Path(best.path).name
    numeric = {k: float(v) for k, v in best.metrics.items()
               if k.startswith(("val/", "test/")) and isinstance(v, (int, float))}
    info = {"trial_id": trial_id, "config": {k: coerce(k, v) for k, v in best.config.items()},
            "metrics": numeric, "mlflow_run_id": best.metrics.get("mlflow_run_id")}
    # bar chart of the (at most 8) best trials that finished their meta-test
    scored = []
    for result in results:
        if result.error is not None or not result.metrics:
            continue
        tid = result.metrics.get("trial_id")
        evaluation = trial_out_dir(experiment_dir, tid) / "evaluation.json" if tid else None
        value = result.metrics.get(spec.metric)
        if evaluation is not None and evaluation.is_file() and isinstance(value, (int, float)):
            scored.append((float(value), tid, evaluation))
    scored.sort(reverse=spec.mode == "max")
    if scored:
        try:
            from .plots import plot_evaluations

            chart = plot_evaluations([e for _, _, e in scored[:8]], experiment_dir / "best_trials.png",
                                     labels=[t for _, t, _ in scored[:8]],
                                     title=f"{spec.name}: best trials by {spec.metric}")
            files.append(chart)
        except Exception as exc:
            log.warning("could not draw the trials' bar chart: %s", exc)
    return info, files


def make_searcher(spec: SweepSpec) -> Any:
    """Optuna's TPE (the default) or Tune's random search, seeded."""
    if spec.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=spec.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.seed)


def make_scheduler(spec: SweepSpec) -> Any:
    """ASHA over ``spec.metric`` with meta-iterations as time (``type: fifo`` switches it off)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = spec.base_config
    sched = dict(spec.scheduler)
    if sched.pop("type", "asha") != "asha":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="iteration", max_t=int(sched.get("max_t", cfg.iterations)),
                         grace_period=int(sched.get("grace_period", cfg.eval_every)),
                         reduction_factor=float(sched.get("reduction_factor", 3)),
                         brackets=int(sched.get("brackets", 1)),
                         stop_last_trials=False)  # a trial that reaches max_t still runs its meta-test


def finished_trials(experiment_dir: str | Path) -> int:
    """Trials that ended (ran to the end, stopped by the scheduler, or errored) according to the
    experiment state Tune saved last: what ``--resume`` will not run again."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(experiment_dir)).trials
    except Exception as exc:  # no state saved yet
        log.debug("no experiment state in %s: %s", experiment_dir, exc)
        return 0
    return sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))


def sweep(spec: SweepSpec, *, storage: str | Path, resume: bool = False, samples: int | None = None,
          max_concurrent: int | None = None, stop_after_trials: int | None = None,
          best_config: str | Path | None = None, verbose: int = 1) -> dict[str, Any]:
    """Run (or resume) the sweep; returns ``{"status", "best", "best_config", "experiment_dir", ...}``."""
    import ray
    from ray import tune

    storage = Path(storage).expanduser().resolve()
    experiment_dir = storage / spec.name
    restorable = tune.Tuner.can_restore(str(experiment_dir))
    if restorable and not resume:
        raise ValueError(f"sweep {spec.name!r} already exists at {experiment_dir}: pass --resume to continue it, "
                         "or choose another --name or --storage")
    if resume and (experiment_dir / SPACE_COPY).is_file():
        stored = SweepSpec(**load_yaml(experiment_dir / SPACE_COPY))
        if stored.to_dict() != spec.to_dict():
            log.warning("resuming with the space stored in %s (the given space file differs)", experiment_dir)
        spec = stored
    if samples and not (resume and restorable):
        spec.samples = samples
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / SPACE_COPY).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))

    user_base = _absolute(spec.base)
    cfg = Config.from_dict(user_base)
    if cfg.aggregation != "driver":
        raise ValueError(f"base.aggregation={cfg.aggregation!r}: Tune trials aggregate on their driver "
                         "(each trial's placement group holds it); remove the key or set it to 'driver'")
    backend = trial_backend(cfg.backend)
    workers = (cfg.workers or 1) if backend == "ray" else cfg.workers
    from .data import resolve_dataset

    dataset_path = resolve_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir)  # once, not in every trial
    experiment = spec.experiment or cfg.experiment  # the trials' runs nest under the sweep's run
    trial_base = {**user_base, "backend": backend, "workers": workers, "data_root": str(dataset_path),
                  "experiment": experiment,
                  # a trial interrupted with its sweep resumes from its last meta-validation
                  "checkpoint_every": min(cfg.checkpoint_every or cfg.eval_every, cfg.eval_every)}
    trial_cfg = Config.from_dict(trial_base)
    bundles = trial_bundles(trial_cfg, spec.resources)
    if not ray.is_initialized():
        ray.init()
    limit = max_concurrent or spec.max_concurrent or concurrency(bundles, ray.available_resources())
    log.info("sweep %s: %d trial(s), each %s (backend %s); up to %d at once; storage %s", spec.name,
             spec.samples, bundles, backend, limit, experiment_dir)

    uri = tracking.resolve_tracking_uri() if cfg.mlflow else None
    parent_run_id = _open_parent_run(spec, experiment_dir, uri, resume) if cfg.mlflow else None

    _RUNTIME.update(tracking_uri=uri, experiment_dir=experiment_dir, stop_after=stop_after_trials, finished=0,
                    stopping=False)

    def trainable(config: dict[str, Any]) -> None:
        run_trial(config, base=trial_base, experiment_dir=str(experiment_dir), sweep=spec.name, metric=spec.metric,
                  parent_run_id=parent_run_id, tracking_uri=uri, log_models=spec.log_models)

    trainable.__name__ = "tsmd_trial"
    resources = tune.PlacementGroupFactory(bundles, strategy="PACK")
    wrapped = tune.with_resources(trainable, resources)
    if resume and restorable:
        log.info("resuming sweep from %s", experiment_dir)
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=wrapped, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        param_space = {k: tune_domain(v) for k, v in spec.search.items()}
        tuner = tune.Tuner(
            wrapped, param_space=param_space,
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=make_searcher(spec),
                                        scheduler=make_scheduler(spec), num_samples=spec.samples,
                                        max_concurrent_trials=limit),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(storage), verbose=verbose,
                                      callbacks=[CloseTrialRuns(), StopAfterTrials()]),
        )
    results = tuner.fit()

    finished = finished_trials(experiment_dir)
    total = spec.samples
    complete = finished >= total
    best, files = _summary(results, spec, experiment_dir)
    out: dict[str, Any] = {"experiment_dir": str(experiment_dir), "finished": finished, "errors": results.num_errors,
                           "samples": total, "status": "complete" if complete else "interrupted",
                           "parent_run_id": parent_run_id, "best": best, "best_config": None}
    if best:
        best_cfg = Config.from_dict({**user_base, **best["config"], "out": f"runs/{spec.name}-best", "resume": False})
        path = experiment_dir / BEST_CONFIG
        best_cfg.to_yaml(path)
        files.append(path)
        if best_config:
            best_cfg.to_yaml(best_config)
        out["best_config"] = str(Path(best_config).resolve()) if best_config else str(path)
    files.append(experiment_dir / SPACE_COPY)
    if parent_run_id:
        _finish_parent_run(parent_run_id, uri, experiment_dir, "FINISHED" if complete else "KILLED",
                           best if complete else None, files)
    return out


def format_summary(out: Mapping[str, Any], metric: str) -> str:
    lines = [f"sweep {out['status']}: {out['finished']} of {out['samples']} trials finished "
             f"({out['errors']} errored) in {out['experiment_dir']}"]
    if out["status"] != "complete":
        lines.append("continue it with the same command and --resume")
    best = out.get("best")
    if best:
        test = {k: v for k, v in best["metrics"].items() if k.startswith("test/")}
        lines.append(f"best trial {best['trial_id']}: {metric} = {best['metrics'].get(metric, float('nan')):.4f}"
                     + (f"  ({', '.join(f'{k} = {v:.4f}' for k, v in sorted(test.items()))})" if test else ""))
        lines.append("best values: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in sorted(best["config"].items())))
        lines.append(f"best config written to {out['best_config']}; train it with:")
        lines.append(f"  python -m tsmd_ray.train --config {out['best_config']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="space file (tune_spaces/NAME.yaml)")
    parser.add_argument("--samples", type=int, help="number of trials (default: the space file's)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--storage", default="runs/tune",
                        help="where sweeps live: <storage>/<name>/ holds Tune's state, the trials' outputs "
                             "(trials/<trial id>/) and best_config.yaml (default: runs/tune)")
    parser.add_argument("--name", help="sweep name (default: the space file's name)")
    parser.add_argument("--searcher", choices=("optuna", "random"), help="override the space file's searcher")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as the free resources allow)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the base config, e.g. --set data_root=/data/mini (repeatable)")
    parser.add_argument("--best-config", help="also write the best config to this YAML file")
    parser.add_argument("--stop-after-trials", type=int,
                        help="end the sweep resumably once this many trials have finished (fit a time window)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        spec = load_space(args.space, parse_overrides(args.overrides))
        if args.name:
            spec.name = args.name
        if args.searcher:
            spec.searcher = args.searcher
        if args.address:
            import ray

            if not ray.is_initialized():
                ray.init(address=args.address)
        out = sweep(spec, storage=args.storage, resume=args.resume, samples=args.samples,
                    max_concurrent=args.max_concurrent, stop_after_trials=args.stop_after_trials,
                    best_config=args.best_config)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    print(format_summary(out, spec.metric))
    print(json.dumps({k: out[k] for k in ("status", "finished", "samples", "best_config", "experiment_dir")}))
    if out["best"] is None:
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: Tune pickles the trainable and the
    # callbacks, which must refer to tsmd_ray.tune (by reference) to be restored by --resume.
    from tsmd_ray.tune import main as _main

    sys.exit(_main())
