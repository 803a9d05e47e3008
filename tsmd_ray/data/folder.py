"""Your own data: an ImageFolder tree or a ``path,label`` table prepared into the Arrow format.

``prepare_folder`` reads ``DIR/<class>/<image>`` (class names ``depth`` folders deep, such as
``Alphabet/character01``); ``prepare_manifest`` reads a CSV or Parquet table with ``path`` and
``label`` columns. The classes are split by ratio with a seed or by the user's split files. Images
are decoded in parallel (``decode.py``); unreadable files and exact duplicates are skipped and
reported, and the rest is streamed into ``write_dataset``. See docs/data.md, "Your own data".
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
from tqdm import tqdm

from .arrow import SPLITS
from .arrow_write import Record, write_dataset
from .decode import Decoded, decode_stream, default_workers
from .episodes import LEAVE_OUT
from .errors import DataError, DataRootError, ImageReadError, SplitError
from .split_files import random_split

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
DEFAULT_IMAGE_SIZE = 84
DEFAULT_RATIOS = (0.6, 0.2, 0.2)
REPORT_FILE = "report.json"
EXAMPLES = 10  # files named in report.json per kind of problem (5 in the log)
FOLDER_LAYOUT = """\
Expected an ImageFolder tree (as torchvision.datasets.ImageFolder reads):
  <source>/<class>/<image>.{jpg,jpeg,png,ppm,bmp,pgm,tif,tiff,webp}   one folder per class, or with
  <source>/<group>/<class>/<image>   and --depth 2, classes named <group>/<class>;
  images in sub-folders of a class belong to it; hidden files and folders are skipped"""
MANIFEST_LAYOUT = """\
Expected a manifest table: a .csv file (with a header row) or a .parquet file with the columns
  path   the image file, relative to the table's folder (or absolute)
  label  its class (any string or number); other columns are ignored"""


@dataclass(frozen=True)
class PrepareOptions:
    """How to prepare your own images (defaults: 84x84 RGB, classes split 60/20/20 with seed 0)."""

    image_size: int = DEFAULT_IMAGE_SIZE
    channels: int = 3
    invert: bool = False  # 255 - pixel, e.g. for dark strokes on white as in Omniglot
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    seed: int = 0
    split_dir: Path | None = None  # train.txt, val.txt, test.txt (one class per line) instead of ratios
    min_images: int = 2  # classes with fewer usable images are left out of the dataset
    strict: bool = False  # refuse the first unreadable file instead of skipping it
    workers: int = 0  # decoding processes; 0: one per CPU core

    def check(self) -> None:
        """``DataError`` naming the first invalid option."""
        for name in ("image_size", "min_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if self.channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {self.channels!r}")
        if len(self.ratios) != 3 or min(self.ratios) < 0 or self.ratios[0] <= 0:
            raise DataError(f"split ratios must be 3 numbers >= 0 (train > 0), got {list(self.ratios)}")
        if self.workers < 0:
            raise DataError(f"workers must be >= 0, got {self.workers}")
        if self.split_dir is not None and not Path(self.split_dir).is_dir():
            raise DataRootError(f"split folder {self.split_dir} does not exist")


@dataclass
class Catalog:
    """Image files per class, as found in a folder tree or a manifest."""

    source: Path
    kind: str  # "folder" or "manifest"
    classes: dict[str, list[str]]  # class -> file paths
    ignored: int = 0  # files that are not images, or lie above the class folders


@dataclass
class Tally:
    """A count of files and the first few of them."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(text)


@dataclass
class Report:
    """What preparation did with the files; written to ``report.json`` beside the dataset."""

    files: int
    ignored: int
    min_images: int
    unreadable: Tally = field(default_factory=Tally)
    duplicates: Tally = field(default_factory=Tally)
    converted: Tally = field(default_factory=Tally)
    kept: Counter[str] = field(default_factory=Counter)  # images written per class
    left_out: dict[str, int] = field(default_factory=dict)  # class -> usable images (< min_images)

    def to_json(self, meta: dict[str, Any]) -> str:
        splits = meta["splits"]
        return json.dumps(
            {
                "files": self.files,
                "images": sum(self.kept.values()),
                "classes": {s: len(splits.get(s, [])) for s in SPLITS},
                "images_per_split": {s: sum(self.kept[c] for c in splits.get(s, [])) for s in SPLITS},
                "ignored_files": self.ignored,
                **{k: vars(getattr(self, k)) for k in ("unreadable", "duplicates", "converted")},
                "min_images": self.min_images,
                "left_out_classes": self.left_out,
            },
            indent=2,
        ) + "\n"


# ------------------------------------------------------------------------------------- sources


