"""Writing a prepared dataset (``images.arrow`` + ``meta.json``, format: ``arrow.py``) atomically.

Records are spilled to a raw file as they arrive and copied into an Arrow file laid out beforehand,
so memory does not grow with the number of images.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import shutil
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .arrow import FORMAT_VERSION, IMAGES_FILE, META_FILE, SPLITS
from .errors import DataError, DatasetFormatError, SplitError

log = logging.getLogger(__name__)

SPILL_FILE = "images.spill"  # raw pixels in arrival order, removed once images.arrow is written
_CHUNK_BYTES = 1 << 20  # pixels read back from the spill file at a time

Record = tuple[str, str, np.ndarray]
ExtraFiles = Callable[[dict[str, Any]], Mapping[str, str]]


@dataclass
class _Spilled:
    """Records written in arrival order to a raw file; ``order`` lists its rows in label order."""

    path: Path
    row_shape: tuple[int, int, int]
    order: np.ndarray  # (N,) rows of the raw file, sorted by label (rows of left-out classes dropped)
    labels: np.ndarray  # (N,) int32 label of each row of ``order``
    class_names: list[str]  # by label
    class_splits: list[str]  # by label

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape))

    def chunks(self, stop: int | None = None) -> Iterator[np.ndarray]:
        """Images ``(n, H, W, C)`` of rows ``[0, stop)`` in label order, about ``_CHUNK_BYTES`` at a time."""
        rows = self.order[:stop]
        step = max(1, _CHUNK_BYTES // self.row_bytes)
        with open(self.path, "rb") as raw:
            for start in range(0, len(rows), step):
                yield _read_rows(raw, rows[start : start + step], self.row_bytes).reshape(-1, *self.row_shape)


def write_dataset(
    out_dir: str | os.PathLike,
    name: str,
    records: Iterable[Record],
    preprocess: Mapping[str, Any],
    splits: Mapping[str, Sequence[str]],
    source: Any,
    *,
    min_images: int | None = None,
    sampling: Mapping[str, Any] | None = None,
    extra_files: ExtraFiles | None = None,
) -> Path:
    """Write ``images.arrow`` + ``meta.json`` into ``out_dir`` atomically and return ``out_dir``.

    ``records`` yields ``(class_name, split, image_uint8_HWC)`` in any order; ``splits`` maps each
    split to its class names, which fixes the dense labels (train classes first, then val, then
    test, each in the given order). Records are spilled to disk as they come, so memory does not
    grow with the number of images. A class with no records is an error, unless ``min_images`` is
    given: then classes with fewer records are left out (logged). Missing ``mean``/``std`` in
    ``preprocess`` are computed over the train split. ``sampling`` is stored as ``meta["sampling"]``
    and ``extra_files(meta)`` returns more ``{file name: text}`` to write beside. Files are written
    into a temp dir beside ``out_dir`` and renamed into place; on any error the temp dir is removed.
    An existing dataset at ``out_dir`` is replaced; any other non-empty directory there raises
    ``FileExistsError``.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        data = _spill(records, splits, tmp / SPILL_FILE, min_images)
        preprocess = _with_stats(preprocess, data)
        _write_images(tmp / IMAGES_FILE, data)
        data.path.unlink()
        meta = _meta(name, data, preprocess, source, sampling)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for file_name, text in (extra_files(meta) if extra_files else {}).items():
            (tmp / file_name).write_text(text)
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


def _spill(
    records: Iterable[Record], splits: Mapping[str, Sequence[str]], path: Path, min_images: int | None
) -> _Spilled:
    """Write the records' pixels to ``path`` as they come; labels and row order are kept in memory."""
    names, owners = _label_table(splits)
    label_of = {name: i for i, name in enumerate(names)}
    labels = array("i")
    shape = None
    with open(path, "wb") as raw:
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
            raw.write(np.ascontiguousarray(image).data)
            labels.append(label)
    arrived = np.frombuffer(labels, np.int32) if labels else np.zeros(0, np.int32)
    keep = _kept_classes(names, np.bincount(arrived, minlength=len(names)), min_images)
    if not keep.any():
        raise DataError("no images to write")
    order = np.argsort(arrived, kind="stable")
    order = order[keep[arrived[order]]]
    relabel = (np.cumsum(keep) - 1).astype(np.int32)
    return _Spilled(
        path=path,
        row_shape=shape,
        order=order,
        labels=relabel[arrived[order]],
        class_names=[n for n, k in zip(names, keep, strict=True) if k],
        class_splits=[s for s, k in zip(owners, keep, strict=True) if k],
    )


