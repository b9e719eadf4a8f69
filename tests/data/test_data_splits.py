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


def test_an_empty_validation_split_blames_small_classes_not_the_fraction() -> None:
    # Two classes of 2 training images and one of 1: 0.1 x 2 rounds to none, and a lone image stays for training.
    labels, is_train = np.array([0, 0, 1, 1, 2]), np.ones(5, dtype=bool)
    with pytest.raises(DataError) as info:
        split_indices(labels, is_train, "val", 0.1, 0)
    # 0.1 x n first rounds to 1 at n = 5.
    assert str(info.value) == (
        "split 'val' is empty: the classes are too small for data.val_fraction=0.1 (the largest has 2 training "
        "images; a class needs 5 to give one validation image and keep one for training); raise "
        "data.val_fraction to at least 0.5 / 2, or set data.val_fraction=0 to train without a validation split"
    )
    # The remedy works: 0.5 / 2 holds out one image of each two-image class.
    assert split_indices(labels, is_train, "val", 0.5 / 2, 0).size == 2
    with pytest.raises(DataError, match=r"the largest has 1 training image; .* set data.val_fraction=0 to train"):
        split_indices(np.array([0, 1, 2]), np.ones(3, dtype=bool), "val", 0.4, 0)
