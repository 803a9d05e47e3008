"""Running a sweep: the Tuner, its searcher and scheduler, the sweep's MLflow run and its summary."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import tracking
from ..config import Config, load_yaml
from ..errors import INTERRUPTED, TERMINATED, RequestError, Terminated, ending, on_sigterm
from ..preflight import check_fits, check_out_dir, check_training, resolve_data
from .space import SweepSpec, check_spec, coerce, tune_domain
from .trials import (_RUNTIME, STOPPED, TRIALS_DIR, CloseTrialRuns, StopAfterTrials, _interrupt_tune, concurrency,
                     run_trial, trial_backend, trial_bundles, trial_out_dir)

log = logging.getLogger("tsmd_ray.tune")

SWEEP_FILE = "tsmd_sweep.json"  # in the experiment directory: parent MLflow run, for --resume
SPACE_COPY = "space.yaml"
BEST_CONFIG = "best_config.yaml"


def _absolute(values: dict[str, Any]) -> dict[str, Any]:
    """Relative paths of the base config made absolute (trials run in other working dirs)."""
    out = dict(values)
    for key in ("data_root", "cache_dir", "teacher_init", "teacher_weights"):
        if out.get(key) and not str(out[key]).startswith(("s3://", "gs://")):
            out[key] = str(Path(out[key]).expanduser().resolve())
    return out


def _sweep_params(spec: SweepSpec) -> dict[str, str]:
    """The sweep's settings, its searched distributions (``search.<key>``) and fixed values (``base.<key>``)."""
    params = {"sweep.metric": spec.metric, "sweep.mode": spec.mode, "sweep.samples": str(spec.samples),
              "sweep.searcher": spec.searcher, "sweep.seed": str(spec.seed),
              "sweep.scheduler": json.dumps(spec.scheduler)}
    params |= {f"search.{k}": json.dumps(v) for k, v in spec.search.items()}
    fixed = tracking.config_params(spec.base_config)
    return params | {f"base.{k}": v for k, v in fixed.items() if k not in spec.search}


