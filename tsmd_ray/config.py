"""The one configuration of tsmd-ray: a dataclass read from YAML and the command line.

Command-line flags are the field names with dashes (``--inner-steps``); ``--config FILE.yaml``
holds the same keys with underscores (or dashes). Flags given on the command line win over the
file, the file wins over the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

METHODS = ("student", "fixed-teacher", "tsmd", "oracle")
META_ALGORITHMS = ("maml", "reptile")
KD_LOSSES = ("auto", "kl", "rkd")
TASK_BATCHING = ("auto", "vmap", "loop")
DTYPES = ("float32", "float64")
BATCH_NORM = ("support", "transductive")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def _default_data_root() -> str | None:
    return os.environ.get("TSMD_DATA_ROOT") or None


def _default_cache_dir() -> str:
    return os.environ.get("TSMD_CACHE_DIR", str(Path.home() / ".cache" / "tsmd_ray"))


@dataclass
class Config:
    # what to train
    method: str = _opt("tsmd", "student | fixed-teacher | tsmd | oracle", choices=METHODS)
    meta_algorithm: str = _opt("maml", "maml | reptile (paper Table 4)", choices=META_ALGORITHMS)
    dataset: str = _opt("omniglot", "dataset name")
    data_root: str | None = field(default_factory=_default_data_root, metadata={
        "help": "prepared dataset or raw release (default: $TSMD_DATA_ROOT)"})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={
        "help": "where raw releases are prepared to Arrow (default: $TSMD_CACHE_DIR or ~/.cache/tsmd_ray)"})
    teacher: str = _opt("resnet12", "teacher backbone: resnet12, conv4 or a torchvision model name")
    student: str = _opt("conv4", "student backbone: conv4, resnet12 or a torchvision model name")
    teacher_widths: list[int] | None = _opt(None, "teacher widths (default: the backbone's own)")
    student_widths: list[int] = _opt((32, 32, 32, 32), "student Conv-4 widths")
    teacher_weights: str | None = _opt(None, "local torchvision weights file for the teacher body")
    teacher_init: str | None = _opt(None, "pretrained teacher checkpoint to initialise psi")
    allow_random_teacher: bool = _opt(False, "let a fixed teacher start from random weights (tests only; "
                                      "a fixed teacher needs --teacher-init or --teacher-weights)")
    # task
    ways: int = _opt(5, "N classes per task")
    shots: int = _opt(1, "K support images per class")
    query: int = _opt(15, "query images per class")
    # inner loop (Eq. 6, 7)
    inner_steps: int = _opt(5, "inner gradient steps k while meta-training [paper: 5]")
    eval_inner_steps: int | None = _opt(None, "inner steps at meta-test (default: inner_steps)")
    alpha: float = _opt(0.1, "teacher inner learning rate (Eq. 6) [ours: the paper does not state it]")
    lam: float = _opt(0.1, "student inner learning rate (Eq. 7) [ours: the paper does not state it]")
    first_order_teacher: bool = _opt(False, "first-order meta-gradient for the teacher")
    first_order_student: bool = _opt(False, "first-order meta-gradient for the student")
    # knowledge distillation
    kd_loss: str = _opt("auto", "auto (kl for an adapted teacher, rkd for a fixed one [paper]) | kl | rkd",
                        choices=KD_LOSSES)
    kd_weight: float = _opt(1.0, "weight of L_KD in Eq. 7 [ours: the paper adds L_KD unweighted]")
    kd_temperature: float = _opt(4.0, "temperature of the KL loss [ours: Hinton et al.'s usual value]")
    rkd_distance_weight: float = _opt(25.0, "RKD distance term weight (Park et al.)")
    rkd_angle_weight: float = _opt(50.0, "RKD angle term weight (Park et al.)")
    learn_to_teach: bool = _opt(False, "beyond the paper: the student's query loss also trains psi")
    # outer loop (Eq. 10)
    beta: float = _opt(1e-5, "teacher outer learning rate (Adam, Eq. 10a) [paper: 1e-5]")
    eta: float = _opt(1e-3, "student outer learning rate (Adam, Eq. 10b) [paper: 1e-3]")
    meta_batch: int = _opt(8, "tasks per meta-iteration [ours]")
    iterations: int = _opt(300, "meta-iterations [ours]")
    augment: bool = _opt(True, "meta-training augmentation: crop, flip, colour jitter [paper]")
    seed: int = _opt(0, "seed of initial weights and of every task")
    # evaluation
    eval_every: int = _opt(100, "meta-validate every this many iterations (0: never)")
    val_episodes: int = _opt(100, "meta-validation episodes")
    patience: int = _opt(0, "early stopping: stop after this many meta-validations without a higher student "
                         "(oracle: teacher) accuracy and test the best-validated weights, kept in best.pt "
                         "(0: train every iteration, test the last weights)")
    test_episodes: int = _opt(800, "meta-test episodes [paper: 800]")
    batch_norm: str = _opt("support", "statistics that normalise query images: support (the adapted weights' "
                           "statistics on the support set, as the deployed student uses; MetaBN) | "
                           "transductive (the query batch's own, as in MAML's reference code)",
                           choices=BATCH_NORM)
    # numerics and devices
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = _opt("float32", "precision of the meta-gradient path", choices=DTYPES)
    allow_tf32: bool = _opt(False, "allow TF32 on GPUs (shifts second-order meta-gradients; off by default)")
    task_batching: str = _opt("auto", "auto (vmap on GPU, loop on CPU) | vmap | loop", choices=TASK_BATCHING)
    vmap_chunk: int = _opt(0, "tasks per vmap call (0: all tasks of the meta-batch at once)")
    # outputs
    out: str = _opt("runs/latest", "output directory (checkpoints, evaluation JSON)")
    checkpoint_every: int = _opt(50, "write a checkpoint every this many iterations")
    resume: bool = _opt(False, "resume from the latest checkpoint in --out")
    # distributed
    backend: str = _opt("ray", "ray | local (single process, no Ray)", choices=("ray", "local"))
    aggregation: str = _opt("driver", "with --backend ray: driver (actors return gradient sums to the driver) | "
                            "allreduce (Ray Train workers all-reduce them, gloo on CPU / NCCL on GPU)",
                            choices=("driver", "allreduce"))
    workers: int = _opt(0, "Ray worker actors (0: one per GPU (per --gpus-per-worker GPUs), else one per --threads-per-worker CPUs; at most --meta-batch)")
    gpus_per_worker: float = _opt(0.0, "GPUs per worker actor (fractions allowed; 0 on CPU clusters)")
    threads_per_worker: int = _opt(1, "torch threads per worker actor")
    # tracking
    mlflow: bool = _opt(True, "log to MLflow ($MLFLOW_TRACKING_URI or a local SQLite store)")
    experiment: str = _opt("tsmd-ray", "MLflow experiment name")
    run_name: str | None = _opt(None, "MLflow run name (default: method, dataset, task and a config digest)")
    system_metrics: bool = _opt(True, "log MLflow system metrics (CPU, memory, GPU) during training")
    profile: str | None = _opt(None, "the preset this configuration came from (set by make train)")

    def __post_init__(self) -> None:
        self.student_widths = list(self.student_widths)
        if self.teacher_widths is not None:
            self.teacher_widths = list(self.teacher_widths)
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def has_teacher(self) -> bool:
        return self.method != "student"

    @property
    def has_student(self) -> bool:
        return self.method != "oracle"

    @property
    def adapts_teacher(self) -> bool:
        """Eq. 6 and 10a run for tsmd and oracle; a fixed teacher is never updated."""
        return self.method in ("tsmd", "oracle")

    @property
    def resolved_kd_loss(self) -> str:
        if self.kd_loss != "auto":
            return self.kd_loss
        return "rkd" if self.method == "fixed-teacher" else "kl"

    @property
    def test_inner_steps(self) -> int:
        return self.eval_inner_steps if self.eval_inner_steps is not None else self.inner_steps

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        for name in ("ways", "shots", "query", "meta_batch", "iterations", "test_episodes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.ways < 2:
            raise ValueError(f"ways must be at least 2 for classification, got {self.ways}")
        for name in ("inner_steps", "eval_every", "val_episodes", "checkpoint_every", "workers", "vmap_chunk",
                     "patience"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)}")
        if self.eval_inner_steps is not None and self.eval_inner_steps < 0:
            raise ValueError(f"eval_inner_steps must be zero or positive, got {self.eval_inner_steps}")
        for name in ("alpha", "beta", "lam", "eta", "kd_temperature"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        for name in ("kd_weight", "rkd_distance_weight", "rkd_angle_weight", "gpus_per_worker"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be zero or a positive finite number, got {value}")
        if self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be at least 1, got {self.threads_per_worker}")
        if self.meta_algorithm == "reptile" and self.inner_steps < 1:
            raise ValueError("reptile needs inner_steps >= 1")
        if self.patience and not (self.eval_every and self.val_episodes):
            raise ValueError(f"patience={self.patience} needs meta-validation: set eval_every and val_episodes above 0")
        self._validate_teacher()
        if self.aggregation == "allreduce" and self.backend != "ray":
            raise ValueError(f"aggregation=allreduce needs backend=ray, got backend={self.backend!r}")
        if self.aggregation == "allreduce" and self.workers > self.meta_batch:
            raise ValueError(f"aggregation=allreduce needs workers <= meta_batch (every worker takes at least "
                             f"one task), got workers={self.workers}, meta_batch={self.meta_batch}")

    def _validate_teacher(self) -> None:
        """A fixed teacher is never trained here: its body must come from somewhere, its head is random."""
        if self.method != "fixed-teacher":
            return
        if not (self.teacher_init or self.teacher_weights or self.allow_random_teacher):
            raise ValueError("method=fixed-teacher needs a trained teacher: pass --teacher-init (a "
                             "tsmd_ray.pretrain checkpoint) or --teacher-weights (a torchvision weights file)")
        if self.resolved_kd_loss == "kl":
            raise ValueError("kd_loss=kl with method=fixed-teacher distils from a head that is never trained "
                             "(its N-way head is random); use kd_loss rkd or method tsmd")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        known = {f.name for f in fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration key(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any], **overrides: Any) -> "Config":
        """The config stored in a checkpoint, for loading its weights: the server's local weight files
        are dropped (psi is in the checkpoint) and nothing resumes."""
        return cls.from_dict({**data, "teacher_weights": None, "teacher_init": None, "allow_random_teacher": True,
                              "resume": False, **overrides})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        return cls.from_dict(load_yaml(path))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return data


# ---------------------------------------------------------------------- command line
def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class BoolFlag(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag`` as users type them, and ``--flag false`` as YAML-minded users do."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.nargs = "?"
        self.metavar = "BOOL"

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        negated = option_string.startswith("--no-")
        if negated and values is not None:
            parser.error(f"{option_string} takes no value")
        try:
            value = True if values is None else _parse_bool(values)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument {option_string}: {exc}")
        setattr(namespace, self.dest, value != negated)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _field_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
    if "list[int]" in kind:
        kwargs.update(type=int, nargs="+")
    elif kind.startswith("bool"):
        kwargs["action"] = BoolFlag
    elif kind.startswith("int"):
        kwargs["type"] = int
    elif kind.startswith("float"):
        kwargs["type"] = float
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per Config field to ``parser``."""
    parser.add_argument("--config", help="YAML file with Config keys (flags override it)")
    group = parser.add_argument_group("configuration")
    for f in fields(Config):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_field_kwargs(f))


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then ``--config`` file, then explicit flags."""
    data: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in fields(Config)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    return Config.from_dict(data)

