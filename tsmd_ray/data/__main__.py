"""Command line: ``python -m tsmd_ray.data prepare <dataset|folder|manifest> --source PATH --out PATH``."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from ..errors import entry_point
from ..preflight import check_minimum, check_out_dir
from . import folder
from .errors import DataError
from .registry import PREPARERS

OWN = ("folder", "manifest")  # your own images; the other names are the benchmarks of PREPARERS


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``python -m tsmd_ray.data``."""
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.data", description="tsmd-ray dataset tools")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="convert a dataset release or your own labelled images into the Arrow format",
        description="Convert a benchmark release, or your own labelled images (folder: an ImageFolder tree "
        "SOURCE/<class>/<image>; manifest: a .csv or .parquet table with columns path,label, paths relative "
        "to the table), into a prepared dataset directory (images.arrow + meta.json, see docs/data.md). "
        "The directory is written atomically; an existing prepared dataset there is replaced.",
    )
    prepare.add_argument("dataset", choices=[*sorted(PREPARERS), *OWN], help="dataset name, or folder / manifest")
    prepare.add_argument("--source", type=Path, required=True, help="the raw release, image folder or table")
    prepare.add_argument("--out", type=Path, required=True, help="prepared dataset directory to write")
    prepare.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="output height and width in pixels (default: the dataset's own: 28 for omniglot, 32 for "
        f"cifar_fs and fc100, 84 otherwise; {folder.DEFAULT_IMAGE_SIZE} for folder and manifest)",
    )
    _own_options(prepare.add_argument_group("your own images (folder and manifest only)"))
    return parser


def _own_options(group: argparse._ArgumentGroup) -> None:
    """Options that only ``folder`` and ``manifest`` take; absent from the namespace unless given."""
    add = functools.partial(group.add_argument, default=argparse.SUPPRESS)
    add("--depth", type=int, help="folder levels that name a class, e.g. 2 for Alphabet/character01 (default 1)")
    add("--channels", type=int, choices=(1, 3), help="1 (grayscale) or 3 (RGB, default); sources are converted")
    add("--invert", action="store_true", help="store 255 - pixel (dark strokes on a white background)")
    add("--split", type=_ratios, dest="ratios", metavar="TRAIN,VAL,TEST",
        help="class split ratios, random with --seed (default 0.6,0.2,0.2)")
    add("--split-dir", type=Path, help="folder with train.txt, val.txt, test.txt: one class per line, all listed")
    add("--seed", type=int, help="seed of the ratio split (default 0)")
    add("--min-images", type=int, help="leave out classes with fewer usable images (default 2); training "
        "leaves out of its episodes the classes with fewer than shots+query images")
    add("--strict", action="store_true", help="refuse the first unreadable image instead of skipping it")
    add("--workers", type=int, help="decoding processes (default: one per core)")


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers TRAIN,VAL,TEST (e.g. 0.6,0.2,0.2), got {text!r}")
    return values


def _check_paths(args: argparse.Namespace) -> None:
    """``--out`` can be a folder and ``--image-size`` is positive, before anything is read (each
    preparer checks its ``--source``)."""
    check_out_dir("--out", args.out)
    check_minimum("--image-size", args.image_size, 1)


def _prepare(args: argparse.Namespace) -> Path:
    _check_paths(args)
    own = {k: v for k, v in vars(args).items() if k not in ("command", "dataset", "source", "out", "image_size")}
    if args.dataset not in OWN:
        if own:
            raise DataError(f"--{next(iter(own)).replace('_', '-')} applies to folder and manifest only")
        preparer = PREPARERS[args.dataset]
        return preparer.prepare(args.source, args.out, args.image_size or preparer.default_image_size)
    if args.dataset == "manifest" and "depth" in own:
        raise DataError("--depth applies to folder only")
    if {"ratios", "split_dir"} <= set(own):
        raise DataError("give --split or --split-dir, not both")
    depth = own.pop("depth", 1)
    options = folder.PrepareOptions(image_size=args.image_size or folder.DEFAULT_IMAGE_SIZE, **own)
    options.check()
    if args.dataset == "folder":
        return folder.prepare_folder(args.source, args.out, depth, options)
    return folder.prepare_manifest(args.source, args.out, options)


def _main(args: argparse.Namespace) -> int:
    print(_prepare(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: a refused request, one line)."""
    return entry_point("tsmd_ray.data", lambda: _main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