def scan_folder(source: Path, depth: int = 1) -> Catalog:
    """Classes and image files of the ImageFolder tree ``source``; class names are ``depth`` deep."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise DataError(f"depth must be a positive integer, got {depth!r}")
    if not source.is_dir():
        raise DataRootError(f"{source} is not a folder\n{FOLDER_LAYOUT}")
    classes: dict[str, list[str]] = {}
    ignored = 0
    for folder, subfolders, files in os.walk(source, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        parts = Path(folder).relative_to(source).parts
        if len(parts) == depth:
            classes[Path(*parts).as_posix()] = []
        for name in sorted(f for f in files if not f.startswith(".")):
            if len(parts) < depth or not name.lower().endswith(IMAGE_SUFFIXES):
                ignored += 1
            else:
                classes[Path(*parts[:depth]).as_posix()].append(os.path.join(folder, name))
    if not any(classes.values()):
        raise DataRootError(f"no image files in class folders {depth} level(s) below {source}\n{FOLDER_LAYOUT}")
    return Catalog(source, "folder", dict(sorted(classes.items())), ignored)


def read_manifest(source: Path) -> Catalog:
    """Classes and image files listed by the CSV or Parquet table ``source`` (``path``, ``label``)."""
    table = _read_table(source)
    missing = sorted({"path", "label"} - set(table.column_names))
    if missing:
        raise DataRootError(
            f"manifest {source} lacks the column(s) {missing}; it has {table.column_names}\n{MANIFEST_LAYOUT}"
        )
    paths, labels = (table.column(c).cast(pa.string()).to_pylist() for c in ("path", "label"))
    classes: dict[str, list[str]] = {}
    for row, (path, label) in enumerate(zip(paths, labels, strict=True), 1):
        if not (path or "").strip() or not (label or "").strip():
            raise DataRootError(f"manifest {source}, row {row}: empty path or label\n{MANIFEST_LAYOUT}")
        classes.setdefault(label.strip(), []).append(str(source.parent / path.strip()))
    if not classes:
        raise DataRootError(f"manifest {source} lists no images\n{MANIFEST_LAYOUT}")
    return Catalog(source, "manifest", dict(sorted(classes.items())))


def _read_table(source: Path) -> pa.Table:
    if not source.is_file():
        raise DataRootError(f"manifest {source} is not a file\n{MANIFEST_LAYOUT}")
    try:
        if source.suffix.lower() == ".csv":
            return pa_csv.read_csv(source)
        if source.suffix.lower() in (".parquet", ".pq"):
            return pa_parquet.read_table(source)
    except (pa.ArrowException, OSError) as exc:
        raise DataRootError(f"cannot read manifest {source}: {exc}\n{MANIFEST_LAYOUT}") from exc
    raise DataRootError(f"manifest {source}: expected a .csv or .parquet file\n{MANIFEST_LAYOUT}")


# ------------------------------------------------------------------------------------- splits


def ratio_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """``n`` classes cut in proportion to ``ratios`` (largest remainders get the rounding)."""
    exact = np.asarray(ratios, float) / sum(ratios) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(counts - exact, kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def read_split_files(folder: Path, classes: Sequence[str]) -> dict[str, list[str]]:
    """The split in ``folder/{train,val,test}.txt`` (one class per line), checked against ``classes``."""
    owner: dict[str, Path] = {}
    splits: dict[str, list[str]] = {}
    for split in SPLITS:
        path = Path(folder) / f"{split}.txt"
        if not path.is_file():
            raise DataRootError(f"split file {path} is missing; give train.txt, val.txt, test.txt (may be empty)")
        splits[split] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for name in splits[split]:
            if owner.setdefault(name, path) != path:
                raise SplitError(f"class {name!r} is listed in both {owner[name]} and {path}")
    unknown = [c for c in classes if c not in owner]
    if unknown:
        raise SplitError(f"class {unknown[0]!r} is in no split file of {folder} ({len(unknown)} such classes)")
    found = set(classes)
    absent = [c for c in owner if c not in found]
    if absent:
        raise DataRootError(f"{owner[absent[0]]}: class {absent[0]!r} is not in the source ({len(absent)} such)")
    return splits


def assign_splits(classes: Sequence[str], options: PrepareOptions) -> dict[str, list[str]]:
    """Split files if given, else a random split of the sorted names by ``options.ratios``."""
    if options.split_dir is not None:
        return read_split_files(options.split_dir, classes)
    return random_split(classes, ratio_counts(len(classes), options.ratios), options.seed)


# ------------------------------------------------------------------------------------- preparing


def prepare_folder(
    source: str | os.PathLike, out: str | os.PathLike, depth: int = 1, options: PrepareOptions | None = None
) -> Path:
    """Prepare the ImageFolder tree ``source`` into the dataset directory ``out``; returns ``out``."""
    options = _checked(options)
    log.info("listing the image files of %s", source)
    return _prepare(scan_folder(Path(source), depth), Path(out), options, depth=depth)


def prepare_manifest(
    source: str | os.PathLike, out: str | os.PathLike, options: PrepareOptions | None = None
) -> Path:
    """Prepare the images listed by the CSV/Parquet table ``source`` into ``out``; returns ``out``."""
    options = _checked(options)
    return _prepare(read_manifest(Path(source)), Path(out), options)


def _checked(options: PrepareOptions | None) -> PrepareOptions:
    options = options or PrepareOptions()
    options.check()
    return options


def _prepare(catalog: Catalog, out: Path, options: PrepareOptions, **source_info: Any) -> Path:
    chosen = assign_splits(list(catalog.classes), options)
    report = Report(sum(map(len, catalog.classes.values())), catalog.ignored, options.min_images)
    log.info("%s: %d image files in %d classes", catalog.source, report.files, len(catalog.classes))
    report.left_out = {c: len(f) for c, f in catalog.classes.items() if len(f) < options.min_images}
    splits = {s: [c for c in chosen[s] if c not in report.left_out] for s in SPLITS}
    preprocess = {"size": [options.image_size] * 2, "channels": options.channels, "invert": options.invert}
    if options.split_dir:
        split_info: dict[str, Any] = {"split_dir": str(Path(options.split_dir).resolve())}
    else:
        split_info = {"ratios": list(options.ratios), "seed": options.seed}
    info = {"kind": catalog.kind, "path": str(catalog.source.resolve()), **source_info, **split_info}

    def extra_files(meta: dict[str, Any]) -> dict[str, str]:
        """The chosen split (every class, reusable as --split-dir) and the report, once all is decoded."""
        kept = {c for names in meta["splits"].values() for c in names}
        report.left_out |= {c: report.kept[c] for names in splits.values() for c in names if c not in kept}
        split_files = {f"{s}.txt": "".join(f"{c}\n" for c in chosen[s]) for s in SPLITS}
        return {**split_files, REPORT_FILE: report.to_json(meta)}

    records = _records(catalog, splits, preprocess, options, report)
    path = write_dataset(
        out, out.resolve().name, records, preprocess, splits, info, min_images=options.min_images,
        sampling={"small_classes": LEAVE_OUT}, extra_files=extra_files,
    )
    _log_summary(path, report)
    return path


def _records(
    catalog: Catalog, splits: dict[str, list[str]], preprocess: dict, options: PrepareOptions, report: Report
) -> Iterator[Record]:
    """Decoded images in label order; unreadable files and duplicates go to ``report``."""
    jobs = ((p, (c, s, p)) for s in SPLITS for c in splits[s] for p in catalog.classes[c])
    first_of: dict[bytes, str] = {}  # pixel digest -> first file with those pixels
    workers = options.workers or default_workers()
    total = sum(len(catalog.classes[c]) for s in SPLITS for c in splits[s])
    with tqdm(total=total, desc=f"prepare {catalog.kind}", unit="img", smoothing=0.1) as bar:
        for (cls, split, path), decoded in decode_stream(jobs, preprocess, workers):
            bar.update()
            if _accept(decoded, path, first_of, options.strict, report):
                report.kept[cls] += 1
                yield cls, split, decoded.array


def _accept(decoded: Decoded, path: str, first_of: dict[bytes, str], strict: bool, report: Report) -> bool:
    if decoded.error is not None:
        if strict:
            raise ImageReadError(f"{decoded.error} (--strict: no image is skipped)")
        report.unreadable.add(decoded.error)
        return False
    if decoded.digest in first_of:
        report.duplicates.add(f"{path} (same pixels as {first_of[decoded.digest]})")
        return False
    first_of[decoded.digest] = path
    if decoded.converted:
        report.converted.add(f"{path} ({decoded.converted})")
    return True


def _log_summary(path: Path, report: Report) -> None:
    counts = {s: len(names) for s, names in json.loads((path / "meta.json").read_text())["splits"].items()}
    log.info("%s: %d images of %d files, classes %s (report: %s)", path, sum(report.kept.values()),
             report.files, counts, path / REPORT_FILE)
    problems = (
        (report.unreadable, "skipped %d unreadable file(s): %s"),
        (report.duplicates, "skipped %d exact duplicate(s): %s"),
        (report.converted, "converted %d image(s) with alpha, CMYK or 2 channels to RGB: %s"),
    )
    for tally, message in problems:
        if tally.count:
            log.warning(message, tally.count, "; ".join(tally.examples[:5]) + " ..." * (tally.count > 5))
    if report.left_out:
        examples = ", ".join(f"{c!r} ({n})" for c, n in list(report.left_out.items())[:5])
        log.warning("left out %d class(es) with fewer than %d usable images: %s", len(report.left_out),
                    report.min_images, examples)
    if report.ignored:
        log.info("ignored %d file(s) that are not images or lie above the class folders", report.ignored)
