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
from .config import Config, add_config_arguments, config_from_args
from .data import ArrowFewShotDataset, resolve_dataset
from .engine import DataSpec
from .training import LocalRunner, Reporter, Runner, Trainer

log = logging.getLogger("tsmd_ray.train")


def make_runner(cfg: Config, dataset_path: str) -> Runner:
    if cfg.backend == "local":
        return LocalRunner(cfg, dataset_path)
    from .distributed import RayRunner  # Ray is imported only when used

    return RayRunner(cfg, dataset_path)


def run(cfg: Config, reporters: Sequence[Reporter] = (), tracker: Any = None) -> dict[str, Any]:
    """Resolve the data, meta-train, meta-test; returns the evaluation.

    With ``cfg.mlflow`` the run is tracked in MLflow (``tsmd_ray.tracking``); ``tracker`` replaces
    the default tracker (Tune trials pass one nested under their sweep's run).
    """
    dataset_path = str(resolve_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir))
    if cfg.backend == "ray" and cfg.aggregation == "allreduce":
        if reporters or tracker is not None:
            raise ValueError("aggregation=allreduce reports from inside Ray Train workers; "
                             "use aggregation=driver here (Tune trials do)")
        from .distributed.allreduce import run_allreduce

        return run_allreduce(cfg, dataset_path)
    dataset = ArrowFewShotDataset(dataset_path)
    with tracker if tracker is not None else tracking.tracker(cfg, dataset_path=dataset_path) as tracker:
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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    print(format_result(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