def _reopen_run(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        client.update_run(run_id, status="RUNNING")
    except Exception as exc:  # deleted meanwhile: start a new parent run
        log.warning("sweep MLflow run %s cannot be resumed (%s): starting a new one", run_id, tracking.short_error(exc))
        return None
    log.info("resuming sweep MLflow run %s", run_id)
    return run_id


def _open_parent_run(spec: SweepSpec, experiment_dir: Path, uri: str, resume: bool, source: dict[str, str],
                     dataset: dict[str, Any] | None) -> str | None:
    """Create (or, on --resume, reopen) the sweep's MLflow run; ``None`` if tracking is unusable."""
    experiment = spec.experiment or spec.base_config.experiment
    state_file = experiment_dir / SWEEP_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    try:
        client = tracking.connect(uri)
        experiment_id = tracking.ensure_experiment(client, experiment, uri)
        same_store = resume and state.get("tracking_uri") == uri
        run_id = _reopen_run(client, state.get("parent_run_id") if same_store else None)
        if not run_id:
            tags = {**source, "tsmd.sweep": spec.name, "tsmd.kind": "sweep", "tsmd.experiment_dir": str(experiment_dir)}
            run_id = client.create_run(experiment_id, run_name=f"sweep-{spec.name}", tags=tags).info.run_id
            tracking.log_params(client, run_id, _sweep_params(spec))
            if dataset:
                client.log_inputs(run_id, datasets=[tracking.dataset_input(dataset)])
            log.info("sweep MLflow run %s in experiment %r at %s", run_id, experiment, uri)
        state_file.write_text(json.dumps({"parent_run_id": run_id, "tracking_uri": uri, "experiment": experiment},
                                         indent=2))
        return run_id
    except Exception as exc:
        log.warning("MLflow tracking of the sweep is off (%s); trials still try to track themselves "
                    "and keep their results in %s", tracking.short_error(exc), experiment_dir / TRIALS_DIR)
        return None


def _finish_parent_run(run_id: str, uri: str, status: str, best: dict[str, Any] | None, files: Sequence[Path],
                       error: str | None = None) -> None:
    """Log the best trial's metrics under the trials' own names (the parent's row and charts show
    them) and the summary files; end the sweep's run, and its trials' runs left RUNNING (an
    interrupted trial's), with ``status`` and ``error`` as their ``tsmd.error`` tag."""
    try:
        client = tracking.connect(uri)
        if best:
            tracking.log_metrics(client, run_id, [(best["iteration"], best["metrics"])])
            client.set_tag(run_id, "tsmd.best_trial", best["trial_id"])
            if best.get("mlflow_run_id"):
                client.set_tag(run_id, "tsmd.best_run_id", best["mlflow_run_id"])
        for path in files:
            if path.is_file():
                client.log_artifact(run_id, str(path))
        tracking.end_child_runs(client, run_id, "KILLED" if status == "FINISHED" else status, error)
        tracking.end_run(client, run_id, status, error)
    except Exception as exc:
        log.warning("could not finish the sweep's MLflow run %s: %s", run_id, tracking.short_error(exc))


def _best_trial(results: Any, spec: SweepSpec) -> dict[str, Any] | None:
    """The best trial by its last reported ``spec.metric``: id, values, val/test metrics, iteration, run id."""
    try:
        best = results.get_best_result(metric=spec.metric, mode=spec.mode, scope="last")
    except Exception as exc:
        log.warning("no trial reported %s: %s", spec.metric, exc)
        return None
    numeric = {k: float(v) for k, v in best.metrics.items()
               if k.startswith(("val/", "test/")) and isinstance(v, (int, float))}
    return {"trial_id": best.metrics.get("trial_id") or Path(best.path).name,
            "config": {k: coerce(k, v) for k, v in best.config.items()}, "metrics": numeric,
            "iteration": int(best.metrics.get("iteration", 0)), "mlflow_run_id": best.metrics.get("mlflow_run_id")}


def _bar_chart(results: Any, spec: SweepSpec, experiment_dir: Path) -> Path | None:
    """Bar chart of the test accuracies of the (at most 8) best trials that finished their meta-test."""
    scored = []
    for result in results:
        if result.error is not None or not result.metrics:
            continue
        tid = result.metrics.get("trial_id")
        evaluation = trial_out_dir(experiment_dir, tid) / "evaluation.json" if tid else None
        value = result.metrics.get(spec.metric)
        if evaluation is not None and evaluation.is_file() and isinstance(value, (int, float)):
            scored.append((float(value), tid, evaluation))
    if not scored:
        return None
    scored.sort(reverse=spec.mode == "max")
    try:
        from ..plots import plot_evaluations

        return plot_evaluations([e for _, _, e in scored[:8]], experiment_dir / "best_trials.png",
                                labels=[t for _, t, _ in scored[:8]],
                                title=f"{spec.name}: best trials by {spec.metric}")
    except Exception as exc:
        log.warning("could not draw the trials' bar chart: %s", exc)
        return None


def _summary(results: Any, spec: SweepSpec, experiment_dir: Path) -> tuple[dict[str, Any] | None, list[Path]]:
    """Best trial, trials.csv and a bar chart of the finished trials' test accuracies."""
    files: list[Path] = []
    try:
        results.get_dataframe().to_csv(experiment_dir / "trials.csv", index=False)
        files.append(experiment_dir / "trials.csv")
    except Exception as exc:
        log.debug("no trials.csv: %s", exc)
    best = _best_trial(results, spec)
    chart = _bar_chart(results, spec, experiment_dir) if best else None
    return best, files + ([chart] if chart else [])


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


def _stored_spec(spec: SweepSpec, experiment_dir: Path, resume: bool, samples: int | None,
                 restorable: bool) -> SweepSpec:
    """The space a sweep runs with: the stored one on --resume (checked again), else ``spec``."""
    if resume and (experiment_dir / SPACE_COPY).is_file():
        stored = SweepSpec(**load_yaml(experiment_dir / SPACE_COPY))
        if stored.to_dict() != spec.to_dict():
            log.warning("resuming with the space stored in %s (the given space file differs)", experiment_dir)
        check_spec(stored)
        spec = stored
    if samples and not (resume and restorable):
        spec.samples = samples
    return spec


def _trial_base(spec: SweepSpec, user_base: dict[str, Any], dataset_path: Path) -> dict[str, Any]:
    """The config every trial starts from: the base with the resolved data and the sweep's experiment."""
    cfg = Config.from_dict(user_base)
    if cfg.aggregation != "driver":
        raise RequestError("space.value", f"base.aggregation must be driver (Tune trials aggregate on their driver, "
                           f"which each trial's placement group holds), got {cfg.aggregation!r}")
    backend = trial_backend(cfg.backend)
    return {**user_base, "backend": backend, "workers": (cfg.workers or 1) if backend == "ray" else cfg.workers,
            "data_root": str(dataset_path), "experiment": spec.experiment or cfg.experiment,
            # a trial interrupted with its sweep resumes from its last meta-validation
            "checkpoint_every": min(cfg.checkpoint_every or cfg.eval_every, cfg.eval_every)}


def _tuner(spec: SweepSpec, trainable: Any, bundles: list[dict[str, float]], storage: Path, experiment_dir: Path,
           restore: bool, limit: int, verbose: int) -> Any:
    """A new ``Tuner`` over the space, or the interrupted one restored from ``experiment_dir``."""
    from ray import tune

    wrapped = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles, strategy="PACK"))
    if restore:
        log.info("resuming sweep from %s", experiment_dir)
        return tune.Tuner.restore(str(experiment_dir), trainable=wrapped, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    return tune.Tuner(
        wrapped, param_space={k: tune_domain(v) for k, v in spec.search.items()},
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=make_searcher(spec),
                                    scheduler=make_scheduler(spec), num_samples=spec.samples,
                                    max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(storage), verbose=verbose,
                                  callbacks=[CloseTrialRuns(), StopAfterTrials()]),
    )


