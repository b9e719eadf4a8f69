"""The validation split: stratified, disjoint from train, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from ivpt.data.splits import split_indices, validation_indices
from ivpt.errors import DataError

# 4 classes with 10, 7, 2 and 1 official training images, plus 5 test images.
LABELS = np.array([0] * 10 + [1] * 7 + [2] * 2 + [3] * 1 + [0, 1, 2, 3, 3])
IS_TRAIN = np.array([True] * 20 + [False] * 5)


def test_validation_is_stratified_and_leaves_a_training_image_per_class() -> None:
    val = split_indices(LABELS, IS_TRAIN, "val", 0.3, val_seed=0)
    # round(0.3 * n) per class, capped at n - 1: 10 -> 3, 7 -> 2, 2 -> 1, 1 -> 0.
    assert np.bincount(LABELS[val], minlength=4).tolist() == [3, 2, 1, 0]
    train = split_indices(LABELS, IS_TRAIN, "train", 0.3, val_seed=0)
    assert np.bincount(LABELS[train], minlength=4).tolist() == [7, 5, 1, 1]
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == split_indices(LABELS, IS_TRAIN, "train_full", 0.3, 0).tolist()
    assert split_indices(LABELS, IS_TRAIN, "test", 0.3, 0).tolist() == list(range(20, 25))


def test_validation_is_deterministic_and_depends_on_the_seed() -> None:
    candidates = np.flatnonzero(IS_TRAIN)
    first = validation_indices(LABELS, candidates, 0.5, seed=7)
    assert np.array_equal(first, validation_indices(LABELS, candidates, 0.5, seed=7))
    others = {tuple(validation_indices(LABELS, candidates, 0.5, seed=s)) for s in range(8, 14)}
    assert len(others | {tuple(first)}) > 1


def test_bad_fraction_and_split_names() -> None:
    with pytest.raises(DataError, match=r"'data.val_fraction': must be in \[0, 1\), got 1.0"):
        validation_indices(LABELS, np.flatnonzero(IS_TRAIN), 1.0, 0)
    with pytest.raises(DataError, match="split 'val' is empty"):
        split_indices(LABELS, IS_TRAIN, "val", 0.0, 0)
