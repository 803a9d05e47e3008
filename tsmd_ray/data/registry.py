"""Registry of dataset preparers and ``resolve_dataset`` (data root -> prepared dataset dir)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import omniglot, paper_datasets
from .arrow import META_FILE, read_meta
from .errors import DataRootError


@dataclass(frozen=True)
class Preparer:
    """How to turn a raw release of one dataset into a prepared dataset directory."""

    prepare: Callable[[Path, Path, int], Path]  # (source, out, image_size) -> out
    is_raw: Callable[[Path], bool]  # does this folder hold (or is it) the raw release?
    layout: str  # expected raw layout, shown in errors
    default_image_size: int
    download: Callable[[Path], Path] | None = None  # raw_dir -> folder to prepare from


# Add a dataset: write its module and add one entry here.
PREPARERS: dict[str, Preparer] = {
    "omniglot": Preparer(
        prepare=omniglot.prepare_omniglot,
        is_raw=omniglot.is_omniglot_release,
        layout=omniglot.LAYOUT,
        default_image_size=omniglot.DEFAULT_IMAGE_SIZE,
        download=omniglot.download_omniglot,
    ),
    # The paper's other benchmarks (section 5.1), read from local releases only: paper_datasets.py.
    **{
        name: Preparer(
            prepare=spec.prepare,
            is_raw=spec.is_raw,
            layout=spec.layout,
            default_image_size=spec.default_image_size,
        )
        for name, spec in paper_datasets.DATASETS.items()
    },
}

log = logging.getLogger(__name__)


# ``folder:PATH`` names a dataset prepared from your own images (python -m tsmd_ray.data prepare folder|manifest)
OWN_PREFIX = "folder:"


def get_preparer(name: str) -> Preparer:
    """The registered preparer of ``name`` (``DataRootError`` listing known names otherwise)."""
    if name not in PREPARERS:
        raise DataRootError(
            f"unknown dataset {name!r}; known: {sorted(PREPARERS)}, or {OWN_PREFIX}PATH for a dataset "
            "prepared from your own images"
        )
    return PREPARERS[name]


def resolve_dataset(
    name: str,
    data_root: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    image_size: int | None = None,
) -> Path:
    """Return the directory of the prepared dataset ``name``, preparing it if needed.

    ``data_root`` may be: a prepared dataset dir, a dir holding ``<name>/`` prepared, or a raw
    release (directly or in ``<name>/``), which is prepared once into
    ``cache_dir/<name>-<hash of source path and image size>/``. If it is None, empty or missing,
    the raw release is downloaded into ``cache_dir/raw`` when the dataset supports it.
    ``folder:PATH`` is the dataset prepared at ``PATH`` (see :func:`_resolve_own`).
    """
    root = Path(data_root) if data_root is not None else None
    if name.startswith(OWN_PREFIX):
        return _resolve_own(Path(name[len(OWN_PREFIX) :]).expanduser(), root, image_size)
    if root is not None:
        for candidate in (root, root / name):
            if (candidate / META_FILE).is_file():
                return _check_prepared(candidate, name, image_size)
    preparer = get_preparer(name)
    size = image_size or preparer.default_image_size
    cache = Path(cache_dir)
    if root is None or not root.exists() or (root.is_dir() and not any(root.iterdir())):
        if root is not None:
            log.warning("data root %s is missing or empty", root)
        return _prepare_cached(name, preparer, _download(name, preparer, cache), cache, size)
    for candidate in (root, root / name):
        if preparer.is_raw(candidate):
            return _prepare_cached(name, preparer, candidate, cache, size)
    raise DataRootError(
        f"--data-root {root} holds neither a prepared dataset ({root}/{META_FILE} or "
        f"{root}/{name}/{META_FILE}) nor a raw {name} release.\n{preparer.layout}"
    )


def _resolve_own(path: Path, root: Path | None, image_size: int | None) -> Path:
    """The absolute path of the dataset prepared at ``path`` (by ``prepare folder|manifest``).

    A prepared ``root`` of the same name (its folder's or its ``meta["name"]``) takes the place of
    ``path``: a copy elsewhere (``evaluate --data-root``), or the absolute path Tune trials receive.
    """
    if not path.name:
        raise DataRootError(f"dataset {OWN_PREFIX!r} needs the prepared dataset's folder: {OWN_PREFIX}data/NAME")
    if root is not None and (root / META_FILE).is_file() and path.name in _names(root):
        path = root
    elif not (path / META_FILE).is_file():
        raise DataRootError(
            f"dataset {OWN_PREFIX}{path}: {path} is not a prepared dataset (no {META_FILE}); prepare your "
            f"images first: python -m tsmd_ray.data prepare folder --source IMAGES_DIR --out {path}"
        )
    return _check_size(path.resolve(), read_meta(path), image_size)


def _names(prepared: Path) -> set[str]:
    """The names a prepared dataset goes by: its folder's and the one in its ``meta.json``."""
    return {prepared.resolve().name, read_meta(prepared)["name"]}


def _check_prepared(path: Path, name: str, image_size: int | None) -> Path:
    meta = read_meta(path)
    if meta["name"] != name:
        raise DataRootError(f"{path} holds dataset {meta['name']!r}, not {name!r}")
    return _check_size(path, meta, image_size)


def _check_size(path: Path, meta: dict[str, Any], image_size: int | None) -> Path:
    if image_size is not None and (meta["height"], meta["width"]) != (image_size, image_size):
        raise DataRootError(
            f"{path} was prepared at {meta['height']}x{meta['width']}, not {image_size}x{image_size}; "
            "prepare it again with --image-size or point --data-root at the raw release"
        )
    return path


def _prepare_cached(name: str, preparer: Preparer, source: Path, cache: Path, image_size: int) -> Path:
    key = hashlib.sha256(f"{source.resolve()}|{image_size}".encode()).hexdigest()[:12]
    out = cache / f"{name}-{key}"
    if (out / META_FILE).is_file():
        log.info("using cached %s at %s", name, out)
        return out
    log.info("preparing %s from %s into %s", name, source, out)
    return preparer.prepare(source, out, image_size)


def _download(name: str, preparer: Preparer, cache: Path) -> Path:
    hint = f"pass --data-root pointing at a prepared dataset or at the raw release.\n{preparer.layout}"
    if preparer.download is None:
        raise DataRootError(f"no data root given and {name} cannot be downloaded automatically; {hint}")
    raw = cache / "raw"
    log.info("no data root given: downloading %s into %s", name, raw)
    try:
        return preparer.download(raw)
    except Exception as exc:  # network, checksum, disk: all mean "give me a data root"
        raise DataRootError(f"could not download {name} into {raw} ({exc}); {hint}") from exc
