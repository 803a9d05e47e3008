"""Decoding image files in parallel, in order, in bounded memory (used by ``folder.py``)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

import numpy as np

from .transforms import image_channels, open_image, to_array

BATCH = 32  # images per task sent to a worker process
WINDOW = 2  # batches in flight per worker: bounds the decoded images held at once

Job = TypeVar("Job")


@dataclass(frozen=True)
class Decoded:
    """One file's outcome: the preprocessed image and a digest of its pixels, or why it failed."""

    array: np.ndarray | None  # uint8 (H, W, C) after preprocessing
    digest: bytes | None  # of the decoded pixels before resizing: equal digests are exact duplicates
    error: str | None = None  # one line naming the file
    converted: str | None = None  # the source mode, when it had neither 1 nor 3 channels


def decode_image(path: str, preprocess: Mapping[str, Any]) -> Decoded:
    """Read ``path``, apply its EXIF orientation and ``preprocess``; errors are returned, not raised.

    Sources with alpha, CMYK or two channels are converted to RGB first (``converted``).
    """
    try:
        image = open_image(path, path)  # EXIF orientation applied
        digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
        digest.update(image.tobytes())
        converted = image.mode if image_channels(image) not in (1, 3) else None
        if converted:
            image = image.convert("RGB")
        return Decoded(to_array(image, preprocess, path), digest.digest(), converted=converted)
    except Exception as exc:  # a bad file is reported by the caller, never fatal here
        message = str(exc) if path in str(exc) else f"cannot read image {path}: {exc}"
        return Decoded(None, None, error=" ".join(message.split()))


def _decode_batch(paths: list[str], preprocess: Mapping[str, Any]) -> list[Decoded]:
    return [decode_image(path, preprocess) for path in paths]


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_stream(
    jobs: Iterable[tuple[str, Job]], preprocess: Mapping[str, Any], workers: int
) -> Iterator[tuple[Job, Decoded]]:
    """Decode the ``(path, job)`` pairs on ``workers`` processes; yields ``(job, Decoded)`` in order.

    At most ``WINDOW * workers`` batches of ``BATCH`` images are in flight, so memory does not
    depend on the number of jobs. ``workers <= 1`` decodes in this process.
    """
    pending = iter(jobs)
    batches = iter(lambda: list(islice(pending, BATCH)), [])
    if workers <= 1:
        for batch in batches:
            yield from ((job, decode_image(path, preprocess)) for path, job in batch)
        return
    # fork: the workers need only PIL and numpy and start at once (spawn would re-import torch)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    window: deque[tuple[list[tuple[str, Job]], Future[list[Decoded]]]] = deque()
    try:
        for batch in batches:
            window.append((batch, pool.submit(_decode_batch, [path for path, _ in batch], preprocess)))
            if len(window) >= WINDOW * workers:
                yield from _done(*window.popleft())
        while window:
            yield from _done(*window.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _done(batch: list[tuple[str, Job]], future: Future[list[Decoded]]) -> Iterator[tuple[Job, Decoded]]:
    yield from zip((job for _, job in batch), future.result(), strict=True)
