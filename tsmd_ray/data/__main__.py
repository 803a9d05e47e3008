"""Command line: ``python -m tsmd_ray.data prepare <dataset> --source PATH --out PATH``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import DataError
from .registry import PREPARERS


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``python -m tsmd_ray.data``."""
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.data", description="tsmd-ray dataset tools")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="convert a raw dataset release into the Arrow format",
        description="Convert a raw dataset release into a prepared dataset directory "
        "(images.arrow + meta.json, see docs/data.md). The directory is written atomically; "
        "an existing prepared dataset there is replaced.",
    )
    prepare.add_argument("dataset", choices=sorted(PREPARERS), help="dataset name")
    prepare.add_argument("--source", type=Path, required=True, help="folder holding the raw release")
    prepare.add_argument("--out", type=Path, required=True, help="prepared dataset directory to write")
    prepare.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="output height and width in pixels (default: the dataset's own: 28 for omniglot, 32 for cifar_fs and fc100, 84 otherwise)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    preparer = PREPARERS[args.dataset]
    try:
        out = preparer.prepare(args.source, args.out, args.image_size or preparer.default_image_size)
    except (DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
