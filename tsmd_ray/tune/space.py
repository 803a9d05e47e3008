"""Space files of sweeps: parsing, validation, and the Tune search domains they stand for."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, load_yaml

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "qloguniform", "randint", "qrandint", "lograndint", "choice")
SPACE_KEYS = {"name", "description", "metric", "mode", "samples", "searcher", "seed", "max_concurrent",
              "scheduler", "resources", "log_models", "experiment", "search", "base"}
ALIASES = {"lambda": "lam"}  # the paper's names for Config keys

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
