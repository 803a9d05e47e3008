"""Arrow IPC storage of a prepared few-shot dataset: the format and its memory-mapped reader.

Contract: docs/design.md, docs/data.md; writing is in ``arrow_write.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .errors import DatasetFormatError, SplitError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGES_FILE = "images.arrow"
META_FILE = "meta.json"


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``meta.json`` of the prepared dataset directory ``path``."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise DatasetFormatError(f"{path} is not a prepared dataset: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"cannot read {meta_path}: {exc}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{meta_path} has format_version {version!r}, this tsmd_ray reads version {FORMAT_VERSION}; "
            "prepare the dataset again (python -m tsmd_ray.data prepare ...)"
        )
    missing = {"name", "height", "width", "channels", "preprocess", "splits"} - set(meta)
    if missing:
        raise DatasetFormatError(f"{meta_path} lacks keys {sorted(missing)}")
    return meta


@dataclass
class _Mapped:
    batch: pa.RecordBatch  # keeps the memory map alive
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    class_splits: list[str]
    ranges: np.ndarray  # (num_classes, 2) start, stop


def _open_images(path: Path, meta: Mapping[str, Any]) -> _Mapped:
    file = path / IMAGES_FILE
    shape = (int(meta["height"]), int(meta["width"]), int(meta["channels"]))
    reader = ipc.open_file(pa.memory_map(str(file), "r"))
    image_type = reader.schema.field("image").type
    if image_type != pa.binary(int(np.prod(shape))) or reader.num_record_batches != 1:
        raise DatasetFormatError(f"{file}: expected one record batch of {pa.binary(int(np.prod(shape)))}")
    batch = reader.get_batch(0)
    column = batch.column("image")
    images = np.frombuffer(column.buffers()[1], np.uint8, len(batch) * column.type.byte_width)
    labels = batch.column("label").to_numpy(zero_copy_only=True)
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    run_labels = labels[starts]
    if not np.array_equal(np.sort(run_labels), np.arange(len(run_labels))):
        raise DatasetFormatError(f"{file}: labels are not dense or a class is not a contiguous block of rows")
    order = np.argsort(run_labels)
    ranges = np.stack([starts, np.r_[starts[1:], len(labels)]], axis=1)[order]
    first_rows = pa.array(ranges[:, 0])
    return _Mapped(
        batch=batch,
        images=images.reshape((len(batch), *shape)),
        labels=labels,
        class_names=batch.column("class_name").take(first_rows).to_pylist(),
        class_splits=batch.column("split").take(first_rows).to_pylist(),
        ranges=ranges,
    )


class ArrowFewShotDataset:
    """Read-only, memory-mapped prepared dataset. Pickles as its path and reopens lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._meta: dict[str, Any] | None = read_meta(self.path)  # fail early
        self._mapped: _Mapped | None = None

    def __getstate__(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.path = Path(state["path"])
        self._meta = None
        self._mapped = None

    def __repr__(self) -> str:
        return f"ArrowFewShotDataset({str(self.path)!r})"

    @property
    def meta(self) -> dict[str, Any]:
        """Parsed ``meta.json``."""
        if self._meta is None:
            self._meta = read_meta(self.path)
        return self._meta

    @property
    def _data(self) -> _Mapped:
        if self._mapped is None:
            self._mapped = _open_images(self.path, self.meta)
        return self._mapped

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Stored image shape ``(H, W, C)``."""
        return int(self.meta["height"]), int(self.meta["width"]), int(self.meta["channels"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.meta["preprocess"]

    @property
    def images(self) -> np.ndarray:
        """Zero-copy, read-only uint8 view ``(N, H, W, C)`` of the memory-mapped file."""
        return self._data.images

    @property
    def labels(self) -> np.ndarray:
        """Dense int32 class label of every row."""
        return self._data.labels

    @property
    def class_names(self) -> list[str]:
        """Class name of every label."""
        return self._data.class_names

    @property
    def class_ranges(self) -> np.ndarray:
        """``(num_classes, 2)`` array of ``[start, stop)`` row ranges, indexed by label."""
        return self._data.ranges

    @property
    def splits(self) -> dict[str, list[int]]:
        """Labels of each split present in the file."""
        out: dict[str, list[int]] = {}
        for label, split in enumerate(self._data.class_splits):
            out.setdefault(split, []).append(label)
        return out

    def split_labels(self, split: str) -> np.ndarray:
        """Labels of the classes in ``split`` (empty if absent; ``SplitError`` if not a split name)."""
        if split not in SPLITS:
            raise SplitError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return np.asarray(self.splits.get(split, []), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)
