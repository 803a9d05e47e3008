"""Preparation of the paper's benchmarks (section 5.1) from their usual release layouts.

mini-ImageNet, CIFAR-FS, FC100, FGVC-aircraft, CUB-200-2011 and Stanford dogs; Omniglot is in
``omniglot.py``. Each release is read into ``{class name: [image refs]}``; the class split comes from
``splits/<name>.json`` (fixed, in the repository) and the images go through the same
``transforms.to_array`` as every other dataset (RGB, LANCZOS resize). See docs/data.md.

Some releases are Python pickles. Unpickling can run arbitrary code, so every unpickled file is
named in a warning; prepare only releases from a source you trust.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .arrow import SPLITS, Record, write_dataset
from .errors import DataError, DataRootError, SplitError
from .transforms import image_channels, open_image, to_array

log = logging.getLogger(__name__)

SPLIT_DIR = Path(__file__).parent / "splits"
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


# ------------------------------------------------------------------------------------- split files


def split_file(name: str) -> Path:
    return SPLIT_DIR / f"{name}.json"


def load_split(name: str) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` class names from ``splits/<name>.json``."""
    table = json.loads(split_file(name).read_text())
    return {split: list(table[split]) for split in SPLITS}


def random_split(classes: Sequence[str], counts: Sequence[int], seed: int) -> dict[str, list[str]]:
    """The seeded random class split used to write the split files of the "random" datasets.

    The class names are sorted, permuted with ``np.random.default_rng(seed)``, cut into
    ``counts`` (train, val, test) in that order, and each split is sorted again.
    """
    names = sorted(classes)
    if sum(counts) != len(names):
        raise ValueError(f"counts {list(counts)} do not add up to {len(names)} classes")
    order = np.random.default_rng(seed).permutation(len(names))
    cuts = np.cumsum([0, *counts])
    return {
        s: sorted(names[i] for i in order[a:b]) for s, a, b in zip(SPLITS, cuts[:-1], cuts[1:], strict=True)
    }


def _assign(name: str, release: Release, layout_help: str) -> dict[str, list[str]]:
    """Check the found classes against the split file; returns the split to write."""
    splits, path = load_split(name), split_file(name)
    split_of = {c: s for s, names in splits.items() for c in names}
    unknown = sorted(set(release.images) - set(split_of)) or sorted(set(release.declared) - set(split_of))
    if unknown:
        more = f" ({len(unknown)} such classes)" if len(unknown) > 1 else ""
        raise SplitError(
            f"{name}: class {unknown[0]!r} found in {release.root} is in no split of {path}{more}"
        )
    for cls, split in release.declared.items():
        if split_of[cls] != split:
            raise SplitError(
                f"{name}: {release.root} puts class {cls!r} in {split!r}, {path} puts it in {split_of[cls]!r}"
            )
    missing = [c for c in split_of if not release.images.get(c)]
    if missing:
        raise DataRootError(
            f"{name}: {len(missing)} of the {len(split_of)} classes of {path} have no images in "
            f"{release.root}, e.g. {missing[:3]}; is the release complete?\n{layout_help}"
        )
    return splits


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


def _load(ref: Ref, preprocess: dict) -> np.ndarray:
    if isinstance(ref, Path):
        name, image = str(ref), open_image(ref, str(ref))
    else:
        name, image = ref[0], Image.fromarray(ref[1])
    if image_channels(image) not in (1, 3):  # RGBA / CMYK / LA files exist in the real releases
        log.warning("%s: mode %s converted to RGB", name, image.mode)
        image = image.convert("RGB")
    return to_array(image, preprocess, name)


def _records(
    name: str, images: dict[str, list[Ref]], splits: dict[str, list[str]], preprocess: dict
) -> Iterator[Record]:
    with tqdm(total=sum(len(images[c]) for s in SPLITS for c in splits[s]), desc=name, unit="img") as bar:
        for split in SPLITS:
            for cls in splits[split]:
                for ref in images[cls]:
                    yield cls, split, _load(ref, preprocess)
                    bar.update()


# ------------------------------------------------------------------------------------- readers


def _read_mini_pickles(root: Path, help_: str) -> Release:
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


