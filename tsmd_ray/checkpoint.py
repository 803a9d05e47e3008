"""Checkpoints: state dicts plus the config, written atomically, loaded with ``weights_only``."""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible version."""


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; keep the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, hex (to record which teacher file a run started from)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Save ``payload`` (tensors, numbers, strings, lists, dicts) atomically."""
    return atomic_write(path, lambda tmp: torch.save({"format_version": FORMAT_VERSION, **payload}, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (no arbitrary unpickling).

    Anything else (a text file, a truncated copy, a pickle of Python objects, a bare state dict)
    raises :class:`CheckpointError` with one line that names the file and what it is.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a tsmd-ray checkpoint: it holds no format_version (weights "
                              "written by tsmd_ray.pretrain are passed to training as --teacher-init)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload['format_version']!r}; this "
                              f"tsmd-ray reads version {FORMAT_VERSION}")
    return payload


def read_torch_file(path: Path, kind: str = "tsmd-ray checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``, or a :class:`CheckpointError` saying in one line why
    ``path`` is not a ``kind`` (instead of torch's unpickler advice)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a {kind}: not a complete file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is not a {kind}: it holds Python objects other than tensors and plain "
                              "values (not loaded: unpickling them could run any code)") from exc
    except Exception as exc:  # torch raises several types for damaged archives
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is not a readable {kind}: {reason}") from exc
