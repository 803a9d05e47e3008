"""Preparation of the official Omniglot release (Lake et al. 2015) into the Arrow format."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .arrow import SPLITS
from .arrow_write import Record, write_dataset
from .errors import DataError, DataRootError, ImageReadError, SplitError
from .transforms import open_image, to_array

log = logging.getLogger(__name__)

SPLIT_FILE = Path(__file__).parent / "splits" / "omniglot.json"
DEFAULT_IMAGE_SIZE = 28
TORCHVISION_FOLDER = "omniglot-py"  # torchvision.datasets.Omniglot keeps the release here
_ROOT_NAME = re.compile(r"^images_(background(_small\d+)?|evaluation)$")
_SMALL_ROOT_NAME = re.compile(r"^images_background_small\d+$")
LAYOUT = """\
Expected Omniglot layout (official release, github.com/brendenlake/omniglot, python/):
  <source>/images_background.zip | images_background/          (and/or images_background_small1, _small2)
  <source>/images_evaluation.zip  | images_evaluation/
  each holding <root>/<Alphabet>/characterNN/<drawing>.png (105x105);
  a torchvision root (<source>/omniglot-py/...) works too"""


@dataclass(frozen=True)
class _Root:
    name: str  # e.g. images_background_small1
    path: Path  # the zip file or the extracted folder


@dataclass
class _Character:
    split: str
    root: _Root
    members: list[str]  # image paths relative to the zip / folder


def _find_roots(source: Path) -> list[_Root]:
    """Release roots (zips or folders) at ``source``; a zip wins over a same-named folder."""
    if (source / TORCHVISION_FOLDER).is_dir():
        source = source / TORCHVISION_FOLDER
    candidates = [source] if _root_name(source) else sorted(source.iterdir()) if source.is_dir() else []
    roots: dict[str, _Root] = {}
    for path in candidates:
        name = _root_name(path)
        if name and (name not in roots or path.suffix == ".zip"):
            roots[name] = _Root(name, path)
    return sorted(roots.values(), key=lambda root: root.name)


def _root_name(path: Path) -> str | None:
    is_zip = path.suffix == ".zip" and path.is_file()
    name = path.stem if is_zip else path.name
    return name if (is_zip or path.is_dir()) and _ROOT_NAME.match(name) else None


def is_omniglot_release(path: Path) -> bool:
    """Whether ``path`` holds (or is) an Omniglot release root."""
    return path.exists() and bool(_find_roots(path))


def _list_images(root: _Root) -> list[str]:
    """``<Alphabet>/<character>/<file>.png`` paths (a zip's top folder kept as the first part)."""
    if root.path.is_dir():
        return sorted(p.relative_to(root.path).as_posix() for p in root.path.glob("*/*/*.png"))
    try:
        with zipfile.ZipFile(root.path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataRootError(f"cannot read {root.path}: {exc}\n{LAYOUT}") from exc
    return sorted(
        n for n in names if n.endswith(".png") and n.count("/") == 3 and not n.startswith("__MACOSX")
    )


def _split_profile(roots: list[_Root]) -> tuple[str, dict[str, str]]:
    """The profile name for ``roots`` and its alphabet -> split mapping from ``SPLIT_FILE``."""
    profile = "background_small" if all(_SMALL_ROOT_NAME.match(r.name) for r in roots) else "full"
    table = json.loads(SPLIT_FILE.read_text())["profiles"][profile]
    return profile, {alphabet: split for split in SPLITS for alphabet in table[split]}


def _characters(roots: list[_Root], split_of: dict[str, str], profile: str) -> dict[str, _Character]:
    chars: dict[str, _Character] = {}
    duplicates = 0
    for root in roots:
        found: dict[str, list[str]] = {}
        for member in _list_images(root):
            alphabet, character = member.split("/")[-3:-1]
            found.setdefault(f"{alphabet}/{character}", []).append(member)
        for key, members in found.items():
            if key in chars:
                duplicates += 1
                continue
            alphabet = key.split("/")[0]
            if alphabet not in split_of:
                raise SplitError(
                    f"alphabet {alphabet!r} (in {root.path}) is not listed in "
                    f"profile {profile!r} of {SPLIT_FILE}"
                )
            chars[key] = _Character(split_of[alphabet], root, members)
    log.info("omniglot: %d characters, %d duplicates skipped", len(chars), duplicates)
    return dict(sorted(chars.items()))


def _read(char: _Character, member: str, archives: dict[Path, zipfile.ZipFile]) -> Image.Image:
    if char.root.path.is_dir():
        path = char.root.path / member
        return open_image(path, str(path))
    name = f"{char.root.path}:{member}"
    try:
        data = archives[char.root.path].read(member)
    except Exception as exc:
        raise ImageReadError(f"cannot read image {name}: {exc}") from exc
    return open_image(io.BytesIO(data), name)


def _records(chars: dict[str, _Character], preprocess: dict) -> Iterator[Record]:
    total = sum(len(c.members) for c in chars.values())
    with ExitStack() as stack:
        zips = {c.root.path for c in chars.values() if not c.root.path.is_dir()}
        archives = {path: stack.enter_context(zipfile.ZipFile(path)) for path in zips}
        bar = stack.enter_context(tqdm(total=total, desc="omniglot", unit="img"))
        for key, char in chars.items():
            for member in char.members:
                image = _read(char, member, archives)
                yield key, char.split, to_array(image, preprocess, f"{char.root.path}:{member}")
                bar.update()


def prepare_omniglot(
    source: str | os.PathLike, out: str | os.PathLike, image_size: int = DEFAULT_IMAGE_SIZE
) -> Path:
    """Prepare the Omniglot release at ``source`` into the dataset directory ``out``; returns ``out``.

    Characters present in several roots (key ``alphabet/character``) are read once; images are
    resized to ``image_size`` (LANCZOS), inverted (strokes bright, background 0), 1 channel.
    The alphabet split comes from ``splits/omniglot.json``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    source = Path(source)
    roots = _find_roots(source)
    if not roots:
        raise DataRootError(f"no Omniglot release found at {source}\n{LAYOUT}")
    profile, split_of = _split_profile(roots)
    chars = _characters(roots, split_of, profile)
    if not chars:
        raise DataRootError(f"no character images found in {[str(r.path) for r in roots]}\n{LAYOUT}")
    preprocess = {"size": [image_size, image_size], "channels": 1, "invert": True}
    splits = {s: [k for k, c in chars.items() if c.split == s] for s in SPLITS}
    source_info = {
        "path": str(source.resolve()),
        "roots": [r.path.name for r in roots],
        "profile": profile,
        "split_file": f"tsmd_ray/data/splits/{SPLIT_FILE.name}",
    }
    return write_dataset(out, "omniglot", _records(chars, preprocess), preprocess, splits, source_info)


def download_omniglot(raw_dir: Path) -> Path:
    """Download the full release with torchvision into ``raw_dir``; returns the release folder."""
    from torchvision.datasets import Omniglot

    for background in (True, False):
        Omniglot(root=str(raw_dir), background=background, download=True)
    return raw_dir
