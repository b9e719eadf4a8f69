"""Splits: the official train / test split, and a validation split carved from the train split.

Model selection happens on ``"val"``, never on ``"test"`` (the official code selects on the test split).

============== ===============================================================================
``train_full`` the whole official train split
``train``      ``train_full`` minus ``val``
``val``        per class, ``round(val_fraction * n_c)`` of its ``n_c`` training images (at most
               ``n_c - 1``: every class keeps a training image), chosen by ``val_seed``
``test``       the official test split
============== ===============================================================================
"""

from __future__ import annotations

import math

import numpy as np

from ivpt.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test", "train_full")


def held_out(fraction: float, count: int) -> int:
    """Validation images taken from a class of ``count`` training images: ``round(fraction * count)``,
    at most ``count - 1``."""
    return min(int(fraction * count + 0.5), count - 1)


def validation_indices(labels: np.ndarray, candidates: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified, deterministic choice of validation images.

    Args:
        labels: ``(N,)`` class index of every image.
        candidates: ``(M,)`` sorted indices of the images to choose from (the official train split).
        fraction: share of each class to hold out, in ``[0, 1)``.
        seed: the choice depends only on this seed, ``labels`` and ``candidates``.

    Returns:
        Sorted ``(V,)`` indices, a subset of ``candidates``.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"config key 'data.val_fraction': must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    candidate_labels = labels[candidates]
    for label in np.unique(candidate_labels):
        members = candidates[candidate_labels == label]
        count = held_out(fraction, len(members))
        # Permute every class, even when it gives nothing, so one class's size never shifts another's draw.
        order = rng.permutation(len(members))
        chosen.append(members[order[:count]])
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_indices(
    labels: np.ndarray, is_train: np.ndarray, split: str, val_fraction: float, val_seed: int
) -> np.ndarray:
    """Sorted indices of the images in ``split`` (one of :data:`SPLITS`)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': expected one of {', '.join(SPLITS)}")
    if split == "test":
        return np.flatnonzero(~is_train)
    train_full = np.flatnonzero(is_train)
    if split == "train_full":
        return train_full
    val = validation_indices(labels, train_full, val_fraction, val_seed)
    if split == "train":
        return np.setdiff1d(train_full, val)
    if val.size == 0 and val_fraction > 0:
        largest = int(np.bincount(labels[train_full]).max()) if train_full.size else 0
        needed = max(2, math.ceil(0.5 / val_fraction))  # then corrected for float rounding
        while held_out(val_fraction, needed) < 1:
            needed += 1
        while needed > 2 and held_out(val_fraction, needed - 1) >= 1:
            needed -= 1
        remedy = (
            f"raise data.val_fraction to at least 0.5 / {largest}, or set data.val_fraction=0"
            if largest >= 2
            else "set data.val_fraction=0"
        )
        raise DataError(
            f"split 'val' is empty: the classes are too small for data.val_fraction={val_fraction} (the largest "
            f"has {largest} training image{'s' if largest != 1 else ''}; a class needs {needed} to give one "
            f"validation image and keep one for training); {remedy} to train without a validation split"
        )
    if val.size == 0:
        raise DataError(
            f"split 'val' is empty (data.val_fraction={val_fraction}); set data.val_fraction > 0, "
            f"e.g. data.val_fraction=0.1, to hold out validation images"
        )
    return val


__all__ = ["SPLITS", "held_out", "split_indices", "validation_indices"]
