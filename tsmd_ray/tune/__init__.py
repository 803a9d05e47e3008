"""Hyperparameter sweeps with Ray Tune: ``python -m tsmd_ray.tune --space tune_spaces/NAME.yaml``.

A space file (see ``tune_spaces/`` and docs/tracking.md) names the searched Config keys and
their distributions, the fixed base training config, the searcher (Optuna by default, ``random``
as a fallback) and the ASHA scheduler over meta-validation accuracy (``val/student_acc``).

Each trial is one meta-training (``tsmd_ray.train.run``: the trial's driver plus its Ray worker
actors) whose resources are reserved up front in a placement group; it reports meta-validation
accuracy at every ``eval_every`` iterations, so ASHA can stop poor trials early. As many trials
run at once as the cluster's free CPUs/GPUs hold. The whole request (space, data, the trials'
models and resources) is checked before Ray starts or anything is written (docs/errors.md).
``Ctrl+C``, ``SIGTERM`` (or ``--stop-after-trials``) end a sweep resumably: ``--resume`` continues
it without redoing finished trials, and unfinished trials continue from their own
``checkpoint.pt``. At the end the best config is printed and written as YAML for
``python -m tsmd_ray.train --config``.

With ``mlflow: true`` in the base config the sweep is an MLflow run with one nested run per trial,
named by its searched values; the sweep's run shows the best trial's metrics. However the sweep
ends, its run and its trials' runs end with it (FINISHED, KILLED or FAILED with the error as their
``tsmd.error`` tag), and ``--resume`` continues in the same runs.

Modules: ``space`` (space files), ``trials`` (a trial: resources, trainable, reports, callbacks),
``driver`` (running the sweep, its MLflow run and summary), ``cli`` (the command line).
"""
from .cli import build_parser, format_summary, main
from .driver import (BEST_CONFIG, SPACE_COPY, SWEEP_FILE, SweepPlan, finished_trials, make_scheduler,
                     make_searcher, plan_sweep, sweep)
from .space import (ALIASES, DISTRIBUTIONS, SPACE_KEYS, SweepSpec, check_spec, coerce, load_space,
                    parse_distribution, parse_overrides, tune_domain)
from .trials import (TRIALS_DIR, CloseTrialRuns, StopAfterTrials, TuneReporter, concurrency,
                     finished_trial_result, run_trial, trial_backend, trial_bundles, trial_out_dir)

__all__ = [
    "ALIASES", "BEST_CONFIG", "DISTRIBUTIONS", "SPACE_COPY", "SPACE_KEYS", "SWEEP_FILE", "TRIALS_DIR",
    "CloseTrialRuns", "StopAfterTrials", "SweepPlan", "SweepSpec", "TuneReporter", "build_parser", "check_spec",
    "coerce", "concurrency", "finished_trial_result", "finished_trials", "format_summary", "load_space", "main",
    "make_scheduler", "make_searcher", "parse_distribution", "parse_overrides", "plan_sweep", "run_trial", "sweep",
    "trial_backend", "trial_bundles", "trial_out_dir", "tune_domain",
]
