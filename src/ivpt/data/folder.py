"""Image folders: one sub-folder per class, no parts, no boxes.

Two layouts are accepted:

- ``root/train/<class>/*`` and ``root/test/<class>/*``: the split is given;
- ``root/<class>/*``: each class is split deterministically, ``train_ratio`` of its images (at least one,
  and at least one left for testing when the class has two or more) go to the train split. The choice
  depends only on the seed, the class folder name and the sorted file names.

Files count as images by their extension (:data:`IMAGE_EXTENSIONS`, case-insensitive); hidden files and
folders (names starting with ``.``) are ignored, as are files directly under ``root``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ivpt.data.annotations import Annotations, ProblemLog, check_classes_have_training_images, is_data_folder

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


def _visible_children(folder: Path, *, dirs: bool) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir() == dirs)


def _class_images(folder: Path) -> list[Path]:
    return [p for p in _visible_children(folder, dirs=False) if p.suffix.lower() in IMAGE_EXTENSIONS]


def folder_split_counts(count: int, train_ratio: float) -> int:
    """How many of a class's ``count`` images go to the train split."""
    wanted = int(train_ratio * count + 0.5)
    return min(max(wanted, 1), max(count - 1, 1))


def read_folder_annotations(
    root: str | Path, log: ProblemLog, train_ratio: float = 0.8, split_seed: int = 0
) -> Annotations | None:
    """Scan an image-folder data set.

    Args:
        root: the data set folder.
        log: where problems go (strict: raise at the first).
        train_ratio: single-tree layout only: fraction of each class used for training.
        split_seed: single-tree layout only: seed of the per-class split.

    Returns:
        Annotations with ``P = 0`` keypoints and no boxes, or ``None`` when ``root`` is unusable.
    """
    root = Path(root)
    if not is_data_folder(root, log):
        return None
    train_dir, test_dir = root / "train", root / "test"
    split_layout = train_dir.is_dir() or test_dir.is_dir()
    if split_layout and not (train_dir.is_dir() and test_dir.is_dir()):
        present, absent = (train_dir, test_dir) if train_dir.is_dir() else (test_dir, train_dir)
        log.add(f"'{present}' exists but '{absent}' does not: give both train/ and test/, or neither")
        return None

    class_root = train_dir if split_layout else root
    class_names = [p.name for p in _visible_children(class_root, dirs=True)]
    if not class_names:
        log.add(f"no class folders in '{class_root}' (expected one sub-folder of images per class)")
        return None

    paths: list[Path] = []
    labels: list[int] = []
    is_train: list[bool] = []
    for label, name in enumerate(class_names):
        if split_layout:
            train_files = _class_images(train_dir / name)
            test_files = _class_images(test_dir / name) if (test_dir / name).is_dir() else []
        else:
            files = _class_images(root / name)
            order = np.random.default_rng([split_seed, zlib.crc32(name.encode())]).permutation(len(files))
            n_train = folder_split_counts(len(files), train_ratio) if files else 0
            chosen = set(order[:n_train].tolist())
            train_files = [f for i, f in enumerate(files) if i in chosen]
            test_files = [f for i, f in enumerate(files) if i not in chosen]
        for files, flag in ((train_files, True), (test_files, False)):
            paths.extend(files)
            labels.extend([label] * len(files))
            is_train.extend([flag] * len(files))
    if split_layout:
        known = set(class_names)
        for extra in _visible_children(test_dir, dirs=True):
            if extra.name not in known:
                log.add(f"test class folder '{extra}' has no counterpart in '{train_dir}'")

    annotations = Annotations(
        root=root,
        image_paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        is_train=np.asarray(is_train, dtype=bool),
        boxes=None,
        keypoints=np.zeros((len(paths), 0, 3), dtype=np.float32),
        class_names=class_names,
        part_names=[],
        mask_paths=None,
        class_ids=class_names,
    )
    check_classes_have_training_images(annotations, log)
    return annotations


__all__ = ["IMAGE_EXTENSIONS", "folder_split_counts", "read_folder_annotations"]
