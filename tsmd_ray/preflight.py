"""A request checked against this machine before anything starts (no Ray, no MLflow run, no output):
local files, the prepared dataset and its splits, the models, and the resources of the Ray
cluster a run would start. Every refusal is a :class:`~tsmd_ray.errors.RequestError` (docs/errors.md).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import Config
from .errors import RequestError

REMOTE_PREFIXES = ("s3://", "gs://")


def check_file(key: str, value: str | None) -> None:
    """``value`` of ``key`` names an existing local file (remote URIs are not checked)."""
    if value and not str(value).startswith(REMOTE_PREFIXES) and not Path(value).expanduser().is_file():
        raise RequestError("file.missing", f"{key}={value!r}: no such file; accepted: an existing file")


def _writable(path: Path) -> bool:
    """``path`` can be created: its nearest existing ancestor is a folder."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return existing == path or existing.is_dir()


def check_out_dir(key: str, value: str | Path) -> None:
    """``value`` of ``key`` can be an output folder (a folder, or created with its parents)."""
    path = Path(value).expanduser()
    if (path.exists() and not path.is_dir()) or not _writable(path):
        raise RequestError("file.out", f"{key}={str(value)!r} is a file or lies in one; accepted: a folder "
                           "(created if missing)")


def check_out_file(key: str, value: str | Path | None) -> None:
    """``value`` of ``key`` can be written as a file (not a folder; its folders are created)."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.is_dir() or not _writable(path):
        raise RequestError("file.out", f"{key}={str(value)!r} is a folder or lies in a file; accepted: a file "
                           "path (its folders are created)")


def check_minimum(key: str, value: int | None, low: int) -> None:
    """A command-line number ``key`` of at least ``low`` (``None``: not given)."""
    if value is not None and value < low:
        raise RequestError("args.range", f"{key} must be at least {low}, got {value}")


def resolve_data(cfg: Config | argparse.Namespace) -> str:
    """The prepared dataset of ``cfg`` (its ``dataset``, ``data_root`` and ``cache_dir``; prepared
    from a raw release if needed); a refusal names ``dataset`` and ``data_root``."""
    from .data import DataError, resolve_dataset

    try:
        return str(resolve_dataset(cfg.dataset, cfg.data_root, cfg.cache_dir))
    except (DataError, FileNotFoundError) as exc:
        raise RequestError("data", f"dataset={cfg.dataset!r} with data_root={cfg.data_root!r}: {exc}") from None


def check_splits(cfg: Config, dataset: Any, splits: Sequence[str]) -> None:
    """Each split in ``splits`` has ``ways`` classes of ``shots + query`` images (the samplers'
    own checks, whose messages name ``ways`` and ``shots+query``)."""
    from .data import EpisodeSampler

    for split in splits:
        EpisodeSampler(dataset, split, cfg.ways, cfg.shots, cfg.query, cfg.seed)


def check_models(cfg: Config, dataset: Any) -> None:
    """The teacher and student of ``cfg`` can be built for the dataset's images (names, widths,
    weight files), on the CPU, as the trainer will build them."""
    from .engine import DataSpec, build_models

    spec = DataSpec.of(dataset)
    try:
        build_models(cfg, spec)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        models = ", ".join(f"{role}={getattr(cfg, role)!r}" for role, used in
                           (("teacher", cfg.has_teacher), ("student", cfg.has_student)) if used)
        raise RequestError("config.models", f"{models} cannot be built for {spec.image_size}x{spec.image_size} "
                           f"{spec.in_channels}-channel images: {exc}") from None


def local_ray_resources() -> dict[str, float] | None:
    """CPUs and GPUs of the Ray cluster this process is connected to, or of the local instance
    that ``ray.init()`` would start here; ``None`` when it would join a cluster it is not connected
    to yet (``RAY_ADDRESS``, ``ray start``)."""
    import ray

    if ray.is_initialized():
        return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    if os.environ.get("RAY_ADDRESS"):
        return None
    try:
        from ray._private.utils import get_num_cpus, read_ray_address

        if read_ray_address(None):
            return None
        cpus = float(get_num_cpus())
    except (ImportError, AttributeError):  # Ray's internals moved: leave the check to Ray
        return None
    import torch

    return {"CPU": cpus, "GPU": float(torch.cuda.device_count())}


def check_fits(need: Mapping[str, tuple[float, str]]) -> None:
    """Each ``{resource: (amount, the keys that ask for it)}`` fits the Ray cluster of
    :func:`local_ray_resources`."""
    have = local_ray_resources()
    if have is None:
        return
    for resource, (amount, what) in need.items():
        if amount > have.get(resource, 0.0):
            raise RequestError("resources", f"{what} = {amount:g} {resource}s, but the Ray cluster has "
                               f"{have.get(resource, 0.0):g}; accepted: at most {have.get(resource, 0.0):g} "
                               "(or join a larger cluster with RAY_ADDRESS)")


def check_workers(cfg: Config) -> None:
    """Ray worker actors (or Ray Train workers) of ``cfg`` against the Ray cluster's resources."""
    if cfg.backend != "ray":
        return
    workers = cfg.workers or 1
    check_fits({"CPU": (workers * cfg.threads_per_worker,
                        f"workers x threads_per_worker ({workers} x {cfg.threads_per_worker})"),
                "GPU": (workers * cfg.gpus_per_worker,
                        f"workers x gpus_per_worker ({workers} x {cfg.gpus_per_worker:g})")})


def check_torch_device(key: str, name: str) -> None:
    """``name`` (auto, cpu, cuda, cuda:N) is a device this process can use."""
    if not name.startswith("cuda"):
        if name not in ("auto", "cpu"):
            raise RequestError("config.choice", f"{key}={name!r} is not one of auto, cpu, cuda, cuda:N")
        return
    import torch

    index = name.partition(":")[2]
    if not (index.isdigit() or not index) or int(index or 0) >= torch.cuda.device_count():
        raise RequestError("resources", f"{key}={name!r} but torch sees {torch.cuda.device_count()} CUDA "
                           "device(s) here; accepted: auto or cpu")


def check_device(cfg: Config) -> None:
    """A CUDA device asked for where this process computes (``--backend local``)."""
    if cfg.backend == "local":
        check_torch_device("device", cfg.device)


def check_training(cfg: Config, dataset_path: str | Path | None = None) -> str:
    """Everything a training run of ``cfg`` needs, before it starts; returns the prepared dataset
    (resolved, and prepared from a raw release if needed, unless ``dataset_path`` is given)."""
    from .data import ArrowFewShotDataset

    check_file("teacher_init", cfg.teacher_init)
    check_file("teacher_weights", cfg.teacher_weights)
    check_out_dir("out", cfg.out)
    check_device(cfg)
    check_workers(cfg)
    path = str(dataset_path or resolve_data(cfg))
    dataset = ArrowFewShotDataset(path)
    splits = ["train", "test"] + (["val"] if cfg.eval_every and cfg.val_episodes else [])
    check_splits(cfg, dataset, splits)
    check_models(cfg, dataset)
    return path
