"""Image-folder data sets: both layouts, the deterministic per-class split, and their problems."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ivpt.config import Config
from ivpt.data import build_dataset, check_dataset, load_annotations
from ivpt.data.folder import folder_split_counts
from ivpt.errors import DataError


def test_train_test_layout(folder_factory: Callable[..., Path], make_cfg: Callable[..., Config]) -> None:
    root = folder_factory({"cat": 3, "dog": 2})
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    cfg = make_cfg("folder", root, img_size=16, val_fraction=0.0)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert train.class_names == ["cat", "dog"] and train.labels == [0, 0, 0, 1, 1] and test.labels == [0, 1]
    assert train.part_names == [] and not train.has_parts and not train.has_masks
    sample = test[1]
    assert sample["image"].shape == (3, 16, 16) and sample["keypoints"].shape == (0, 3)
    # The whole 40 x 30 image is the box; after the centre crop it covers the whole output.
    assert sample["bbox"].tolist() == [0.0, 0.0, 15.0, 15.0]
    assert check_dataset("folder", root)["problems"] == []


def test_single_tree_split_is_deterministic_and_per_class(
    folder_factory: Callable[..., Path], make_cfg: Callable[..., Config]
) -> None:
    root = folder_factory({"a": 10, "b": 5, "c": 2}, split=False)
    cfg = make_cfg("folder", root, folder_train_ratio=0.6, folder_split_seed=1)
    first, again = load_annotations(cfg.data), load_annotations(cfg.data)
    assert [p.name for p in first.image_paths] == [p.name for p in again.image_paths]
    train_per_class = [int((first.labels[first.is_train] == c).sum()) for c in range(3)]
    assert train_per_class == [6, 3, 1]
    cfg.data.folder_split_seed = 2
    other = load_annotations(cfg.data)
    chosen = {p.name for p, t in zip(first.image_paths, first.is_train, strict=True) if t and p.parent.name == "a"}
    chosen_other = {
        p.name for p, t in zip(other.image_paths, other.is_train, strict=True) if t and p.parent.name == "a"
    }
    assert len(chosen) == len(chosen_other) == 6 and chosen != chosen_other


def test_split_counts_keep_one_image_on_each_side() -> None:
    assert [folder_split_counts(n, 0.8) for n in (1, 2, 3, 5, 10)] == [1, 1, 2, 4, 8]
    assert folder_split_counts(10, 0.01) == 1 and folder_split_counts(10, 0.99) == 9


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: shutil.rmtree(root / "test"), r"'.*train' exists but '.*test' does not"),
        (lambda root: (root / "test" / "owl").mkdir(), r"test class folder '.*owl' has no counterpart in"),
        (lambda root: (root / "train" / "emu").mkdir(), r"class 'emu' \(id emu\) has no training image"),
    ],
    ids=["train without test", "extra test class", "empty class"],
)
def test_folder_problems(
    damage: Callable[[Path], None], message: str, folder_factory: Callable[..., Path], make_cfg: Callable[..., Config]
) -> None:
    root = folder_factory({"cat": 2})
    damage(root)
    problems = check_dataset("folder", root)["problems"]
    assert len(problems) == 1 and re.search(message, problems[0]), problems
    with pytest.raises(DataError, match=message):
        load_annotations(make_cfg("folder", root).data)


def test_folder_without_classes(tmp_path: Path) -> None:
    (tmp_path / "flat.png").write_bytes(b"")
    assert check_dataset("folder", tmp_path)["problems"] == [
        f"no class folders in '{tmp_path}' (expected one sub-folder of images per class)"
    ]
    assert check_dataset("coco", tmp_path)["problems"] == [
        "unknown data set 'coco': expected one of cub, nabirds, folder"
    ]
