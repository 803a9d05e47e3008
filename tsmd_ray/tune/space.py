"""Space files of sweeps: parsing, validation, and the Tune search domains they stand for."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import CONFIG_KEYS, Config, did_you_mean, load_yaml
from ..errors import RequestError

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "qloguniform", "randint", "qrandint", "lograndint", "choice")
SPACE_KEYS = {"name", "description", "metric", "mode", "samples", "searcher", "seed", "max_concurrent",
              "scheduler", "resources", "log_models", "experiment", "search", "base"}
ALIASES = {"lambda": "lam"}  # the paper's names for Config keys
SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "fifo", "none")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "max_t", "brackets")
RESOURCE_KEYS = ("driver_cpus", "driver_gpus")

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
        raise RequestError("space.distribution", f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise RequestError("space.distribution", f"{what}: {value!r} is not finite")
    return number


def parse_distribution(key: str, spec: Any) -> dict[str, Any]:
    """``{"loguniform": [low, high]}`` and friends; a plain value is a constant."""
    if not isinstance(spec, Mapping):
        return {"constant": spec}
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise RequestError("space.distribution", f"search.{key}: expected one of {', '.join(DISTRIBUTIONS)} with "
                           f"its arguments, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise RequestError("space.distribution", f"search.{key}: choice needs a non-empty list, got {args!r}")
        return {"choice": args}
    if not isinstance(args, list) or len(args) not in (2, 3) or (kind.startswith("q") != (len(args) == 3)):
        raise RequestError("space.distribution", f"search.{key}: {kind} needs "
                           f"[low, high{', q' if kind.startswith('q') else ''}], got {args!r}")
    values = [_number(a, f"search.{key}") for a in args]
    low, high = values[0], values[1]
    if not low < high:
        raise RequestError("space.distribution", f"search.{key}: low {low} must be below high {high}")
    if "log" in kind and low <= 0:
        raise RequestError("space.distribution", f"search.{key}: {kind} needs a positive low bound, got {low}")
    if "randint" in kind:
        values = [int(v) for v in values]
    return {kind: values}


def _mapping(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise RequestError("space.value", f"{key} must be a mapping, got {value!r}")
    return dict(value)


def _integer(data: Mapping[str, Any], key: str, default: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError("space.value", f"{key} must be an integer, got {value!r}")
    return value


def _config_key(key: Any, where: str) -> str:
    name = ALIASES.get(key, str(key)).replace("-", "_")
    if name not in CONFIG_KEYS:
        raise RequestError("config.unknown-key", f"{where} key {key!r} is not a Config key"
                                                 f"{did_you_mean(name, CONFIG_KEYS)}")
    return name


def load_space(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and check a space file; ``overrides`` replace keys of its base config. A refusal names
    the file and the key at fault."""
    path = Path(path)
    data = load_yaml(path)
    try:
        return _parse_space(path, data, overrides or {})
    except RequestError as exc:
        raise RequestError(exc.rule, f"{path}: {exc}") from None


def _parse_space(path: Path, data: dict[str, Any], overrides: Mapping[str, Any]) -> SweepSpec:
    unknown = sorted(set(data) - SPACE_KEYS, key=str)
    if unknown:
        raise RequestError("space.value", f"unknown key(s) {', '.join(map(str, unknown))}"
                           f"{did_you_mean(str(unknown[0]), SPACE_KEYS)}; accepted: {', '.join(sorted(SPACE_KEYS))}")
    base = {ALIASES.get(k, str(k)).replace("-", "_"): v for k, v in {**_mapping(data, "base"), **overrides}.items()}
    try:
        cfg = Config.from_dict(base)
    except RequestError as exc:
        raise RequestError(exc.rule, f"base: {exc}") from None
    search_raw = data.get("search")
    if not isinstance(search_raw, Mapping) or not search_raw:
        raise RequestError("space.value", f"search must map Config keys to distributions, got {search_raw!r}")
    search = {_config_key(key, "search"): parse_distribution(key, spec) for key, spec in search_raw.items()}
    spec = SweepSpec(name=str(data.get("name") or path.stem), search=search, base=cfg.to_dict(),
                     metric=str(data.get("metric", "val/student_acc")), mode=str(data.get("mode", "max")),
                     samples=_integer(data, "samples", 16), searcher=str(data.get("searcher", "optuna")),
                     seed=_integer(data, "seed", 0), max_concurrent=_integer(data, "max_concurrent", 0),
                     scheduler=_mapping(data, "scheduler"), resources=_mapping(data, "resources"),
                     log_models=bool(data.get("log_models", True)), experiment=data.get("experiment"),
                     description=str(data.get("description", "")))
    check_spec(spec)
    return spec


