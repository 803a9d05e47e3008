"""Readers of the paper's benchmark releases in their usual layouts (section 5.1; docs/data.md).

Each layout has a ``locate_*`` (is there a release under this folder, and where is its root?) and
a ``read_*`` that returns a :class:`Release`: image refs per class, and the split the release
itself declares. Some releases are Python pickles; every unpickled file is named in a warning.
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .arrow import SPLITS
from .errors import DataError, DataRootError, SplitError
from .split_files import split_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# mini-imagenet-cache-<suffix>.pkl per split; learn2learn names the val pickle "validation"
MINI_PICKLES = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
FC100_PICKLES = {"train": "train", "val": "validation", "test": "test"}  # learn2learn FC100 modes
AIRCRAFT_LISTS = ("images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt")

Ref = Path | tuple[str, np.ndarray]  # an image file, or (description, uint8 HWC array) from a pickle


@dataclass
class Release:
    """What a reader found: images per class, and the split the release itself declares (if any)."""

    root: Path
    layout: str
    images: dict[str, list[Ref]]
    declared: dict[str, str] = field(default_factory=dict)  # class -> split, checked against the split file
    files: list[str] = field(default_factory=list)  # files read, for meta.json

    def declare(self, cls: str, split: str, where: Path) -> None:
        """Record that the release puts ``cls`` in ``split`` (``where`` says so)."""
        if self.declared.setdefault(cls, split) != split:
            raise SplitError(f"{where}: class {cls!r} is listed in both {self.declared[cls]!r} and {split!r}")


# ------------------------------------------------------------------------------------- helpers


def _need(path: Path, what: str, layout_help: str) -> Path:
    if not path.exists():
        raise DataRootError(f"{what} {path} is missing\n{layout_help}")
    return path


def _warn_unpickling(path: Path, layout_help: str) -> Path:
    _need(path, "pickle file", layout_help)
    log.warning("unpickling %s: pickle can run arbitrary code, only prepare releases you trust", path)
    return path


def _unpickle(path: Path, layout_help: str) -> Any:
    try:
        with open(_warn_unpickling(path, layout_help), "rb") as f:
            return pickle.load(f, encoding="latin1")
    except DataRootError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... on a bad file
        raise DataRootError(f"cannot unpickle {path}: {exc!r}\n{layout_help}") from exc


def _lines(path: Path, layout_help: str) -> list[tuple[int, str, str]]:
    """``(line number, first field, rest)`` of a space-separated list file; blank lines skipped."""
    out = []
    for number, line in enumerate(_need(path, "list file", layout_help).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise DataRootError(f"{path}:{number}: expected '<id> <value>', got {line!r}\n{layout_help}")
        out.append((number, parts[0], parts[1].strip()))
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _array_refs(where: str, images: Any, layout_help: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataRootError(
            f"{where}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}\n{layout_help}"
        )
    return images


# ------------------------------------------------------------------------------------- readers


def read_mini_pickles(root: Path, help_: str) -> Release:
    release = Release(root, "pickle", {})
    for split, suffixes in MINI_PICKLES.items():
        candidates = [root / f"mini-imagenet-cache-{s}.pkl" for s in suffixes]
        path = next((p for p in candidates if p.exists()), candidates[0])
        data = _unpickle(path, help_)
        if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
            raise DataRootError(f"{path}: expected a dict with 'image_data' and 'class_dict'\n{help_}")
        array = _array_refs(str(path), data["image_data"], help_)
        for cls, rows in data["class_dict"].items():
            rows = [int(i) for i in rows]
            if not all(0 <= i < len(array) for i in rows):
                raise DataRootError(f"{path}: class_dict[{cls!r}] has rows outside image_data\n{help_}")
            release.images[cls] = [(f"{path}[{i}]", array[i]) for i in rows]
            release.declare(cls, split, path)
        release.files.append(path.name)
    return release


def read_mini_csv(root: Path, help_: str) -> Release:
    images_dir = _need(root / "images", "images folder", help_)
    release = Release(root, "csv", {})
    for split in SPLITS:
        path = _need(root / f"{split}.csv", "split list", help_)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"filename", "label"} <= set(rows[0]):
            raise DataRootError(f"{path}: expected the columns 'filename,label'\n{help_}")
        for row in rows:
            release.images.setdefault(row["label"], []).append(images_dir / row["filename"])
            release.declare(row["label"], split, path)
        release.files.append(path.name)
    return release


def read_cifar_python(root: Path, help_: str) -> Release:
    meta = _unpickle(root / "meta", help_)
    names = meta.get("fine_label_names") if isinstance(meta, dict) else None
    if not names:
        raise DataRootError(f"{root / 'meta'}: expected a dict with 'fine_label_names'\n{help_}")
    release = Release(root, "cifar-100-python", {}, files=["meta"])
    for part in ("train", "test"):  # the few-shot versions use all 600 images of a class
        path = root / part
        data = _unpickle(path, help_)
        try:
            array = np.ascontiguousarray(
                np.asarray(data["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            )
            labels = [int(v) for v in data["fine_labels"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataRootError(
                f"{path}: expected 'data' (N, 3072) uint8 and 'fine_labels': {exc!r}\n{help_}"
            ) from exc
        if len(labels) != len(array) or not all(0 <= v < len(names) for v in labels):
            raise DataRootError(f"{path}: 'fine_labels' do not match 'data' and the meta file\n{help_}")
        for i, label in enumerate(labels):
            release.images.setdefault(names[label], []).append((f"{path}[{i}]", array[i]))
        release.files.append(part)
    return release


def read_cifar_png(root: Path, help_: str) -> Release:
    data = _need(root / "data", "images folder", help_)
    images = {d.name: _image_files(d) for d in sorted(data.iterdir()) if d.is_dir()}
    release = Release(root, "cifar100-png", images)
    for split, file in zip(SPLITS, ("train.txt", "val.txt", "test.txt"), strict=True):
        path = root / "splits" / "bertinetto" / file  # optional: checked against the split file
        if path.is_file():
            for line in filter(None, map(str.strip, path.read_text().splitlines())):
                release.declare(line, split, path)
            release.files.append(f"splits/bertinetto/{file}")
    return release


def read_fc100_pickles(root: Path, help_: str) -> Release:
    try:
        from learn2learn.vision.datasets import FC100  # its reader; download=False never downloads
    except ImportError as exc:
        raise DataError(f"reading FC100_*.pickle needs learn2learn (make setup builds it): {exc}") from exc
    label_names = json.loads(split_file("fc100").read_text())["pickle_label_names"]
    release = Release(root, "pickle", {})
    for split, mode in FC100_PICKLES.items():
        path = _warn_unpickling(root / f"FC100_{split}.pickle", help_)
        try:
            archive = FC100(root=str(root), mode=mode, download=False)
        except Exception as exc:
            raise DataRootError(f"cannot unpickle {path}: {exc!r}\n{help_}") from exc
        array = _array_refs(str(path), archive.images, help_)
        if len(archive.labels) != len(array):
            raise DataRootError(f"{path}: {len(archive.labels)} labels for {len(array)} images\n{help_}")
        for i, label in enumerate(archive.labels):
            if not 0 <= int(label) < len(label_names):
                raise DataRootError(f"{path}: label {label} is not a CIFAR-100 fine label (0..99)\n{help_}")
            cls = label_names[int(label)]
            release.images.setdefault(cls, []).append((f"{path}[{i}]", array[i]))
            release.declare(cls, split, path)
        release.files.append(path.name)
    return release


def read_aircraft(root: Path, help_: str) -> Release:
    images_dir = _need(root / "images", "images folder", help_)
    release = Release(root, "fgvc-aircraft-2013b", {}, files=list(AIRCRAFT_LISTS))
    for name in AIRCRAFT_LISTS:  # image-level lists; their union is every image of the 100 variants
        for _, image_id, variant in _lines(root / name, help_):
            release.images.setdefault(variant, []).append(images_dir / f"{image_id}.jpg")
    return release


def read_cub(root: Path, help_: str) -> Release:
    images_dir = _need(root / "images", "images folder", help_)
    classes = {name for _, _, name in _lines(root / "classes.txt", help_)}
    release = Release(root, "CUB_200_2011", {c: [] for c in classes}, files=["classes.txt", "images.txt"])
    for number, _, rel in _lines(root / "images.txt", help_):
        cls = rel.split("/")[0]
        if cls not in classes or "/" not in rel:
            raise DataRootError(
                f"{root / 'images.txt'}:{number}: {rel!r} is not '<class in classes.txt>/<file>'\n{help_}"
            )
        release.images[cls].append(images_dir / rel)
    return release


def read_dogs(root: Path, help_: str) -> Release:
    images = {d.name: _image_files(d) for d in sorted(root.iterdir()) if d.is_dir()}
    return Release(root, "stanford-dogs", images)


# ------------------------------------------------------------------------------------- locating


def _first(candidates: Sequence[Path], test: Callable[[Path], bool]) -> Path | None:
    return next((c for c in candidates if c.is_dir() and test(c)), None)


def locate_mini(source: Path) -> tuple[str, Path] | None:
    if any((source / f"mini-imagenet-cache-{s}.pkl").exists() for v in MINI_PICKLES.values() for s in v):
        return "pickle", source
    if any((source / f"{s}.csv").exists() for s in SPLITS):
        return "csv", source
    return None


def _cifar_python_root(source: Path) -> Path | None:
    return _first(
        [source / "cifar-100-python", source],
        lambda p: p.name == "cifar-100-python" or (p / "meta").is_file(),
    )


def locate_cifar_fs(source: Path) -> tuple[str, Path] | None:
    if root := _cifar_python_root(source):
        return "cifar-100-python", root
    png = _first(
        [source / "cifarfs" / "cifar100", source / "cifar100", source],
        lambda p: (p / "data").is_dir() and (p.name == "cifar100" or (p / "splits" / "bertinetto").is_dir()),
    )
    return ("png", png) if png else None


def locate_fc100(source: Path) -> tuple[str, Path] | None:
    if any((source / f"FC100_{s}.pickle").exists() for s in SPLITS):
        return "pickle", source
    root = _cifar_python_root(source)
    return ("cifar-100-python", root) if root else None


def locate_aircraft(source: Path) -> tuple[str, Path] | None:
    root = _first(
        [source / "fgvc-aircraft-2013b" / "data", source / "data", source],
        lambda p: any((p / n).exists() for n in AIRCRAFT_LISTS) or p.parent.name == "fgvc-aircraft-2013b",
    )
    return ("lists", root) if root else None


def locate_cub(source: Path) -> tuple[str, Path] | None:
    root = _first(
        [source / "CUB_200_2011", source],
        lambda p: p.name == "CUB_200_2011" or (p / "classes.txt").exists() or (p / "images.txt").exists(),
    )
    return ("lists", root) if root else None


def locate_dogs(source: Path) -> tuple[str, Path] | None:
    root = _first([source / "Images", source / "images" / "Images", source], lambda p: p.name == "Images")
    return ("folders", root) if root else None
