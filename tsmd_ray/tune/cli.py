"""The command line of sweeps: ``python -m tsmd_ray.tune --space tune_spaces/NAME.yaml``."""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import INTERRUPTED, TERMINATED, Terminated, entry_point
from ..preflight import check_minimum
from .driver import sweep
from .space import load_space, parse_overrides

log = logging.getLogger("tsmd_ray.tune")


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
    from . import __doc__ as doc

    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.tune", description=doc,
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


def _main(args: argparse.Namespace) -> int:
    for flag in ("samples", "max_concurrent", "stop_after_trials"):
        check_minimum("--" + flag.replace("_", "-"), getattr(args, flag), 1)
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
    print(format_summary(out, spec.metric))
    print(json.dumps({k: out[k] for k in ("status", "finished", "samples", "best_config", "experiment_dir")}))
    if out["ended_by"] == TERMINATED:  # the runs are ended; say so, and how to continue, in one line
        raise Terminated(TERMINATED)
    if out["ended_by"] == INTERRUPTED:
        raise KeyboardInterrupt
    if out["best"] is None:
        raise RuntimeError(f"no trial reported {spec.metric} ({out['errors']} errored; see {out['experiment_dir']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)), resumable=True)
