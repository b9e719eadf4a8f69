"""The map-style data set shared by CUB-200-2011, NABirds and image folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ivpt.data.annotations import Annotations
from ivpt.data.images import decode_image, open_image, size_mismatch
from ivpt.data.transforms import SampleTransform
from ivpt.errors import DataError


class PartImageDataset(Dataset):
    """A split of an annotated image collection.

    ``dataset[i]`` is a dict (docs/ARCHITECTURE.md, "A sample"): ``image (3, S, S)`` ``uint8`` (the
    model's input is ``transform.normalize(image)``, applied per batch on the device),
    ``label`` int, ``index`` int (= ``i``), ``keypoints (P, 3)`` ``(x, y, visible)`` and
    ``bbox (4,)`` ``(x_min, y_min, x_max, y_max)`` in output pixel-centre coordinates, and with
    ``with_masks`` a ``mask (S, S)`` foreground probability. All samples share ``P``, so torch's default
    collate batches them.

    Args:
        annotations: the whole collection.
        indices: positions in ``annotations`` that form this split.
        transform: image + geometry transform.
        bbox_crop: crop every image to its box and resize the crop to ``S x S`` before the transform.
        with_masks: also return the segmentation mask (requires ``segmentations/``).
        jpeg_draft: decode a JPEG at 1/2, 1/4 or 1/8 of its size when the transform's resize shrinks it by
            at least that factor (:func:`ivpt.data.images.decode_image`); keypoints, boxes and masks keep
            the full-size geometry.
    """

    def __init__(
        self,
        annotations: Annotations,
        indices: Sequence[int] | np.ndarray,
        transform: SampleTransform,
        *,
        bbox_crop: bool = False,
        with_masks: bool = False,
        jpeg_draft: bool = False,
    ) -> None:
        if with_masks and annotations.mask_paths is None:
            raise DataError(f"masks were requested but '{annotations.root}' has no segmentations/ folder")
        self.annotations = annotations
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.bbox_crop = bbox_crop
        self.with_masks = with_masks
        self.jpeg_draft = jpeg_draft

    @property
    def class_names(self) -> list[str]:
        return self.annotations.class_names

    @property
    def part_names(self) -> list[str]:
        return self.annotations.part_names

    @property
    def num_classes(self) -> int:
        return len(self.annotations.class_names)

    @property
    def has_parts(self) -> bool:
        return bool(self.annotations.part_names)

    @property
    def has_masks(self) -> bool:
        """Whether segmentation masks exist on disk (``with_masks=True`` then returns them)."""
        return self.annotations.mask_paths is not None

    @property
    def labels(self) -> list[int]:
        """Class index of every sample, without decoding any image."""
        return self.annotations.labels[self.indices].tolist()

    def image_path(self, index: int) -> Path:
        """Source file of sample ``index``."""
        return self.annotations.image_paths[self.indices[index]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.indices):
            raise IndexError(f"sample {index} out of range for a split of {len(self.indices)} images")
        source = int(self.indices[index])
        notes = self.annotations
        boxes = notes.boxes

        def box_of(width: int, height: int) -> np.ndarray:
            if boxes is None:
                return np.array([0.0, 0.0, width - 1.0, height - 1.0], dtype=np.float32)
            return boxes[source]

        def max_reduction(width: int, height: int) -> float:
            crop_box = box_of(width, height) if self.bbox_crop else None
            return self.transform.max_reduction(width, height, crop_box)

        decoded = decode_image(notes.image_paths[source], max_reduction=max_reduction if self.jpeg_draft else None)
        width, height = decoded.source_size
        box = box_of(width, height)
        mask = None
        if self.with_masks:
            mask_path = notes.mask_paths[source]  # type: ignore[index]  # presence checked in __init__
            mask = open_image(mask_path, "L", "segmentation mask")
            if mask.size != decoded.source_size:
                raise DataError(size_mismatch(mask_path, mask.size, notes.image_paths[source], decoded.source_size))
        sample: dict[str, Any] = self.transform(
            decoded.image,
            notes.keypoints[source],
            box,
            mask,
            crop_box=box if self.bbox_crop else None,
            source_size=decoded.source_size,
            reduction=decoded.reduction,
        )
        sample["label"] = int(notes.labels[source])
        sample["index"] = index
        return sample


__all__ = ["PartImageDataset"]
