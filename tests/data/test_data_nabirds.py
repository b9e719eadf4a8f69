"""NABirds layout: UUID image ids, sparse hierarchical class ids, integer boxes, 0-based part ids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from data_layouts import NABIRDS_CLASSES, PARTS

from ivpt.config import Config
from ivpt.data import build_dataset, check_dataset, load_annotations
from ivpt.errors import DataError


def test_used_class_ids_map_to_contiguous_labels_sorted_by_id(
    nabirds_root: Path, make_cfg: Callable[..., Config]
) -> None:
    notes = load_annotations(make_cfg("nabirds", nabirds_root).data)
    # Images use ids 1010, 22, 295 (written in that order); parents 0 and 1 are not labels.
    assert notes.class_ids == ["22", "295", "1010"]
    assert notes.class_names == [NABIRDS_CLASSES[22], NABIRDS_CLASSES[295], NABIRDS_CLASSES[1010]]
    # The first four images belong to class id 1010, which is label 2.
    assert notes.labels.tolist() == [2] * 4 + [0] * 4 + [1] * 4
    assert notes.part_names == list(PARTS)
    assert notes.keypoints[0].tolist() == [[10.0, 8.0, 1.0], [30.0, 20.0, 1.0], [0.0, 0.0, 0.0]]
    assert notes.boxes is not None and notes.boxes[0].tolist() == [4.0, 3.0, 23.0, 12.0]
    assert notes.mask_paths is None


def test_nabirds_dataset_and_check(nabirds_root: Path, make_cfg: Callable[..., Config]) -> None:
    dataset = build_dataset(make_cfg("nabirds", nabirds_root, val_fraction=0.0), "train")
    assert len(dataset) == 6 and dataset.num_classes == 3 and not dataset.has_masks
    assert dataset[0]["label"] == 2 and dataset[0]["keypoints"].shape == (3, 3)
    report = check_dataset("nabirds", nabirds_root)
    assert (report["train"], report["test"], report["classes"], report["problems"]) == (6, 6, 3, [])


def test_uuid_ids_are_named_in_messages(nabirds_root: Path, make_cfg: Callable[..., Config]) -> None:
    labels = nabirds_root / "image_class_labels.txt"
    first, *rest = labels.read_text().splitlines()
    labels.write_text("\n".join(rest) + "\n")
    image_id = first.split()[0]
    with pytest.raises(DataError, match=rf"images\.txt:1: image id '{image_id}' has no line in image_class_labels"):
        load_annotations(make_cfg("nabirds", nabirds_root).data)


def test_cub_layout_keeps_every_listed_class(nabirds_root: Path, make_cfg: Callable[..., Config]) -> None:
    # Read as CUB, the parent categories become (empty) classes: the "no training image" check flags them.
    with pytest.raises(DataError, match=r"class 'Birds' \(id 0\) has no training image"):
        load_annotations(make_cfg("cub", nabirds_root).data)
