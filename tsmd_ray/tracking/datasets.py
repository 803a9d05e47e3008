"""The prepared dataset a run read, as an MLflow dataset input (the UI's Dataset column).

The digest covers every file of the prepared directory (the Arrow files, ``meta.json``, a split
file, ...), read in chunks; it is kept in the run file and reused while the files' sizes and
modification times stay the same (a resumed run, a sweep's trials).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .store import log, short_error

CONTEXT = "training"  # mlflow.data.context of the input: the run meta-trains (and evaluates) on it
SPLIT_ROLES = {"train": "meta-train", "val": "meta-validation", "test": "meta-test"}
_DIGEST_CHARS = 12


def dataset_files(path: Path) -> list[Path]:
    """The files that define a prepared dataset: every regular, non-hidden file of its directory."""
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def _stats(files: list[Path]) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(f"{path.name}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\0".encode())
    return digest.hexdigest()[:_DIGEST_CHARS]


def _profile(meta: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    shape = [meta[k] for k in ("height", "width", "channels") if k in meta]
    return {"files": {p.name: p.stat().st_size for p in files}, "image_shape": shape,
            "classes": {split: len(names) for split, names in meta.get("splits", {}).items()},
            "raw_source": meta.get("source")}


def dataset_info(path: str | Path, cached: dict[str, Any] | None = None) -> dict[str, Any]:
    """Name, digest, source and profile of the prepared dataset at ``path``; ``cached`` (an
    earlier result) is returned as it is when the files have not changed since."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"prepared dataset {path} is not a directory")
    files = dataset_files(path)
    if not files:
        raise FileNotFoundError(f"prepared dataset {path} holds no files")
    stats = _stats(files)
    if cached and cached.get("source") == str(path) and cached.get("stats") == stats:
        return cached
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
    return {"name": meta.get("name") or path.name, "digest": _digest(files), "source": str(path), "stats": stats,
            "profile": _profile(meta, files)}


def split_description(info: dict[str, Any]) -> str:
    """``meta-train: train (163 classes); meta-validation: val (40 classes); ...``."""
    classes = info["profile"].get("classes", {})
    return "; ".join(f"{role}: {split}" + (f" ({classes[split]} classes)" if split in classes else "")
                     for split, role in SPLIT_ROLES.items())


def dataset_input(info: dict[str, Any]) -> Any:
    """``info`` as an MLflow ``DatasetInput``: a local source, the profile, the splits' roles."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=info["name"], digest=info["digest"], source_type="local",
                      source=json.dumps({"uri": info["source"]}), profile=json.dumps(info["profile"]))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXT),
                                       InputTag("tsmd.splits", split_description(info))])


def try_dataset_info(path: str | Path | None, cached: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """:func:`dataset_info`, or ``None`` with a warning (a run is never stopped by its digest)."""
    if path is None:
        return None
    try:
        return dataset_info(path, cached)
    except (OSError, ValueError) as exc:
        log.warning("the dataset input is not logged: %s", short_error(exc))
        return None