def _write_best_config(spec: SweepSpec, user_base: dict[str, Any], best: dict[str, Any], experiment_dir: Path,
                       best_config: str | Path | None) -> tuple[Path, str]:
    """``best_config.yaml`` (and ``best_config``): the best values over the base config."""
    best_cfg = Config.from_dict({**user_base, **best["config"], "out": f"runs/{spec.name}-best", "resume": False})
    path = experiment_dir / BEST_CONFIG
    best_cfg.to_yaml(path)
    if best_config:
        best_cfg.to_yaml(best_config)
    return path, str(Path(best_config).resolve()) if best_config else str(path)


@dataclass
class SweepPlan:
    """A sweep checked and resolved, before anything is written or started."""

    spec: SweepSpec
    storage: Path
    experiment_dir: Path
    restorable: bool
    user_base: dict[str, Any]
    dataset_path: str
    trial_base: dict[str, Any]
    bundles: list[dict[str, float]]


def plan_sweep(spec: SweepSpec, storage: str | Path, resume: bool = False, samples: int | None = None) -> SweepPlan:
    """Check everything a sweep needs (storage, space, data, the trials' models and resources)
    without writing or starting anything; a refusal is a ``RequestError`` naming the key."""
    from ray import tune

    storage = Path(storage).expanduser().resolve()
    check_out_dir("--storage", storage)
    experiment_dir = storage / spec.name
    restorable = tune.Tuner.can_restore(str(experiment_dir))
    if restorable and not resume:
        raise RequestError("space.exists", f"sweep {spec.name!r} (name, --name) already exists at {experiment_dir}; "
                           "accepted: --resume to continue it, or another --name or --storage")
    spec = _stored_spec(spec, experiment_dir, resume, samples, restorable)
    user_base = _absolute(spec.base)
    dataset_path = resolve_data(Config.from_dict(user_base))  # once, not in every trial
    trial_base = _trial_base(spec, user_base, dataset_path)
    trial = Config.from_dict({**trial_base, "out": str(experiment_dir / TRIALS_DIR / "preflight")})
    bundles = trial_bundles(trial, spec.resources)
    keys = {"CPU": "resources.driver_cpus, threads_per_worker", "GPU": "resources.driver_gpus, gpus_per_worker"}
    check_fits({r: (sum(b.get(r, 0.0) for b in bundles), f"one trial's {r}s ({keys[r]}, workers={trial.workers})")
                for r in keys})
    check_training(trial, dataset_path)
    return SweepPlan(spec, storage, experiment_dir, restorable, user_base, dataset_path, trial_base, bundles)


