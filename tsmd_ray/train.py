"""Meta-train teacher and student: ``python -m tsmd_ray.train [--config FILE.yaml] [flags]``.

Runs on Ray by default (``ray.init()`` joins $RAY_ADDRESS or a ``ray start`` cluster, else
starts a local one): worker actors compute the tasks and this process aggregates their gradients,
or with ``--aggregation allreduce`` Ray Train workers all-reduce them among themselves.
``--backend local`` runs in this process without Ray.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import tracking
from .config import Config
from .flags import add_config_arguments, config_from_args
from .data import ArrowFewShotDataset
from .engine import DataSpec
from .errors import RequestError, entry_point
from .preflight import check_training
from .training import LocalRunner, Reporter, Runner, Trainer, clear_run, resumes

log = logging.getLogger("tsmd_ray.train")


def make_runner(cfg: Config, dataset_path: str) -> Runner:
    if cfg.backend == "local":
        return LocalRunner(cfg, dataset_path)
    from .distributed import RayRunner  # Ray is imported only when used

    return RayRunner(cfg, dataset_path)


def run(cfg: Config, reporters: Sequence[Reporter] = (), tracker: Any = None,
        parent_run_id: str | None = None) -> dict[str, Any]:
    """Check the request (:func:`~tsmd_ray.preflight.check_training`: data, models, files,
    resources), meta-train, meta-test; returns the evaluation.

    With ``cfg.mlflow`` the run is tracked in MLflow (``tsmd_ray.tracking``); ``tracker`` replaces
    the default tracker (Tune trials pass one nested under their sweep's run); ``parent_run_id``
    nests the default tracker's run (a grid's cell under its grid). However the run ends,
    its MLflow run ends with it (FAILED or KILLED with the error as its ``tsmd.error`` tag).
    """
    dataset_path = check_training(cfg)  # before Ray starts or an MLflow run opens
    allreduce = cfg.backend == "ray" and cfg.aggregation == "allreduce"
    if allreduce and (reporters or tracker is not None):
        raise RequestError("config.allreduce", "aggregation=allreduce reports from inside Ray Train workers; "
                           "use aggregation=driver here (Tune trials do)")
    if not resumes(cfg) and (removed := clear_run(cfg.out)):
        log.warning("%s: training from iteration 0 (%s): removed the earlier run's %s", cfg.out,
                    "no checkpoint.pt to resume from" if cfg.resume else "resume is off", ", ".join(removed))
    if allreduce:
        from .distributed.allreduce import run_allreduce

        with tracking.ends_run_in(cfg.out):  # its run lives in the Ray Train workers
            return run_allreduce(cfg, dataset_path)
    dataset = ArrowFewShotDataset(dataset_path)
    if tracker is None:
        tracker = tracking.tracker(cfg, dataset_path=dataset_path, parent_run_id=parent_run_id)
    with tracker:
        runner = make_runner(cfg, dataset_path)
        try:
            # MLflow first: a Tune reporter may end the trial inside report() (ASHA), losing later reporters
            trainer = Trainer(cfg, runner, DataSpec.of(dataset), dataset.meta, [tracker, *reporters])
            return trainer.fit()
        finally:
            runner.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    return parser


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{result['method']} {result['ways']}-way {result['shots']}-shot on {result['dataset']}:"]
    for model, s in result["results"].items():
        lines.append(f"  {model}: {100 * s['mean']:.2f}% +- {100 * s['ci95']:.2f} ({s['episodes']} episodes)")
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    result = run(config_from_args(args))
    print(format_result(result))
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)), resumable=True)


if __name__ == "__main__":
    sys.exit(main())