def _read_mini_csv(root: Path, help_: str) -> Release:
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


def _read_cifar_python(root: Path, help_: str) -> Release:
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


def _read_cifar_png(root: Path, help_: str) -> Release:
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


def _read_fc100_pickles(root: Path, help_: str) -> Release:
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


def _read_aircraft(root: Path, help_: str) -> Release:
    images_dir = _need(root / "images", "images folder", help_)
    release = Release(root, "fgvc-aircraft-2013b", {}, files=list(AIRCRAFT_LISTS))
    for name in AIRCRAFT_LISTS:  # image-level lists; their union is every image of the 100 variants
        for _, image_id, variant in _lines(root / name, help_):
            release.images.setdefault(variant, []).append(images_dir / f"{image_id}.jpg")
    return release


def _read_cub(root: Path, help_: str) -> Release:
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


def _read_dogs(root: Path, help_: str) -> Release:
    images = {d.name: _image_files(d) for d in sorted(root.iterdir()) if d.is_dir()}
    return Release(root, "stanford-dogs", images)


# ------------------------------------------------------------------------------------- locating


def _first(candidates: Sequence[Path], test: Callable[[Path], bool]) -> Path | None:
    return next((c for c in candidates if c.is_dir() and test(c)), None)


def _locate_mini(source: Path) -> tuple[str, Path] | None:
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


def _locate_cifar_fs(source: Path) -> tuple[str, Path] | None:
    if root := _cifar_python_root(source):
        return "cifar-100-python", root
    png = _first(
        [source / "cifarfs" / "cifar100", source / "cifar100", source],
        lambda p: (p / "data").is_dir() and (p.name == "cifar100" or (p / "splits" / "bertinetto").is_dir()),
    )
    return ("png", png) if png else None


def _locate_fc100(source: Path) -> tuple[str, Path] | None:
    if any((source / f"FC100_{s}.pickle").exists() for s in SPLITS):
        return "pickle", source
    root = _cifar_python_root(source)
    return ("cifar-100-python", root) if root else None


def _locate_aircraft(source: Path) -> tuple[str, Path] | None:
    root = _first(
        [source / "fgvc-aircraft-2013b" / "data", source / "data", source],
        lambda p: any((p / n).exists() for n in AIRCRAFT_LISTS) or p.parent.name == "fgvc-aircraft-2013b",
    )
    return ("lists", root) if root else None


def _locate_cub(source: Path) -> tuple[str, Path] | None:
    root = _first(
        [source / "CUB_200_2011", source],
        lambda p: p.name == "CUB_200_2011" or (p / "classes.txt").exists() or (p / "images.txt").exists(),
    )
    return ("lists", root) if root else None


def _locate_dogs(source: Path) -> tuple[str, Path] | None:
    root = _first([source / "Images", source / "images" / "Images", source], lambda p: p.name == "Images")
    return ("folders", root) if root else None


# ------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class PaperDataset:
    """One benchmark: where its release is, how to read each layout, its default image size."""

    name: str
    default_image_size: int
    layout: str  # expected layouts, shown in errors
    locate: Callable[[Path], tuple[str, Path] | None]
    readers: dict[str, Callable[[Path, str], Release]]

    def is_raw(self, path: Path) -> bool:
        """Whether ``path`` holds (or is) a release of this dataset in a known layout."""
        return Path(path).is_dir() and self.locate(Path(path)) is not None

    def prepare(
        self, source: str | os.PathLike, out: str | os.PathLike, image_size: int | None = None
    ) -> Path:
        """Prepare the release at ``source`` into the dataset directory ``out``; returns ``out``."""
        size = self.default_image_size if image_size is None else image_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise DataError(f"image_size must be a positive integer, got {size!r}")
        source = Path(source)
        found = self.locate(source) if source.is_dir() else None
        if found is None:
            raise DataRootError(f"no {self.name} release found at {source}\n{self.layout}")
        kind, root = found
        release = self.readers[kind](root, self.layout)
        splits = _assign(self.name, release, self.layout)
        preprocess = {"size": [size, size], "channels": 3, "invert": False}
        table = json.loads(split_file(self.name).read_text())
        info = {
            "path": str(source.resolve()),
            "root": str(root.resolve()),
            "layout": release.layout,
            "files": release.files,
            "split_file": f"tsmd_ray/data/splits/{self.name}.json",
            "split": table.get("origin"),
            "split_seed": table.get("seed"),
        }
        records = _records(self.name, release.images, splits, preprocess)
        return write_dataset(out, self.name, records, preprocess, splits, info)


