"""Arrow IPC storage of a prepared few-shot dataset (contract: docs/design.md, docs/data.md)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .errors import DataError, DatasetFormatError, SplitError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGES_FILE = "images.arrow"
META_FILE = "meta.json"
_STATS_CHUNK = 4096

Record = tuple[str, str, np.ndarray]


# ----------------------------------------------------------------------------------------- writing


@dataclass
class _Collected:
    images: np.ndarray  # (N, H, W, C) uint8, rows sorted by label
    labels: np.ndarray  # (N,) int32
    class_names: list[str]  # by label
    class_splits: list[str]  # by label


def write_dataset(
    out_dir: str | os.PathLike,
    name: str,
    records: Iterable[Record],
    preprocess: Mapping[str, Any],
    splits: Mapping[str, Sequence[str]],
    source: Any,
) -> Path:
    """Write ``images.arrow`` + ``meta.json`` into ``out_dir`` atomically and return ``out_dir``.

    ``records`` yields ``(class_name, split, image_uint8_HWC)``; ``splits`` maps each split to its
    class names, which fixes the dense labels (train classes first, then val, then test, each in the
    given order). Missing ``mean``/``std`` in ``preprocess`` are computed over the train split.
    Files are written into a temp dir beside ``out_dir`` and renamed into place; on any error the
    temp dir is removed. An existing dataset at ``out_dir`` is replaced; any other non-empty
    directory there raises ``FileExistsError``.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        data = _collect(records, splits)
        preprocess = _with_stats(preprocess, data)
        _write_images(tmp / IMAGES_FILE, data)
        meta = _meta(name, data, preprocess, source)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d images, %d classes", out_dir, len(data.labels), len(data.class_names))
    return out_dir


def _check_replaceable(out_dir: Path) -> None:
    foreign = out_dir.exists() and not (out_dir / META_FILE).exists()
    if foreign and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not a prepared dataset; refusing to replace it")


def _label_table(splits: Mapping[str, Sequence[str]]) -> tuple[list[str], list[str]]:
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise SplitError(f"unknown split(s) {sorted(unknown)}; allowed: {list(SPLITS)}")
    names: list[str] = []
    owners: list[str] = []
    for split in SPLITS:
        names += splits.get(split, [])
        owners += [split] * len(splits.get(split, []))
    if len(set(names)) != len(names):
        raise SplitError("a class name is listed more than once in splits")
    return names, owners


def _collect(records: Iterable[Record], splits: Mapping[str, Sequence[str]]) -> _Collected:
    names, owners = _label_table(splits)
    label_of = {name: i for i, name in enumerate(names)}
    per_label: list[list[np.ndarray]] = [[] for _ in names]
    shape = None
    for class_name, split, image in records:
        label = label_of.get(class_name)
        if label is None or owners[label] != split:
            raise SplitError(f"record of class {class_name!r} in split {split!r} does not match `splits`")
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3:
            raise DataError(
                f"image of class {class_name!r}: expected uint8 HWC, got {image.dtype} {image.shape}"
            )
        shape = shape or image.shape
        if image.shape != shape:
            raise DataError(f"image of class {class_name!r} has shape {image.shape}, expected {shape}")
        per_label[label].append(image)
    empty = [name for name, images in zip(names, per_label, strict=True) if not images]
    if empty:
        raise DataError(f"{len(empty)} class(es) without images, e.g. {empty[:3]}")
    counts = [len(images) for images in per_label]
    labels = np.repeat(np.arange(len(names), dtype=np.int32), counts)
    images = np.stack([image for group in per_label for image in group])
    return _Collected(images, labels, names, owners)


def _with_stats(preprocess: Mapping[str, Any], data: _Collected) -> dict[str, Any]:
    out = dict(preprocess)
    if "mean" in out and "std" in out:
        return out
    train_rows = int(np.sum(data.labels < data.class_splits.count("train")))  # train labels come first
    if train_rows == 0:
        raise DataError("cannot compute mean/std: the train split has no images")
    out["mean"], out["std"] = channel_stats(data.images[:train_rows])
    return out


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC ``images`` scaled to [0, 1] (chunked, float64)."""
    channels = images.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(images), _STATS_CHUNK):
        x = images[start : start + _STATS_CHUNK].reshape(-1, channels).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
    count = images.size / channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def _schema(row_bytes: int) -> pa.Schema:
    return pa.schema(
        [
            ("image", pa.binary(row_bytes)),
            ("label", pa.int32()),
            ("class_name", pa.string()),
            ("split", pa.string()),
        ]
    )


def _write_images(path: Path, data: _Collected) -> None:
    n = len(data.labels)
    row_bytes = data.images[0].size
    schema = _schema(row_bytes)
    flat = pa.py_buffer(np.ascontiguousarray(data.images))
    labels = pa.array(data.labels, pa.int32())
    columns = [
        pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, flat]),
        labels,
        pa.array(data.class_names, pa.string()).take(labels),
        pa.array(data.class_splits, pa.string()).take(labels),
    ]
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch(columns, schema=schema))


def _meta(name: str, data: _Collected, preprocess: dict[str, Any], source: Any) -> dict[str, Any]:
    _, height, width, channels = data.images.shape
    pairs = list(zip(data.class_names, data.class_splits, strict=True))
    splits = {split: [name for name, owner in pairs if owner == split] for split in SPLITS}
    return {
        "name": name,
        "format_version": FORMAT_VERSION,
        "height": height,
        "width": width,
        "channels": channels,
        "preprocess": preprocess,
        "splits": {s: names for s, names in splits.items() if names},
        "source": source,
    }


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    try:
        os.replace(tmp, out_dir)  # succeeds when out_dir is absent or empty
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    log.warning("replacing existing dataset at %s", out_dir)
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, trash / out_dir.name)
    os.replace(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------- reading


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
