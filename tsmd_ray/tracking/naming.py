"""How runs are told apart: run names, config digests, run tags and the code version (source tags)."""
from __future__ import annotations

import functools
import getpass
import hashlib
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config
from .store import log

# Keys that say where a run computes and how it is recorded, not what it learns: two configs that
# differ only in these train the same thing, so they share a config digest.
PLACEMENT_KEYS = frozenset({
    "data_root", "cache_dir", "device", "task_batching", "vmap_chunk", "out", "checkpoint_every", "resume",
    "backend", "aggregation", "workers", "gpus_per_worker", "threads_per_worker", "mlflow", "experiment",
    "run_name", "system_metrics", "profile"})
PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Run colours in the MLflow UI (tag mlflow.runColor): one hue per method, a shade per seed.
METHOD_COLORS = {"student": ("#1f77b4", "#6baed6", "#08306b", "#4292c6"),
                 "tsmd": ("#d62728", "#fc9272", "#67000d", "#ef3b2c"),
                 "fixed-teacher": ("#2ca02c", "#a1d99b", "#00441b", "#41ab5d"),
                 "oracle": ("#9467bd", "#bcbddc", "#3f007d", "#807dba")}


def config_digest(cfg: Config) -> str:
    """6 hex digits identifying what ``cfg`` trains, seed excluded (runs that differ only in
    their seed share it); placement and bookkeeping keys (:data:`PLACEMENT_KEYS`) do not count."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in PLACEMENT_KEYS and k != "seed"}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:6]


def default_run_name(cfg: Config) -> str:
    """``<method>[-reptile]-<config digest>-seed<seed>-<dataset>-<ways>w<shots>s``: what tells runs
    apart comes first, as the MLflow UI cuts long names short in its run list and chart legends."""
    algorithm = "" if cfg.meta_algorithm == "maml" else f"-{cfg.meta_algorithm}"
    return f"{cfg.method}{algorithm}-{config_digest(cfg)}-seed{cfg.seed}-{cfg.dataset}-{cfg.ways}w{cfg.shots}s"


def run_name(cfg: Config) -> str:
    """``--run-name`` when given, else :func:`default_run_name`."""
    return cfg.run_name or default_run_name(cfg)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_run_name(trial_name: str, values: Mapping[str, Any]) -> str:
    """A Tune trial's run name: its number and its searched values, ``00003 alpha=0.0341 lam=0.2``."""
    number = trial_name.rsplit("_", 1)[-1]
    return " ".join([number, *(f"{key}={_short(value)}" for key, value in values.items())])


def run_tags(cfg: Config, nested: bool = False) -> dict[str, str]:
    """Tags that group runs: method, dataset, setting, seed, config digest, output, preset; and,
    unless the run is nested (a sweep's trials keep MLflow's own colours), the run's colour."""
    tags = {"tsmd.method": cfg.method, "tsmd.dataset": cfg.dataset, "tsmd.setting": f"{cfg.ways}-way {cfg.shots}-shot",
            "tsmd.seed": str(cfg.seed), "tsmd.config_digest": config_digest(cfg),
            "tsmd.out": str(Path(cfg.out).resolve())}
    if cfg.profile:
        tags["tsmd.profile"] = cfg.profile
    if not nested:
        shades = METHOD_COLORS[cfg.method]
        tags["mlflow.runColor"] = shades[cfg.seed % len(shades)]
    return tags


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """Git commit, branch and dirty flag of the checkout that holds ``tsmd_ray`` (empty outside git)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        log.info("tsmd_ray at %s is not in a git checkout: runs carry no commit", PACKAGE_DIR)
        return {}
    status = _git("status", "--porcelain", "--untracked-files=no")
    version = {"mlflow.source.git.commit": commit, "mlflow.source.git.dirty": str(bool(status)).lower()}
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        version["mlflow.source.git.branch"] = branch
    return version


def entry_point() -> str:
    """The command that runs: ``tsmd_ray.<module>`` for our entry points, else the script's name."""
    main = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if main is None:
        return "<console>"
    if not main.is_relative_to(PACKAGE_DIR):
        return main.name
    parts = main.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(["tsmd_ray", *(part for part in parts if part != "__main__")])


def source_tags(entry: str | None = None) -> dict[str, str]:
    """MLflow's source tags (entry point, git commit and dirty flag) and the user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"mlflow.source.name": entry or entry_point(), "mlflow.source.type": "LOCAL", "mlflow.user": user,
            **code_version()}
