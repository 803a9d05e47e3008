"""Episode sampling: reproducibility, label layout, validation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tsmd_ray.data import (
    ArrowFewShotDataset,
    EpisodeConfigError,
    EpisodeSampler,
    NotEnoughClassesError,
    NotEnoughImagesError,
    SplitError,
    write_dataset,
)


@pytest.fixture(scope="module")
def omniglot(omniglot_dataset: Path) -> ArrowFewShotDataset:
    return ArrowFewShotDataset(omniglot_dataset)


@pytest.fixture()
def tagged(tmp_path: Path) -> ArrowFewShotDataset:
    """8 train classes x 6 images; every pixel of image j of class c is ``10 * c + j``."""
    names = [f"c{c}" for c in range(8)]
    records = [
        (f"c{c}", "train", np.full((5, 5, 1), 10 * c + j, np.uint8)) for c in range(8) for j in range(6)
    ]
    preprocess = {"size": [5, 5], "channels": 1, "invert": False, "mean": [0.0], "std": [1 / 255]}
    return ArrowFewShotDataset(
        write_dataset(tmp_path / "tagged", "tagged", records, preprocess, {"train": names}, None)
    )


def _tags(x: torch.Tensor) -> np.ndarray:
    """Pixel tag of every image (``std = 1/255`` undoes the scaling)."""
    return x[..., 0, 0, 0].round().long().numpy()


def test_same_task_same_tensors_other_task_other_tensors(omniglot: ArrowFewShotDataset) -> None:
    sampler = EpisodeSampler(omniglot, "train", ways=5, shots=1, query=5, seed=3, views=2)
    again = EpisodeSampler(ArrowFewShotDataset(omniglot.path), "train", ways=5, shots=1, query=5, seed=3, views=2)
    first, second = sampler.sample(7), again.sample(7)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.support_x, sampler.sample(8).support_x)
    other_seed = EpisodeSampler(omniglot, "train", ways=5, shots=1, query=5, seed=4)
    assert not torch.equal(first.support_x, other_seed.sample(7).support_x)


def test_shapes_dtypes_and_normalisation(omniglot: ArrowFewShotDataset) -> None:
    episode = EpisodeSampler(omniglot, "val", ways=20, shots=5, query=15, seed=0).sample(0)
    assert episode.support_x.shape == (100, 1, 28, 28) and episode.query_x.shape == (300, 1, 28, 28)
    assert episode.support_x.dtype == torch.float32 and episode.support_y.dtype == torch.int64
    mean, std = omniglot.preprocess["mean"][0], omniglot.preprocess["std"][0]
    assert episode.query_x.min().item() == pytest.approx(-mean / std)  # background pixel
    assert abs(episode.query_x.mean().item()) < 0.5


def test_label_layout_is_class_major(tagged: ArrowFewShotDataset) -> None:
    episode = EpisodeSampler(tagged, "train", ways=4, shots=2, query=3, seed=0).sample(5)
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert episode.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    support, query = _tags(episode.support_x), _tags(episode.query_x)
    support_class, query_class = support // 10, query // 10
    assert len(set(support_class)) == 4
    for way in range(4):  # one dataset class per way, shared by support and query
        assert (
            set(support_class[2 * way : 2 * way + 2])
            == set(query_class[3 * way : 3 * way + 3])
            == {support_class[2 * way]}
        )
    assert len(set(support) | set(query)) == 4 * 5  # no image twice


def test_sample_batch_stacks_tasks(omniglot: ArrowFewShotDataset) -> None:
    sampler = EpisodeSampler(omniglot, "test", ways=5, shots=1, query=2, seed=1)
    batch = sampler.sample_batch([4, 9, 2])
    assert batch.support_x.shape == (3, 5, 1, 28, 28) and batch.query_y.shape == (3, 10)
    assert torch.equal(batch.query_x[1], sampler.sample(9).query_x)


def test_augmentation_is_reproducible_and_changes_images(omniglot: ArrowFewShotDataset) -> None:
    plain = EpisodeSampler(omniglot, "train", ways=5, shots=2, query=2, seed=0)
    augmented = EpisodeSampler(omniglot, "train", ways=5, shots=2, query=2, seed=0, augment=True)
    a, b = augmented.sample(11), augmented.sample(11)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, plain.sample(11).support_x)
    assert torch.equal(a.support_y, plain.sample(11).support_y)


@pytest.mark.parametrize("split, augment", [("train", True), ("val", False)])
def test_views_leave_the_episode_as_it_was(omniglot: ArrowFewShotDataset, split: str, augment: bool) -> None:
    plain = EpisodeSampler(omniglot, split, ways=5, shots=2, query=2, seed=0, augment=augment)
    viewed = EpisodeSampler(omniglot, split, ways=5, shots=2, query=2, seed=0, augment=augment, views=3)
    assert plain.sample(4).support_views is None
    for a, b in zip(plain.sample(4)[:4], viewed.sample(4)[:4], strict=True):
        assert torch.equal(a, b)
    batch = viewed.sample_batch([4, 6])
    assert batch.support_views.shape == (2, 30, 1, 28, 28) and plain.sample_batch([4, 6]).support_views is None
    assert torch.equal(batch.support_views[1], viewed.sample(6).support_views)


def test_an_image_gets_the_same_views_in_every_episode(tagged: ArrowFewShotDataset) -> None:
    """Without augmentation a support image's views depend on the seed and the image alone (what a
    client adapting on the same image reproduces); with augmentation, on the episode's stream."""
    sampler = EpisodeSampler(tagged, "train", ways=4, shots=2, query=3, seed=0, views=2)
    seen: dict[int, torch.Tensor] = {}
    repeated = 0
    for task in range(12):
        episode = sampler.sample(task)
        views = episode.support_views.unflatten(0, (2, 8))
        for j, tag in enumerate(_tags(episode.support_x)):
            if tag in seen:
                assert torch.equal(seen[tag], views[:, j])
                repeated += 1
            seen[tag] = views[:, j]
    assert repeated > 0
    augmented = EpisodeSampler(tagged, "train", ways=4, shots=2, query=3, seed=0, augment=True, views=2)
    assert not torch.equal(augmented.sample(0).support_views, sampler.sample(0).support_views)
    assert torch.equal(augmented.sample(0).support_views, augmented.sample(0).support_views)