def _kept_classes(names: list[str], counts: np.ndarray, min_images: int | None) -> np.ndarray:
    """Which classes to keep; without ``min_images`` a class with no images is an error."""
    small = np.flatnonzero(counts < (min_images or 1))
    if len(small) and min_images is None:
        raise DataError(f"{len(small)} class(es) without images, e.g. {[names[i] for i in small[:3]]}")
    if len(small):
        examples = ", ".join(f"{names[i]!r} ({counts[i]})" for i in small[:5]) + (" ..." * (len(small) > 5))
        log.info("left out %d class(es) with fewer than %d images: %s", len(small), min_images, examples)
    return counts >= (min_images or 1)


def _read_rows(raw: BinaryIO, rows: np.ndarray, row_bytes: int) -> np.ndarray:
    """Rows ``rows`` of the raw file, ``(len(rows), row_bytes)``; runs of consecutive rows read at once."""
    out = np.empty((len(rows), row_bytes), np.uint8)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
        raw.seek(int(rows[start]) * row_bytes)
        if raw.readinto(out[start:stop]) != (stop - start) * row_bytes:
            raise DataError(f"{raw.name}: spill file is shorter than expected")
    return out


def _with_stats(preprocess: Mapping[str, Any], data: _Spilled) -> dict[str, Any]:
    out = dict(preprocess)
    if "mean" in out and "std" in out:
        return out
    train_rows = int(np.searchsorted(data.labels, data.class_splits.count("train")))  # train labels come first
    if train_rows == 0:
        raise DataError("cannot compute mean/std: the train split has no images")
    out["mean"], out["std"] = channel_stats(data.chunks(train_rows))
    return out


def channel_stats(chunks: Iterable[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC image ``chunks`` scaled to [0, 1] (exact integer sums)."""
    total = total_sq = count = 0
    for images in chunks:
        x = images.reshape(-1, images.shape[-1]).astype(np.int64)
        total, total_sq, count = total + x.sum(0), total_sq + (x * x).sum(0), count + len(x)
    mean = total / (255.0 * count)
    std = np.sqrt(np.maximum(total_sq / (255.0**2 * count) - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def _schema(row_bytes: int) -> pa.Schema:
    fields = [("image", pa.binary(row_bytes)), ("label", pa.int32())]
    return pa.schema([*fields, ("class_name", pa.string()), ("split", pa.string())])


def _write_images(path: Path, data: _Spilled) -> None:
    """Write the Arrow file with zeros as images, then copy the spilled pixels into place."""
    _write_layout(path, data)
    with open(path, "r+b") as file:
        file.seek(_image_offset(path, len(data.labels) * data.row_bytes))
        for chunk in data.chunks():
            file.write(chunk.data)


def _write_layout(path: Path, data: _Spilled) -> None:
    """The IPC file of one record batch whose image column is all zeros.

    The zeros are an untouched private anonymous mapping: reading it maps the kernel's zero page,
    so writing the layout costs no memory however many images there are.
    """
    n, row_bytes = len(data.labels), data.row_bytes
    zeros = mmap.mmap(-1, n * row_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
    schema = _schema(row_bytes)
    labels = pa.array(data.labels, pa.int32())
    columns = [
        pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, pa.py_buffer(zeros)]),
        labels,
        pa.array(data.class_names, pa.string()).take(labels),
        pa.array(data.class_splits, pa.string()).take(labels),
    ]
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch(columns, schema=schema))


def _image_offset(path: Path, size: int) -> int:
    """Byte offset in the Arrow file ``path`` of its image column's ``size`` data bytes."""
    with pa.memory_map(str(path), "r") as source:
        column = ipc.open_file(source).get_batch(0).column("image")
        source.seek(0)
        offset = column.buffers()[1].address - source.read_buffer(1).address
        if column.buffers()[1].size < size or not 0 <= offset <= source.size() - size:
            raise DatasetFormatError(f"{path}: image column not found where expected")
    return offset


def _meta(
    name: str, data: _Spilled, preprocess: dict[str, Any], source: Any, sampling: Mapping[str, Any] | None
) -> dict[str, Any]:
    height, width, channels = data.row_shape
    pairs = list(zip(data.class_names, data.class_splits, strict=True))
    splits = {split: [name for name, owner in pairs if owner == split] for split in SPLITS}
    meta = {"name": name, "format_version": FORMAT_VERSION, "height": height, "width": width, "channels": channels}
    meta |= {"preprocess": preprocess, "splits": {s: n for s, n in splits.items() if n}, "source": source}
    return {**meta, "sampling": dict(sampling)} if sampling else meta


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
