"""The one configuration of tsmd-ray: a dataclass, its validation, and the YAML files that hold it.

A YAML file holds the field names with underscores (or dashes); ``tsmd_ray.flags`` turns the same
fields into command-line flags (``--inner-steps``), which win over the file, which wins over the
defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import RequestError

METHODS = ("student", "fixed-teacher", "tsmd", "oracle")
META_ALGORITHMS = ("maml", "reptile")
KD_LOSSES = ("auto", "kl", "rkd")
TASK_BATCHING = ("auto", "vmap", "loop")
DTYPES = ("float32", "float64")
BATCH_NORM = ("support", "transductive")
# keys that only the teacher, only the student, or only distillation use (Config.inert_keys)
TEACHER_KEYS = frozenset({"teacher", "teacher_widths", "teacher_weights", "teacher_init", "alpha", "beta",
                          "first_order_teacher", "learn_to_teach"})
STUDENT_KEYS = frozenset({"student", "student_widths", "lam", "eta", "first_order_student", "learn_to_teach"})
KD_KEYS = frozenset({"kd_loss", "kd_weight", "kd_temperature", "rkd_distance_weight", "rkd_angle_weight",
                     "kd_views"})


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
    kd_views: int = _opt(0, "beyond the paper: augmented views of each support image that the adapted teacher "
                         "labels for the student's L_KD (Eq. 7), in training, evaluation and tsmd_ray.adapt (method "
                         "student: the views take the labels, a control); "
                         "L_KD averages over the 1 + K rows of each image (0: the support images alone, as the "
                         "paper; at most 16)")
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
        _coerce(self)
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

    @property
    def inert_keys(self) -> frozenset[str]:
        """Keys that change nothing with this method and KD loss (a sweep searching them is wasted)."""
        keys = set()
        if not self.has_teacher:  # a student's kd_views take the labels, weighted by kd_weight
            keys |= TEACHER_KEYS | KD_KEYS - ({"kd_views"} | ({"kd_weight"} if self.kd_views else set()))
        if not self.has_student:
            keys |= STUDENT_KEYS | KD_KEYS
        if not self.adapts_teacher:
            keys |= {"alpha", "beta", "first_order_teacher"}
        if self.method != "tsmd":
            keys.add("learn_to_teach")
        keys |= {"kd_temperature"} if self.resolved_kd_loss == "rkd" else {"rkd_distance_weight", "rkd_angle_weight"}
        return frozenset(keys)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`~tsmd_ray.errors.RequestError` naming the first invalid setting (or
        combination) and the accepted range; every rule is listed in docs/errors.md."""
        for check in (_check_types, _check_choices, _check_ranges, _check_validation, _check_workers,
                      _check_teacher, _check_kd):
            check(self)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        # a null path stands for its default ($TSMD_DATA_ROOT, $TSMD_CACHE_DIR), as an absent one does
        data = {k: v for k, v in data.items() if v is not None or k not in ("data_root", "cache_dir")}
        unknown = sorted(set(data) - CONFIG_KEYS)
        if unknown:
            raise RequestError("config.unknown-key", f"unknown configuration key(s): {', '.join(unknown)}"
                                                     f"{did_you_mean(unknown[0], CONFIG_KEYS)}; see --help")
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


