"""Preparation of the paper's benchmarks (section 5.1) from their usual release layouts.

mini-ImageNet, CIFAR-FS, FC100, FGVC-aircraft, CUB-200-2011 and Stanford dogs; Omniglot is in
``omniglot.py``. Each release is read into ``{class name: [image refs]}`` (``releases.py``); the
class split comes from ``splits/<name>.json`` (fixed, in the repository) and the images go through
the same ``transforms.to_array`` as every other dataset (RGB, LANCZOS resize). See docs/data.md.

Some releases are Python pickles. Unpickling can run arbitrary code, so every unpickled file is
named in a warning; prepare only releases from a source you trust.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import releases
from .arrow import SPLITS
from .arrow_write import Record, write_dataset
from .errors import DataError, DataRootError, SplitError
from .releases import Ref, Release
from .split_files import load_split, split_file
from .transforms import image_channels, open_image, to_array

log = logging.getLogger(__name__)


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
            "mini_imagenet",
            84,
            _MINI,
            releases.locate_mini,
            {"pickle": releases.read_mini_pickles, "csv": releases.read_mini_csv},
        ),
        PaperDataset(
            "cifar_fs",
            32,
            _CIFAR_FS,
            releases.locate_cifar_fs,
            {"cifar-100-python": releases.read_cifar_python, "png": releases.read_cifar_png},
        ),
        PaperDataset(
            "fc100",
            32,
            _FC100,
            releases.locate_fc100,
            {"pickle": releases.read_fc100_pickles, "cifar-100-python": releases.read_cifar_python},
        ),
        PaperDataset(
            "fgvc_aircraft", 84, _AIRCRAFT, releases.locate_aircraft, {"lists": releases.read_aircraft}
        ),
        PaperDataset("cub200", 84, _CUB, releases.locate_cub, {"lists": releases.read_cub}),
        PaperDataset("stanford_dogs", 84, _DOGS, releases.locate_dogs, {"folders": releases.read_dogs}),
    )
}


def prepare_paper_dataset(
    name: str, source: str | os.PathLike, out: str | os.PathLike, image_size: int | None = None
) -> Path:
    """Prepare one of :data:`DATASETS` from ``source`` into ``out`` (``image_size`` default: the paper's)."""
    if name not in DATASETS:
        raise DataRootError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name].prepare(source, out, image_size)
