"""The pre-training epoch loop's pieces: DDP shards and the meta-training classes it trains on."""
from __future__ import annotations

import numpy as np

from tsmd_ray.data import ArrowFewShotDataset
from tsmd_ray.pretrain_worker import epoch_shard, train_rows


def test_epoch_shards_are_disjoint_and_equal():
    shards = [epoch_shard(103, 3, 0, rank, 3, 8) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    rows = np.concatenate([b for s in shards for b in s])
    assert len(rows) == len(set(rows.tolist()))
    assert epoch_shard(103, 3, 0, 1, 3, 8)[0].tolist() == shards[1][0].tolist()  # seeded
    assert epoch_shard(103, 4, 0, 1, 3, 8)[0].tolist() != shards[1][0].tolist()  # reshuffled per epoch


def test_train_rows_cover_only_the_meta_training_classes(omniglot_dataset):
    dataset = ArrowFewShotDataset(omniglot_dataset)
    rows, targets, classes = train_rows(dataset)
    assert classes == len(dataset.split_labels("train")) == 163
    assert set(dataset.labels[rows].tolist()) == set(dataset.split_labels("train").tolist())
    assert targets.min() == 0 and targets.max() == classes - 1
