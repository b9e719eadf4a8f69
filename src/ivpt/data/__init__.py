"""Data sets, transforms, the synthetic part data set and ``ivpt data-check``.

>>> train = build_dataset(cfg, "train")           # augmented (cfg.data.augment)
>>> test = build_dataset(cfg, "test", bbox_crop=True, with_masks=True)
>>> sample = test[0]                               # image, label, index, keypoints, bbox, mask

Sources (``cfg.data.dataset``): ``"cub"`` and ``"nabirds"`` in their official layouts
(:mod:`ivpt.data.annotations`) and ``"folder"`` for class sub-folders (:mod:`ivpt.data.folder`).
Splits (:mod:`ivpt.data.splits`): ``"train"``, ``"val"``, ``"test"``, ``"train_full"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ivpt.data.annotations import Annotations
from ivpt.data.check import check_dataset
from ivpt.data.dataset import PartImageDataset
from ivpt.data.sources import DATASETS, load_annotations, read_annotations
from ivpt.data.splits import SPLITS, split_indices
from ivpt.data.synthetic import make_synthetic
from ivpt.data.transforms import SampleTransform
from ivpt.errors import DataError

if TYPE_CHECKING:
    from ivpt.config import Config


def build_dataset(
    cfg: Config,
    split: str,
    *,
    train_transform: bool | None = None,
    bbox_crop: bool = False,
    with_masks: bool = False,
    annotations: Annotations | None = None,
) -> PartImageDataset:
    """Build one split of the data set described by ``cfg.data`` at resolution ``cfg.model.img_size``.

    Unset ``model.img_size`` / ``data.mean`` / ``data.std`` come from the backbone
    (:func:`ivpt.model.preprocessing.preprocessing_of`).

    Args:
        cfg: the run's config (``data`` section, ``model.img_size`` and ``model.arch``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"train_full"``.
        train_transform: apply ``cfg.data.augment``; ``None`` means "for the train splits only".
        bbox_crop: crop each image to its bounding box, resized to ``img_size x img_size``.
        with_masks: add each sample's segmentation ``mask``.
        annotations: reuse annotations read before (from :func:`load_annotations`) instead of re-reading.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': expected one of {', '.join(SPLITS)}")
    data = cfg.data
    notes = annotations if annotations is not None else load_annotations(data)
    indices = split_indices(notes.labels, notes.is_train, split, data.val_fraction, data.val_seed)
    augment_now = split in ("train", "train_full") if train_transform is None else train_transform
    from ivpt.model.preprocessing import preprocessing_of

    prep = preprocessing_of(cfg)
    transform = SampleTransform(prep.img_size, data.augment if augment_now else "none", mean=prep.mean, std=prep.std)
    return PartImageDataset(
        notes, indices, transform, bbox_crop=bbox_crop, with_masks=with_masks, jpeg_draft=data.jpeg_draft
    )


__all__ = [
    "DATASETS",
    "SPLITS",
    "Annotations",
    "PartImageDataset",
    "SampleTransform",
    "build_dataset",
    "check_dataset",
    "load_annotations",
    "make_synthetic",
    "read_annotations",
]