# ---------------------------------------------------------------------- validation rules
def _kind(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _coerce(cfg: Config) -> None:
    """Widths as lists; numbers for float keys (YAML 1.1 reads ``1e-5`` as a string)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, tuple):
            setattr(cfg, f.name, list(value))
        elif _kind(f) == "float" and not isinstance(value, bool) and isinstance(value, (int, str)):
            try:
                setattr(cfg, f.name, float(value))
            except ValueError:
                pass  # _check_types names it


def _type_ok(kind: str, value: Any) -> bool:
    if value is None:
        return kind.endswith("| None")
    kind = kind.removesuffix(" | None")
    if kind == "list[int]":
        return isinstance(value, list) and bool(value) and all(_type_ok("int", v) and v > 0 for v in value)
    expected = {"bool": bool, "int": int, "float": float, "str": str}[kind]
    return isinstance(value, expected) and (kind == "bool" or not isinstance(value, bool))


_TYPE_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
               "list[int]": "a non-empty list of positive integers"}


def _check_types(cfg: Config) -> None:
    for f in fields(cfg):
        kind, value = _kind(f), getattr(cfg, f.name)
        if not _type_ok(kind, value):
            accepted = _TYPE_NAMES[kind.removesuffix(" | None")] + (" or null" if kind.endswith("| None") else "")
            raise RequestError("config.type", f"{f.name} must be {accepted}, got {value!r}")


def _check_choices(cfg: Config) -> None:
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise RequestError("config.choice", f"{f.name}={getattr(cfg, f.name)!r} is not one of {', '.join(choices)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise RequestError("config.choice", f"device={cfg.device!r} is not one of auto, cpu, cuda, cuda:N")


# lowest accepted value of integer keys, and how the message states it
_MINIMA = {"ways": (2, "at least 2 for classification"), "threads_per_worker": (1, "at least 1"),
           **{k: (1, "a positive integer") for k in ("shots", "query", "meta_batch", "iterations", "test_episodes",
                                                     "checkpoint_every")},
           **{k: (0, "zero or positive") for k in ("inner_steps", "eval_inner_steps", "eval_every", "val_episodes",
                                                   "workers", "vmap_chunk", "patience", "kd_views")}}
_POSITIVE = ("alpha", "beta", "lam", "eta", "kd_temperature")
_NON_NEGATIVE = ("kd_weight", "rkd_distance_weight", "rkd_angle_weight", "gpus_per_worker")


def _check_ranges(cfg: Config) -> None:
    for name, (low, accepted) in _MINIMA.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise RequestError("config.range", f"{name} must be {accepted}, got {value}")
    for names, accepted, ok in ((_POSITIVE, "a positive finite number", lambda v: v > 0),
                                (_NON_NEGATIVE, "zero or a positive finite number", lambda v: v >= 0)):
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and ok(value)):
                raise RequestError("config.range", f"{name} must be {accepted}, got {value}")
    if cfg.meta_algorithm == "reptile" and cfg.inner_steps < 1:
        raise RequestError("config.reptile-steps", f"inner_steps must be at least 1 with meta_algorithm=reptile, "
                                                   f"got {cfg.inner_steps}")


def _check_validation(cfg: Config) -> None:
    """Early stopping needs meta-validations that happen."""
    if cfg.patience and not (1 <= cfg.eval_every <= cfg.iterations and cfg.val_episodes):
        raise RequestError("config.patience", f"patience={cfg.patience} needs meta-validation: eval_every must be "
                           f"between 1 and iterations ({cfg.iterations}) and val_episodes at least 1, got "
                           f"eval_every={cfg.eval_every}, val_episodes={cfg.val_episodes}")


def _check_workers(cfg: Config) -> None:
    """Task batching, aggregation and devices against the meta-batch and each other."""
    if cfg.vmap_chunk > cfg.meta_batch:
        raise RequestError("config.vmap-chunk", f"vmap_chunk must be between 0 (all tasks at once) and meta_batch "
                           f"({cfg.meta_batch}), got {cfg.vmap_chunk}")
    if cfg.gpus_per_worker and cfg.device == "cpu":
        raise RequestError("config.gpus-on-cpu", f"gpus_per_worker must be 0 with device=cpu, "
                           f"got {cfg.gpus_per_worker}")
    if cfg.aggregation == "allreduce" and cfg.backend != "ray":
        raise RequestError("config.allreduce", f"aggregation=allreduce needs backend=ray, got backend={cfg.backend!r}")
    if cfg.aggregation == "allreduce" and cfg.workers > cfg.meta_batch:
        raise RequestError("config.allreduce", f"aggregation=allreduce needs workers <= meta_batch (every worker "
                           f"takes at least one task): accepted 0 to {cfg.meta_batch}, got workers={cfg.workers}")


def _check_teacher(cfg: Config) -> None:
    """A fixed teacher is never trained here: its body must come from somewhere, its head is random."""
    if cfg.method != "fixed-teacher":
        return
    if not (cfg.teacher_init or cfg.teacher_weights or cfg.allow_random_teacher):
        raise RequestError("config.fixed-teacher", "method=fixed-teacher needs a trained teacher: pass --teacher-init "
                           "(a tsmd_ray.pretrain checkpoint) or --teacher-weights (a torchvision weights file)")
    if cfg.resolved_kd_loss == "kl":
        raise RequestError("config.fixed-teacher", "kd_loss=kl with method=fixed-teacher distils from a head that is "
                           "never trained (its N-way head is random); use kd_loss rkd or method tsmd")


MAX_KD_VIEWS = 16


def _check_kd(cfg: Config) -> None:
    """Learning to teach sends the student's query loss to psi through L_KD: tsmd with KD only.
    KD views are labelled by the teacher for the student's L_KD: a method with both, and KD."""
    if cfg.learn_to_teach and (cfg.method != "tsmd" or not cfg.kd_weight):
        raise RequestError("config.learn-to-teach", f"learn_to_teach needs method=tsmd and kd_weight > 0, got "
                           f"method={cfg.method!r}, kd_weight={cfg.kd_weight}")
    if cfg.kd_views > MAX_KD_VIEWS:
        raise RequestError("config.kd-views", f"kd_views must be at most {MAX_KD_VIEWS} (each view is one more "
                           f"support-sized batch through both models at every inner step), got {cfg.kd_views}")
    if cfg.kd_views and (cfg.method == "oracle" or not cfg.kd_weight):
        raise RequestError("config.kd-views", f"kd_views needs a student (tsmd, fixed-teacher, or student, whose "
                           f"views take the labels) and kd_weight > 0, got "
                           f"kd_views={cfg.kd_views}, method={cfg.method!r}, kd_weight={cfg.kd_weight}")


CONFIG_KEYS = frozenset(f.name for f in fields(Config))
# keys that say where and how a run computes or logs, never what it computes
RUNTIME_KEYS = frozenset({"resume", "out", "backend", "aggregation", "workers", "gpus_per_worker", "threads_per_worker",
                          "mlflow", "experiment", "run_name", "system_metrics", "profile", "device", "data_root",
                          "cache_dir", "task_batching", "vmap_chunk"})
# keys a resumed run may change without leaving its trajectory: when it ends, how it is measured,
# and the teacher's starting file (psi comes from the checkpoint)
RESUMABLE_KEYS = RUNTIME_KEYS | {"iterations", "patience", "eval_every", "val_episodes", "test_episodes",
                                 "eval_inner_steps", "checkpoint_every", "teacher_init", "teacher_weights"}
_DEFAULTS = {f.name: f.default for f in fields(Config) if f.default is not dataclasses.MISSING}


def changed_keys(saved: dict[str, Any], cfg: Config, ignore: frozenset[str] = RUNTIME_KEYS) -> list[str]:
    """The keys, outside ``ignore``, whose value in ``cfg`` differs from ``saved`` (a config.yaml or a
    checkpoint's config; a key it lacks, written before the key existed, stands for its default)."""
    wanted = cfg.to_dict()
    return sorted(k for k in wanted if k not in ignore and saved.get(k, _DEFAULTS.get(k)) != wanted[k])


def did_you_mean(name: str, known: Any) -> str:
    """The hint ` (did you mean KEY?)` naming the known key closest to ``name``, or an empty string."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds; a missing file, bad YAML or another value is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise RequestError("file.yaml", f"{path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RequestError("file.yaml", f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data
