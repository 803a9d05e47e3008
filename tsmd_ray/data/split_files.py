"""The fixed class splits of the prepared datasets: ``splits/<name>.json`` (docs/data.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .arrow import SPLITS

SPLIT_DIR = Path(__file__).parent / "splits"


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