def test_sampler_pickles(omniglot: ArrowFewShotDataset) -> None:
    sampler = EpisodeSampler(omniglot, "train", ways=5, shots=1, query=1, seed=2)
    clone = pickle.loads(pickle.dumps(sampler))
    assert torch.equal(clone.sample(3).query_x, sampler.sample(3).query_x)


def test_too_many_ways_names_split_and_numbers(omniglot: ArrowFewShotDataset) -> None:
    with pytest.raises(NotEnoughClassesError, match=r"ways=41.*'val'.*only 40 classes"):
        EpisodeSampler(omniglot, "val", ways=41, shots=1, query=1, seed=0)


def test_too_many_shots_names_the_class(omniglot: ArrowFewShotDataset) -> None:
    with pytest.raises(NotEnoughImagesError, match=r"shots\+query=21.*class 'Early_Aramaic/character01'.*20"):
        EpisodeSampler(omniglot, "test", ways=5, shots=6, query=15, seed=0)


@pytest.mark.parametrize("field", ["ways", "shots", "query"])
@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_non_positive_sizes(omniglot: ArrowFewShotDataset, field: str, value) -> None:
    sizes = {"ways": 5, "shots": 1, "query": 1, field: value}
    with pytest.raises(EpisodeConfigError, match=field):
        EpisodeSampler(omniglot, "train", seed=0, **sizes)


@pytest.mark.parametrize("views", [-1, 1.5, True])
def test_views_must_be_a_count(omniglot: ArrowFewShotDataset, views) -> None:
    with pytest.raises(EpisodeConfigError, match="views must be zero or a positive integer"):
        EpisodeSampler(omniglot, "train", ways=5, shots=1, query=1, seed=0, views=views)


def test_empty_split(tagged: ArrowFewShotDataset) -> None:
    assert tagged.split_labels("test").size == 0
    with pytest.raises(NotEnoughClassesError, match=r"'test'.*only 0 classes"):
        EpisodeSampler(tagged, "test", ways=2, shots=1, query=1, seed=0)


def test_unknown_split(omniglot: ArrowFewShotDataset) -> None:
    with pytest.raises(SplitError, match="'validation'"):
        EpisodeSampler(omniglot, "validation", ways=5, shots=1, query=1, seed=0)
    assert issubclass(SplitError, ValueError) and issubclass(NotEnoughImagesError, ValueError)
