"""The paper's pipeline in one command, sized to the machine (``make train``).

    python -m tsmd_ray.pipeline [--profile laptop|gpu] [--config FILE.yaml] [--no-baseline] [train flags]

1. Pre-train the teacher on the meta-training classes (``tsmd_ray.pretrain``; cached by its
   settings and data, so a second run reuses it).
2. Meta-train teacher and student with TSMD from that teacher (``tsmd_ray.train`` with
   ``--teacher-init``), then meta-test both on the held-out classes.
3. Meta-train and meta-test the student alone (MAML) on the same tasks, for comparison.

Then it prints the accuracies and what to do next. Profiles are YAML files in ``configs/``:
``train`` (``Config`` keys; flags override them), ``pretrain`` (``tsmd_ray.pretrain`` settings; the
teacher, data, seed and backend come from ``train``) and ``baseline`` (``Config`` keys that change for
the comparison run, or ``null``). Without ``--profile`` or ``--config``: ``gpu`` when torch sees a
CUDA device, else ``laptop``. ``--config FILE`` takes a profile file, or a plain ``Config`` file,
which is meta-trained as it is (profile ``config``: no pre-training, no comparison run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write
from .config import Config, load_yaml
from .flags import BoolFlag, add_config_arguments
from .errors import entry_point
from .preflight import check_training
from .pretrain import cached_pretrain, check_request, pretrain_args
from .training import summarise

log = logging.getLogger("tsmd_ray.pipeline")

PROFILES = Path(__file__).resolve().parents[1] / "configs"
PROFILE_KEYS = {"profile", "description", "train", "pretrain", "baseline"}
RESULT_FILE = "pipeline.json"


@dataclass
class Plan:
    """What one pipeline run does."""

    profile: str
    source: str  # the file the settings came from, and why it was chosen
    train: Config
    pretrain: dict[str, Any] | None = None  # tsmd_ray.pretrain settings; None: psi is not pre-trained here
    baseline: dict[str, Any] | None = None  # Config changes of the student-alone run; None: no such run


def choose_profile(args: argparse.Namespace) -> tuple[str, Path, str]:
    """Profile name, file and the reason it was chosen."""
    if args.config:
        return Path(args.config).stem, Path(args.config), "--config"
    if getattr(args, "profile", None):
        return args.profile, PROFILES / f"{args.profile}.yaml", "--profile"
    import torch

    if torch.cuda.is_available():
        return "gpu", PROFILES / "gpu.yaml", f"{torch.cuda.device_count()} CUDA device(s) found"
    return "laptop", PROFILES / "laptop.yaml", "no GPU found"


def make_plan(args: argparse.Namespace) -> Plan:
    """The profile's settings with the command line's flags over its ``train`` keys."""
    name, path, reason = choose_profile(args)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml") if "train" in load_yaml(p)))
        raise FileNotFoundError(f"profile file {path} does not exist (profiles in {PROFILES}: {known})")
    data = load_yaml(path)
    flags = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name) and f.name != "profile"}
    source = f"{_short(path)} ({reason})"
    if "base" in data:
        raise ValueError(f"{path} is a reproduce grid: run it with python -m tsmd_ray.reproduce --grid {path}")
    if "train" not in data:
        return Plan("config", source, Config.from_dict({**data, **flags, "profile": "config"}))
    unknown = sorted(set(data) - PROFILE_KEYS)
    if unknown:
        raise ValueError(f"profile {path}: unknown key(s) {', '.join(unknown)} "
                         f"(expected {', '.join(sorted(PROFILE_KEYS))})")
    name = data.get("profile", name)
    cfg = Config.from_dict({**data["train"], **flags, "profile": name})
    pretrain = data.get("pretrain") if cfg.has_teacher and not (cfg.teacher_init or cfg.teacher_weights) else None
    if pretrain is not None:
        pretrain_args(**pretrain)  # unknown settings fail now, before anything runs
    baseline = data.get("baseline") if args.baseline and cfg.method != "student" else None
    return Plan(name, source, cfg, pretrain, baseline)


# ---------------------------------------------------------------------- stages
def teacher_args(cfg: Config, settings: dict[str, Any]) -> argparse.Namespace:
    """The ``tsmd_ray.pretrain`` settings of stage 1: the profile's, with the teacher, data, seed
    and backend of ``cfg``."""
    return pretrain_args(**{**settings, "dataset": cfg.dataset, "data_root": cfg.data_root,
                            "cache_dir": cfg.cache_dir, "teacher": cfg.teacher, "teacher_widths": cfg.teacher_widths,
                            "seed": cfg.seed, "backend": cfg.backend})


def pretrain_teacher(cfg: Config, settings: dict[str, Any]) -> dict[str, Any]:
    """Stage 1: the teacher of ``cfg`` pre-trained (or found in the cache); returns the summary."""
    return cached_pretrain(teacher_args(cfg, settings))


def baseline_config(cfg: Config, changes: dict[str, Any]) -> Config:
    """The student meta-trained alone (MAML), on the same tasks, beside ``cfg.out``."""
    out = Path(cfg.out)
    return cfg.replace(**{"method": "student", "out": str(out.with_name(out.name + "-student")), **changes})


def run(plan: Plan) -> dict[str, Any]:
    """Run the stages of ``plan``; returns (and writes to ``OUT/pipeline.json``) what they gave."""
    from . import train

    cfg, record, seconds = plan.train, {"profile": plan.profile, "source": plan.source}, {}
    if plan.pretrain is not None:
        with _stage(seconds, "pretrain", f"pre-train the teacher ({_arch(cfg.teacher, cfg.teacher_widths)}) "
                                         "on the meta-training classes"):
            record["teacher"] = pretrain_teacher(cfg, plan.pretrain)
        cfg = cfg.replace(teacher_init=record["teacher"]["out"])
    with _stage(seconds, "train", f"meta-train {cfg.method} ({cfg.iterations} iterations of {cfg.meta_batch} tasks), "
                                  f"then meta-test on {cfg.test_episodes} episodes of held-out classes"):
        record["train"] = _with_out(train.run(cfg), cfg)
    if plan.baseline is not None:
        base = baseline_config(cfg, plan.baseline)
        with _stage(seconds, "baseline", f"for comparison: the student alone (MAML) on the same tasks, "
                                         f"{base.iterations} iterations"):
            record["baseline"] = _with_out(train.run(base), base)
    record["seconds"] = {**seconds, "total": round(sum(seconds.values()), 1)}
    atomic_write(Path(cfg.out) / RESULT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    return record


@contextlib.contextmanager
def _stage(seconds: dict[str, float], name: str, text: str) -> Iterator[None]:
    """Announce a stage and record its wall time under ``name``."""
    print(f"\n== {text}", flush=True)
    started = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - started, 1)


def _with_out(result: dict[str, Any], cfg: Config) -> dict[str, Any]:
    return {**result, "out": cfg.out, "config": cfg.to_dict()}


def _arch(name: str, widths: Sequence[int] | None) -> str:
    return f"{name} {'-'.join(map(str, widths))}" if widths else name


# ---------------------------------------------------------------------- report
def format_results(record: dict[str, Any]) -> str:
    """The accuracies with their 95% confidence intervals, one model a line."""
    result, cfg = record["train"], record["train"]["config"]
    lines = [f"\nResults ({cfg['method']}, {cfg['dataset']} {cfg['ways']}-way {cfg['shots']}-shot, "
             f"{cfg['test_episodes']} test episodes of held-out classes; mean +- 95% CI; chance "
             f"{100 / cfg['ways']:.1f}%):"]
    teacher = "pre-trained, then meta-trained" if "teacher" in record else "meta-trained"
    rows = [("teacher", _arch(cfg["teacher"], cfg["teacher_widths"]), teacher, result["results"].get("teacher")),
            ("student", _arch(cfg["student"], cfg["student_widths"]), f"{cfg['method']}, taught by the teacher",
             result["results"].get("student"))]
    if "baseline" in record:
        base = record["baseline"]
        rows.append(("student", _arch(base["config"]["student"], base["config"]["student_widths"]),
                     "alone (MAML), for comparison", base["results"].get("student")))
    for model, arch, how, s in rows:
        if s is not None:
            lines.append(f"  {model:8s} {arch:18s} {how:32s} {100 * s['mean']:6.2f}% +- {100 * s['ci95']:.2f}")
    difference = paired_difference(result, record.get("baseline"))
    if difference is not None:
        lines.append(f"  {'taught minus alone, paired over the same episodes':60s} {100 * difference['mean']:+6.2f}"
                     f"  +- {100 * difference['ci95']:.2f} points")
    seconds = record["seconds"]
    lines.append("  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return "\n".join(lines)


def paired_difference(result: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, float] | None:
    """Student accuracy of ``result`` minus that of ``baseline``, episode by episode (same seeded episodes)."""
    if baseline is None or "student" not in result["results"]:
        return None
    mine, alone = result["results"]["student"], baseline["results"]["student"]
    if len(mine.get("per_episode", [])) != len(alone.get("per_episode", [])) or not mine.get("per_episode"):
        return None
    return summarise([a - b for a, b in zip(mine["per_episode"], alone["per_episode"])])


def format_next_steps(record: dict[str, Any]) -> str:
    """What to run next, with this run's paths filled in."""
    from .tracking import read_run_file

    out = record["train"]["out"]
    checkpoint = Path(out) / "checkpoint.pt"
    lines = ["\nNext:"]
    if os.environ.get("VIRTUAL_ENV") != sys.prefix and sys.prefix != sys.base_prefix:
        lines.append(f"  source {_short(Path(sys.prefix) / 'bin' / 'activate')}")
    lines += [f"  python -m tsmd_ray.evaluate --checkpoint {_short(checkpoint)}     # meta-test again",
              f"  python -m tsmd_ray.adapt --checkpoint {_short(checkpoint)} --support MY_CLASSES/ "
              f"--out {_short(Path(out) / 'my_student')}",
              "      # MY_CLASSES/: one folder of a few images per class; adapts the teacher, then the student",
              f"  python -m tsmd_ray.predict --model {_short(Path(out) / 'my_student')} IMAGE.png ...",
              *_mlflow_lines(read_run_file(out), out)]
    if "teacher" in record:
        lines.append(f"  (the pre-trained teacher is cached at {_short(record['teacher']['out'])} and reused "
                     "by the next run with the same settings)")
    return "\n".join(lines)