def sweep(spec: SweepSpec, *, storage: str | Path, resume: bool = False, samples: int | None = None,
          max_concurrent: int | None = None, stop_after_trials: int | None = None,
          best_config: str | Path | None = None, verbose: int = 1) -> dict[str, Any]:
    """Run (or resume) the sweep; returns ``{"status", "best", "best_config", "experiment_dir", ...}``.

    The request is checked first (:func:`plan_sweep`). Then the sweep's MLflow run is opened;
    whatever ends the sweep ends that run and its trials' runs: FINISHED, KILLED (Ctrl+C, SIGTERM,
    ``--stop-after-trials``; resumable) or FAILED with the error as their ``tsmd.error`` tag.
    ``SIGTERM`` stops the sweep as Ctrl+C does (Tune saves its state for ``--resume``);
    ``out["ended_by"]`` says which signal did (``None``: none).
    """
    import ray

    plan = plan_sweep(spec, storage, resume, samples)
    spec, experiment_dir = plan.spec, plan.experiment_dir
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / SPACE_COPY).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    if not ray.is_initialized():
        ray.init()
    limit = max_concurrent or spec.max_concurrent or concurrency(plan.bundles, ray.available_resources())
    log.info("sweep %s: %d trial(s), each %s (backend %s); up to %d at once; storage %s", spec.name,
             spec.samples, plan.bundles, plan.trial_base["backend"], limit, experiment_dir)

    # the trials' runs nest under the sweep's run, with the driver's code version and dataset digest
    mlflow_on = spec.base_config.mlflow
    uri = tracking.resolve_tracking_uri() if mlflow_on else None
    source = tracking.source_tags("tsmd_ray.tune")
    dataset = tracking.try_dataset_info(plan.dataset_path) if mlflow_on else None
    parent_run_id = _open_parent_run(spec, experiment_dir, uri, resume, source, dataset) if mlflow_on else None
    _RUNTIME.update(tracking_uri=uri, experiment_dir=experiment_dir, stop_after=stop_after_trials, finished=0,
                    stopping=False, ended_by=None)
    try:
        with on_sigterm(_stop_on_sigterm):
            results = _run_tuner(plan, limit, verbose, parent_run_id, uri, source, dataset, resume)
        return _conclude(plan, results, parent_run_id, uri, best_config)
    except BaseException as exc:
        if parent_run_id:
            status, error = ending(exc)
            _finish_parent_run(parent_run_id, uri, status, None, [experiment_dir / SPACE_COPY], error)
        raise


def _run_tuner(plan: SweepPlan, limit: int, verbose: int, parent_run_id: str | None, uri: str | None,
               source: dict[str, str], dataset: dict[str, Any] | None, resume: bool) -> Any:
    spec, experiment_dir = plan.spec, plan.experiment_dir
    trial_base = plan.trial_base

    def trainable(config: dict[str, Any]) -> None:
        run_trial(config, base=trial_base, experiment_dir=str(experiment_dir), sweep=spec.name, metric=spec.metric,
                  parent_run_id=parent_run_id, tracking_uri=uri, log_models=spec.log_models, source=source,
                  dataset=dataset)

    trainable.__name__ = "tsmd_trial"
    return _tuner(spec, trainable, plan.bundles, plan.storage, experiment_dir, resume and plan.restorable, limit,
                  verbose).fit()


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM during a sweep: Tune's own graceful stop (it saves the experiment state, the trials
    stop, ``--resume`` continues); before Tune runs, an interruption."""
    _RUNTIME["ended_by"] = TERMINATED
    if not _interrupt_tune():
        raise Terminated(TERMINATED)


def _conclude(plan: SweepPlan, results: Any, parent_run_id: str | None, uri: str | None,
              best_config: str | Path | None) -> dict[str, Any]:
    """Summary files, best config, and the end of the sweep's MLflow run (and of its trials' runs)."""
    spec, experiment_dir = plan.spec, plan.experiment_dir
    finished = finished_trials(experiment_dir)
    complete = finished >= spec.samples
    best, files = _summary(results, spec, experiment_dir)
    ended_by = None if complete else (_RUNTIME["ended_by"] or (STOPPED if _RUNTIME["stopping"] else INTERRUPTED))
    out: dict[str, Any] = {"experiment_dir": str(experiment_dir), "finished": finished, "errors": results.num_errors,
                           "samples": spec.samples, "status": "complete" if complete else "interrupted",
                           "ended_by": ended_by, "parent_run_id": parent_run_id, "best": best, "best_config": None}
    if best:
        path, out["best_config"] = _write_best_config(spec, plan.user_base, best, experiment_dir, best_config)
        files.append(path)
    files.append(experiment_dir / SPACE_COPY)
    if parent_run_id:
        _finish_parent_run(parent_run_id, uri, "FINISHED" if complete else "KILLED", best if complete else None,
                           files, ended_by)
    return out