_MINI = """\
Expected mini-ImageNet layout (one of):
  <source>/mini-imagenet-cache-{train,validation,test}.pkl   pickle release, as learn2learn reads it
      (-val.pkl is accepted too); each a dict {'image_data': uint8 (N,84,84,3), 'class_dict': {wnid: [rows]}}
  <source>/{train,val,test}.csv + <source>/images/<filename>  Ravi & Larochelle CSV release
      (rows 'filename,label')"""
_CIFAR_PY = "  <source>/cifar-100-python/{train,test,meta}                 CIFAR-100 python release (pickles)"
_CIFAR_FS = f"""\
Expected CIFAR-FS layout (one of):
{_CIFAR_PY}
  <source>/cifar100/data/<class>/*.png [+ cifar100/splits/bertinetto/{{train,val,test}}.txt]
      Bertinetto et al. release (learn2learn's cifarfs zip; <source>/cifarfs/cifar100 works too)"""
_FC100 = f"""\
Expected FC100 layout (one of):
  <source>/FC100_{{train,val,test}}.pickle   learn2learn / MetaOptNet pickles, labels = CIFAR-100 fine ids
{_CIFAR_PY}"""
_AIRCRAFT = """\
Expected FGVC-aircraft layout (fgvc-aircraft-2013b release):
  <source>/fgvc-aircraft-2013b/data/images_variant_{train,val,test}.txt   lines '<image id> <variant>'
  <source>/fgvc-aircraft-2013b/data/images/<image id>.jpg
  (<source> may also be fgvc-aircraft-2013b/ or its data/ folder)"""
_CUB = """\
Expected CUB-200-2011 layout:
  <source>/CUB_200_2011/classes.txt   lines '<id> <NNN.Class_name>'
  <source>/CUB_200_2011/images.txt    lines '<id> <NNN.Class_name>/<file>.jpg'
  <source>/CUB_200_2011/images/<NNN.Class_name>/<file>.jpg   (<source> may also be CUB_200_2011/)"""
_DOGS = """\
Expected Stanford dogs layout:
  <source>/Images/<wnid>-<Breed>/*.jpg, e.g. Images/n02085620-Chihuahua/n02085620_10074.jpg
  (<source> may also be Images/ itself, or hold images/Images/ as in the Kaggle copy)"""

DATASETS: dict[str, PaperDataset] = {
    d.name: d
    for d in (
        PaperDataset(
            "mini_imagenet", 84, _MINI, _locate_mini, {"pickle": _read_mini_pickles, "csv": _read_mini_csv}
        ),
        PaperDataset(
            "cifar_fs",
            32,
            _CIFAR_FS,
            _locate_cifar_fs,
            {"cifar-100-python": _read_cifar_python, "png": _read_cifar_png},
        ),
        PaperDataset(
            "fc100",
            32,
            _FC100,
            _locate_fc100,
            {"pickle": _read_fc100_pickles, "cifar-100-python": _read_cifar_python},
        ),
        PaperDataset("fgvc_aircraft", 84, _AIRCRAFT, _locate_aircraft, {"lists": _read_aircraft}),
        PaperDataset("cub200", 84, _CUB, _locate_cub, {"lists": _read_cub}),
        PaperDataset("stanford_dogs", 84, _DOGS, _locate_dogs, {"folders": _read_dogs}),
    )
}


def prepare_paper_dataset(
    name: str, source: str | os.PathLike, out: str | os.PathLike, image_size: int | None = None
) -> Path:
    """Prepare one of :data:`DATASETS` from ``source`` into ``out`` (``image_size`` default: the paper's)."""
    if name not in DATASETS:
        raise DataRootError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name].prepare(source, out, image_size)