def _mlflow_lines(info: dict[str, Any], out: str) -> list[str]:
    uri, run_id = info.get("tracking_uri"), info.get("run_id")
    if not uri:
        return []
    if info.get("status") == "pending_upload":
        return [f"  python -m tsmd_ray.tracking upload {_short(out)}     # MLflow was unreachable: upload the run"]
    page = f"#/experiments/{info.get('experiment_id')}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return [f"  open {uri.rstrip('/')}/{page}     # the run in MLflow"]
    return [f"  mlflow ui --backend-store-uri {uri}     # then open http://127.0.0.1:5000/{page}"]


def _short(path: str | Path) -> str:
    """``path`` relative to the working directory when inside it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action=BoolFlag, default=True,
                        help="also meta-train the student alone for comparison (default on; --no-baseline)")
    add_config_arguments(parser)
    return parser


def _start_ray(cfg: Config) -> bool:
    """One Ray session for every stage (``ray.init`` joins $RAY_ADDRESS or a ``ray start`` cluster); True if started."""
    import ray

    if cfg.backend != "ray" or ray.is_initialized():
        return False
    ray.init(logging_level=logging.WARNING)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's start-up INFO lines between the bars
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)), resumable=True)


def _main(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    print(f"tsmd-ray: profile {plan.profile}, from {plan.source}", flush=True)
    for cfg in [plan.train] + ([baseline_config(plan.train, plan.baseline)] if plan.baseline is not None else []):
        check_training(cfg)  # the whole request, before Ray starts or anything is written
    if plan.pretrain is not None:
        check_request(teacher_args(plan.train, plan.pretrain))
    started_ray = _start_ray(plan.train)
    try:
        record = run(plan)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print(format_results(record))
    print(format_next_steps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
