"""Arrow storage: layout, zero-copy reading, pickling, atomic writes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from tsmd_ray.data import ArrowFewShotDataset, DatasetFormatError, SplitError, write_dataset

SPLITS = {"train": ["b", "a"], "val": ["c"], "test": ["d"]}
PREPROCESS = {"size": [4, 3], "channels": 2, "invert": False}


def _records(seed: int = 0) -> list[tuple[str, str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    split_of = {c: s for s, names in SPLITS.items() for c in names}
    records = [
        (c, split_of[c], rng.integers(0, 256, (4, 3, 2), dtype=np.uint8)) for c in "abcd" for _ in range(3)
    ]
    return [records[i] for i in rng.permutation(len(records))]  # any order in, sorted out


def _write(path: Path, records=None) -> Path:
    return write_dataset(path, "toy", records or _records(), PREPROCESS, SPLITS, source={"test": True})


def test_round_trip_sorted_by_split_and_label(tmp_path: Path) -> None:
    records = _records()
    ds = ArrowFewShotDataset(_write(tmp_path / "toy", records))
    assert ds.class_names == ["b", "a", "c", "d"]  # train classes first, in the given order
    assert ds.splits == {"train": [0, 1], "val": [2], "test": [3]}
    assert ds.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert ds.class_ranges.tolist() == [[0, 3], [3, 6], [6, 9], [9, 12]]
    assert ds.images.shape == (12, 4, 3, 2) and ds.images.dtype == np.uint8
    for label, name in enumerate(ds.class_names):
        start, stop = ds.class_ranges[label]
        expected = sorted(r[2].tobytes() for r in records if r[0] == name)
        assert sorted(img.tobytes() for img in ds.images[start:stop]) == expected


def test_schema_and_meta(tmp_path: Path) -> None:
    path = _write(tmp_path / "toy")
    schema = ipc.open_file(pa.memory_map(str(path / "images.arrow"))).schema
    assert schema.field("image").type == pa.binary(4 * 3 * 2)
    assert schema.field("label").type == pa.int32()
    assert schema.field("class_name").type == pa.string() and schema.field("split").type == pa.string()
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["name"], meta["format_version"], meta["height"], meta["width"], meta["channels"]) == (
        "toy",
        1,
        4,
        3,
        2,
    )
    assert meta["splits"] == SPLITS and meta["source"] == {"test": True}
    train = np.stack([r[2] for r in _records() if r[1] == "train"]).reshape(-1, 2) / 255.0
    np.testing.assert_allclose(meta["preprocess"]["mean"], train.mean(0))
    np.testing.assert_allclose(meta["preprocess"]["std"], train.std(0))


def test_images_are_a_zero_copy_read_only_view(tmp_path: Path) -> None:
    images = ArrowFewShotDataset(_write(tmp_path / "toy")).images
    assert not images.flags.writeable and not images.flags.owndata


def test_pickles_as_path_and_reopens_lazily(tmp_path: Path) -> None:
    ds = ArrowFewShotDataset(_write(tmp_path / "toy"))
    ds.images  # noqa: B018 - map it before pickling
    blob = pickle.dumps(ds)
    assert len(blob) < 200
    clone = pickle.loads(blob)
    assert clone._mapped is None
    np.testing.assert_array_equal(clone.images, ds.images)


def test_format_version_mismatch(tmp_path: Path) -> None:
    path = _write(tmp_path / "toy")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DatasetFormatError, match=r"format_version 99.*version 1"):
        ArrowFewShotDataset(path)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def failing():
        yield from _records()[:5]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        _write(tmp_path / "toy", failing())
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_dataset(tmp_path: Path) -> None:
    path = _write(tmp_path / "toy")
    before = (path / "images.arrow").read_bytes()
    with pytest.raises(SplitError):
        _write(path, [("zzz", "train", np.zeros((4, 3, 2), np.uint8))])
    assert (path / "images.arrow").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    _write(path, _records(seed=1))  # a successful rewrite replaces it
    assert (path / "images.arrow").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        _write(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