def check_spec(spec: SweepSpec) -> None:
    """Everything about a sweep that its space decides, before anything starts; each refusal names
    the key at fault and the accepted range."""
    cfg = spec.base_config
    _check_settings(spec)
    _check_metric(spec, cfg)
    _check_scheduler(spec.scheduler, cfg)
    _check_reports(spec, cfg)
    _check_resources(spec.resources)
    _check_search(spec, cfg)


def _check_settings(spec: SweepSpec) -> None:
    for key, value, accepted in (("mode", spec.mode, ("max", "min")), ("searcher", spec.searcher, SEARCHERS)):
        if value not in accepted:
            raise RequestError("space.value", f"{key} must be one of {', '.join(accepted)}, got {value!r}")
    if spec.samples < 1:
        raise RequestError("space.value", f"samples must be a positive integer, got {spec.samples}")
    if spec.max_concurrent < 0:
        raise RequestError("space.value", f"max_concurrent must be zero (as the free resources allow) or positive, "
                           f"got {spec.max_concurrent}")


def _check_metric(spec: SweepSpec, cfg: Config) -> None:
    """The metric is one that every trial reports: the meta-validation accuracy of a model it trains."""
    reported = [f"val/{model}_acc" for model, trained in (("student", cfg.has_student), ("teacher", cfg.has_teacher))
                if trained]
    if spec.metric not in reported:
        raise RequestError("space.metric", f"metric must be one of {', '.join(reported)} (what trials of method "
                           f"{cfg.method} report at each meta-validation), got {spec.metric!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scheduler(sched: Mapping[str, Any], cfg: Config) -> None:
    """ASHA's milestones fit the trials: 1 <= grace_period <= max_t <= iterations, reduction_factor > 1."""
    unknown = sorted(set(sched) - set(SCHEDULER_KEYS), key=str)
    if unknown:
        raise RequestError("space.scheduler", f"scheduler keys must be among {', '.join(SCHEDULER_KEYS)}, "
                           f"got {unknown[0]!r}")
    kind = sched.get("type", "asha")
    if kind not in SCHEDULERS:
        raise RequestError("space.scheduler", f"scheduler.type must be one of {', '.join(SCHEDULERS)}, got {kind!r}")
    if kind != "asha":
        return
    for key in ("grace_period", "max_t", "brackets"):
        if key in sched and not (_is_int(sched[key]) and sched[key] >= 1):
            raise RequestError("space.scheduler", f"scheduler.{key} must be a positive integer, got {sched[key]!r}")
    factor = sched.get("reduction_factor", 3)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise RequestError("space.scheduler", f"scheduler.reduction_factor must be a number above 1, got {factor!r}")
    max_t = sched.get("max_t", cfg.iterations)
    if max_t > cfg.iterations:
        raise RequestError("space.asha", f"scheduler.max_t must be between 1 and iterations ({cfg.iterations}), "
                           f"got {max_t}")
    if sched.get("grace_period", 1) > max_t:
        bound = f"max_t ({max_t})" if "max_t" in sched else f"max_t (= iterations, {max_t})"
        raise RequestError("space.asha", f"scheduler.grace_period must be between 1 and {bound}, "
                           f"got {sched['grace_period']}")


def _check_reports(spec: SweepSpec, cfg: Config) -> None:
    """Trials report the metric at each meta-validation: there must be some, and episodes to score."""
    if not 1 <= cfg.eval_every <= cfg.iterations:
        raise RequestError("space.reports", f"base.eval_every must be between 1 and iterations ({cfg.iterations}): "
                           f"trials report {spec.metric} at each meta-validation, got {cfg.eval_every}")
    if cfg.val_episodes < 1:
        raise RequestError("space.reports", f"base.val_episodes must be a positive integer: trials report "
                           f"{spec.metric} over meta-validation episodes, got {cfg.val_episodes}")


def _check_resources(resources: Mapping[str, Any]) -> None:
    for key, value in resources.items():
        if key not in RESOURCE_KEYS:
            raise RequestError("space.value", f"resources keys must be among {', '.join(RESOURCE_KEYS)}, "
                               f"got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise RequestError("space.value", f"resources.{key} must be zero or a positive number, got {value!r}")


def _check_search(spec: SweepSpec, cfg: Config) -> None:
    """Every searched key changes the trials, and every sampled value gives a valid Config."""
    inert = set() if {"method", "kd_loss"} & set(spec.search) else cfg.inert_keys
    for key, dist in spec.search.items():
        if key in inert:
            raise RequestError("space.inert", f"search.{key} changes nothing with method={cfg.method} (kd_loss "
                               f"{cfg.resolved_kd_loss}); accepted: keys that the method uses")
        for value in _extremes(dist):
            try:
                Config.from_dict({**spec.base, key: coerce(key, value)})
            except (TypeError, ValueError) as exc:
                raise RequestError(getattr(exc, "rule", "config.type"),
                                   f"search.{key}={value!r} gives an invalid config: {exc}") from None


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
