"""``ivpt data-check``: validate a data set folder and report every problem at once."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ivpt.config import DataConfig
from ivpt.data.annotations import Annotations, ProblemLog
from ivpt.data.images import LargeImageWarning, decode_problem, image_size, size_mismatch
from ivpt.data.sources import DATASETS, read_annotations
from ivpt.errors import DataError


def check_dataset(dataset: str, root: str | Path, verify_images: bool = True) -> dict[str, Any]:
    """Read a data set in collecting mode and summarise it.

    Problems (what training or evaluation would stop at): missing files, lines that do not parse
    (``file:line`` and the text), ids that disagree between files, duplicate ids, unknown classes / parts,
    boxes without area, classes without a training image, missing image files, images beyond twice PIL's
    decompression-bomb limit, bounding boxes reaching outside their image, segmentation masks whose size
    is not their image's, and (with ``verify_images``) images and masks that cannot be decoded.

    Warnings (training goes on): visible keypoints outside their image (CUB has a few), and images beyond
    PIL's decompression-bomb limit (slow and memory-hungry to decode).

    Image sizes come from the file headers, so the geometry checks run without ``verify_images`` too.
    Image folders without ``train/`` and ``test/`` are split with the default ``data.folder_train_ratio``
    / ``data.folder_split_seed``.

    Returns:
        ``{"dataset", "root", "train", "test", "classes", "parts", "problems", "warnings"}``: image counts
        of the official splits, the number of classes, the part names, one line per problem (empty when
        the data set is sound) and one line per warning.
    """
    log = ProblemLog(strict=False)
    notices = ProblemLog(strict=False, kind="warnings")
    report: dict[str, Any] = {"dataset": dataset, "root": str(root), "train": 0, "test": 0, "classes": 0, "parts": []}
    if dataset not in DATASETS:
        log.add(f"unknown data set '{dataset}': expected one of {', '.join(DATASETS)}")
        return {**report, "problems": log.problems, "warnings": notices.problems}
    defaults = DataConfig()
    annotations = read_annotations(
        dataset, root, log, train_ratio=defaults.folder_train_ratio, split_seed=defaults.folder_split_seed
    )
    if annotations is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LargeImageWarning)
            # Missing image files were reported while reading; masks are optional, so checked here.
            sizes = [
                _size(path, "image", log, verify_images) if path.is_file() else None for path in annotations.image_paths
            ]
            if annotations.mask_paths is not None:
                _check_masks(annotations, sizes, log, verify_images)
        for warning in caught:
            if issubclass(warning.category, LargeImageWarning):
                notices.add(str(warning.message))
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        _check_geometry(annotations, sizes, log, notices)
        train = int(annotations.is_train.sum())
        report.update(
            train=train,
            test=len(annotations) - train,
            classes=len(annotations.class_names),
            parts=list(annotations.part_names),
        )
    return {**report, "problems": log.problems, "warnings": notices.problems}


def _size(path: Path, what: str, log: ProblemLog, decode: bool) -> tuple[int, int] | None:
    """The size of a file that reads (and, with ``decode``, decodes) completely; else reports and ``None``."""
    try:
        size = image_size(path, what)
    except DataError as exc:
        log.add(str(exc))
        return None
    if decode and (problem := decode_problem(path, what)) is not None:
        log.add(problem)
        return None
    return size


def _check_masks(annotations: Annotations, sizes: list[tuple[int, int] | None], log: ProblemLog, decode: bool) -> None:
    assert annotations.mask_paths is not None
    for image_path, mask_path, size in zip(annotations.image_paths, annotations.mask_paths, sizes, strict=True):
        if not mask_path.is_file():
            log.add(f"segmentation mask file '{mask_path}' does not exist")
            continue
        mask_size = _size(mask_path, "segmentation mask", log, decode)
        if mask_size is not None and size is not None and mask_size != size:
            log.add(size_mismatch(mask_path, mask_size, image_path, size))


def _check_geometry(
    annotations: Annotations, sizes: list[tuple[int, int] | None], log: ProblemLog, notices: ProblemLog
) -> None:
    """Boxes outside their image are problems, visible keypoints outside it warnings.

    Coordinates are pixel centres, so a ``W x H`` image spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
    """
    parts = annotations.part_names
    for index, (path, size) in enumerate(zip(annotations.image_paths, sizes, strict=True)):
        if size is None:
            continue
        width, height = size
        if annotations.boxes is not None:
            x_min, y_min, x_max, y_max = (float(v) for v in annotations.boxes[index])
            if x_min < -0.5 or y_min < -0.5 or x_max > width - 0.5 or y_max > height - 0.5:
                log.add(
                    f"bounding box of image '{path}' (x {x_min:g}, y {y_min:g}, width {x_max - x_min + 1:g}, "
                    f"height {y_max - y_min + 1:g}) reaches outside the {width}x{height} image"
                )
        for part, (x, y, visible) in enumerate(annotations.keypoints[index].tolist()):
            if visible and not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
                notices.add(
                    f"keypoint '{parts[part]}' of image '{path}' at ({x:g}, {y:g}) lies outside the "
                    f"{width}x{height} image"
                )


__all__ = ["check_dataset"]
