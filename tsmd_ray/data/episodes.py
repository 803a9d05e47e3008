"""Reproducible N-way K-shot episode sampling from an ``ArrowFewShotDataset``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .arrow import SPLITS, ArrowFewShotDataset
from .errors import EpisodeConfigError, NotEnoughClassesError, NotEnoughImagesError
from .transforms import augment as augment_batch
from .transforms import augmented_views, normalise

SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}  # train 0, val 1, test 2
LEAVE_OUT = "leave_out"  # meta["sampling"]["small_classes"]: skip classes smaller than shots + query
log = logging.getLogger(__name__)


class Episode(NamedTuple):
    """One task (or a stack of tasks with a leading T dimension).

    ``*_x``: float32 ``(N*K, C, H, W)``, normalised; ``*_y``: int64 in ``0..ways-1``.
    Support and query are both class-major: rows ``i*K .. i*K+K-1`` belong to class ``i``.
    ``support_views``: ``(V*N*K, C, H, W)`` augmented views of the support images, view-major
    (row ``v*N*K + j`` is view ``v`` of support row ``j``), or ``None`` without views.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    support_views: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """Move every tensor to ``device``."""
        return Episode(*(t if t is None else t.to(device, non_blocking=non_blocking) for t in self))


class EpisodeSampler:
    """Samples ``ways``-way episodes with ``shots`` support and ``query`` query images per class.

    Episode ``task_id`` depends only on ``(seed, split, task_id)``: classes and images are drawn
    from ``numpy.random.default_rng([seed, split_code, task_id])`` and augmentation (train-time
    crop/flip/jitter, ``augment=True``) from a ``torch.Generator`` seeded by that same stream.
    ``views`` > 0 adds that many augmented views of each (unaugmented) support image
    (:func:`~.transforms.augmented_views`), seeded by ``seed`` and the image itself, or, with
    ``augment``, by a draw from the episode's stream: without augmentation an image gets the same
    views in every episode and wherever else it is viewed with the same seed (a client's support folder).
    Pickles cheaply (the dataset pickles as its path). A class with fewer than ``shots + query``
    images is an error, unless the dataset's ``meta["sampling"]["small_classes"]`` is
    ``"leave_out"`` (datasets prepared from your own images): then it is left out (``left_out``).
    """

    def __init__(
        self,
        dataset: ArrowFewShotDataset,
        split: str,
        ways: int,
        shots: int,
        query: int,
        seed: int,
        augment: bool = False,
        views: int = 0,
    ) -> None:
        _check_counts(1, ways=ways, shots=shots, query=query)
        _check_counts(0, views=views)
        self.dataset, self.split, self.seed, self.augment, self.views = dataset, split, seed, augment, views
        self.ways, self.shots, self.query = ways, shots, query
        self._labels = dataset.split_labels(split)
        self.left_out: dict[str, int] = {}  # class name -> images, of the classes too small to sample
        if dataset.meta.get("sampling", {}).get("small_classes") == LEAVE_OUT:
            self._leave_out_small_classes()
        self._ranges = dataset.class_ranges[self._labels]
        self._check_sizes()

    def _leave_out_small_classes(self) -> None:
        """Drop the split's classes with fewer than ``shots + query`` images (logged, in ``left_out``)."""
        ranges = self.dataset.class_ranges[self._labels]
        counts = ranges[:, 1] - ranges[:, 0]
        small = counts < self.shots + self.query
        names = self.dataset.class_names
        self.left_out = {names[label]: int(n) for label, n in zip(self._labels[small], counts[small], strict=True)}
        if self.left_out:
            examples = ", ".join(f"{name!r} ({n})" for name, n in list(self.left_out.items())[:5])
            log.warning(
                "split %r of %s: left out %d of %d classes with fewer than shots+query=%d images: %s%s",
                self.split, self.dataset.path, len(self.left_out), len(counts), self.shots + self.query,
                examples, " ..." * (len(self.left_out) > 5),
            )
        self._labels = self._labels[~small]

    def _check_sizes(self) -> None:
        needed = self.shots + self.query
        if self.ways > len(self._labels):
            usable = f" with shots+query={needed} images ({len(self.left_out)} left out)" if self.left_out else ""
            raise NotEnoughClassesError(
                f"ways={self.ways} but split {self.split!r} of {self.dataset.path} has only "
                f"{len(self._labels)} classes{usable}"
            )
        counts = self._ranges[:, 1] - self._ranges[:, 0]
        if counts.min() < needed:
            worst = int(np.argmin(counts))
            name = self.dataset.class_names[self._labels[worst]]
            raise NotEnoughImagesError(
                f"shots+query={needed} but class {name!r} in split {self.split!r} has only "
                f"{counts[worst]} images"
            )

    def _rows(self, rng: np.random.Generator) -> np.ndarray:
        """Row indices, ``(ways, shots + query)``, class-major."""
        picked = self._ranges[rng.choice(len(self._ranges), self.ways, replace=False)]
        per_class = self.shots + self.query
        rows = [start + rng.choice(stop - start, per_class, replace=False) for start, stop in picked]
        return np.stack(rows)

    def sample(self, task_id: int) -> Episode:
        """The episode of ``task_id`` (same arguments -> identical tensors)."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], task_id])
        rows = self._rows(rng)
        images = torch.from_numpy(self.dataset.images[rows.ravel()]).permute(0, 3, 1, 2).contiguous()
        x = images
        if self.augment:
            generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
            x = augment_batch(x.float() / 255.0, generator)
        x = normalise(x, self.dataset.preprocess).unflatten(0, rows.shape)
        labels = torch.arange(self.ways).view(-1, 1)
        return Episode(
            support_x=x[:, : self.shots].flatten(0, 1),
            support_y=labels.expand(-1, self.shots).flatten(),
            query_x=x[:, self.shots :].flatten(0, 1),
            query_y=labels.expand(-1, self.query).flatten(),
            support_views=self._views(images.unflatten(0, rows.shape)[:, : self.shots].flatten(0, 1), rng),
        )

    def _views(self, support: torch.Tensor, rng: np.random.Generator) -> torch.Tensor | None:
        """``views`` augmented views of the uint8 ``support`` images, or ``None`` without views."""
        if not self.views:
            return None
        seed = int(rng.integers(2**63 - 1)) if self.augment else self.seed
        preprocess = self.dataset.preprocess
        return augmented_views(normalise(support, preprocess), self.views, seed, preprocess)

    def sample_batch(self, task_ids: Sequence[int]) -> Episode:
        """Episodes of ``task_ids`` stacked on a leading task dimension ``(T, N*K, C, H, W)``."""
        episodes = [self.sample(task_id) for task_id in task_ids]
        if not episodes:
            raise EpisodeConfigError("sample_batch needs at least one task id")
        fields = zip(*episodes, strict=True)
        return Episode(*(None if field[0] is None else torch.stack(field) for field in fields))


def _check_counts(minimum: int, **values: int) -> None:
    accepted = "a positive integer" if minimum else "zero or a positive integer"
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise EpisodeConfigError(f"{name} must be {accepted}, got {value!r}")
