"""Meta-test a checkpoint: ``python -m tsmd_ray.evaluate --checkpoint PATH``.

Adapts on 800 seeded test episodes (the paper's protocol) and prints the mean query accuracy
with its 95% confidence interval for the student (and the teacher, where there is one).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write, load_checkpoint
from .config import Config
from .data import ArrowFewShotDataset
from .engine import DataSpec, MetaLearner
from .errors import entry_point
from .preflight import check_device, check_minimum, check_out_file, check_splits, check_workers, resolve_data
from .train import format_result, make_runner
from .training import evaluate

log = logging.getLogger("tsmd_ray.evaluate")


def evaluate_checkpoint(path: str, episodes: int = 800, split: str = "test", **overrides: Any) -> dict[str, Any]:
    """Evaluation of the checkpoint at ``path``; ``overrides`` replace config values (e.g. data_root).
    The request is checked (checkpoint, data, resources) before Ray starts."""
    check_minimum("--episodes", episodes, 1)
    payload = load_checkpoint(path)
    cfg = Config.from_checkpoint(payload["config"], **{k: v for k, v in overrides.items() if v is not None})
    dataset_path = resolve_data(cfg)
    check_splits(cfg, ArrowFewShotDataset(dataset_path), [split])
    check_device(cfg)
    check_workers(cfg)
    spec = DataSpec(payload["data"]["in_channels"], payload["data"]["image_size"])
    learner = MetaLearner(cfg, spec)
    learner.load_state_dict(payload["learner"])
    runner = make_runner(cfg, dataset_path)
    try:
        summary = evaluate(runner, learner.weights(), split, episodes)
    finally:
        runner.close()
    return {"checkpoint": str(path), "method": cfg.method, "dataset": cfg.dataset, "ways": cfg.ways,
            "shots": cfg.shots, "split": split, "iteration": payload["iteration"], "results": summary}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by tsmd_ray.train")
    parser.add_argument("--episodes", type=int, default=800, help="test episodes (default 800)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--data-root", help="dataset location, if not the one used for training")
    parser.add_argument("--backend", choices=("ray", "local"), help="default: the checkpoint's")
    parser.add_argument("--workers", type=int, help="Ray worker actors (default: the checkpoint's)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    return parser


def _main(args: argparse.Namespace) -> int:
    check_out_file("--json", args.json)
    result = evaluate_checkpoint(args.checkpoint, args.episodes, args.split, data_root=args.data_root,
                                 backend=args.backend, workers=args.workers)
    print(format_result(result))
    print(json.dumps(result))
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
