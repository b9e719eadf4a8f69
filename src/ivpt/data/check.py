"""``ivpt data-check``: validate a data set folder and report every problem at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ivpt.config import DataConfig
from ivpt.data.annotations import ProblemLog
from ivpt.data.images import decode_problem
from ivpt.data.sources import DATASETS, read_annotations


def check_dataset(dataset: str, root: str | Path, verify_images: bool = True) -> dict[str, Any]:
    """Read a data set in collecting mode and summarise it.

    Checks: missing files, lines that do not parse (``file:line`` and the text), ids that disagree
    between files, duplicate ids, unknown classes / parts, boxes without area, classes without a
    training image, missing image files, and (with ``verify_images``) images and segmentation masks that
    cannot be decoded. Image folders without ``train/`` and ``test/`` are split with the default
    ``data.folder_train_ratio`` / ``data.folder_split_seed``.

    Returns:
        ``{"dataset", "root", "train", "test", "classes", "parts", "problems"}``: image counts of the
        official splits, the number of classes, the part names, and one line per problem (empty when
        the data set is sound).
    """
    log = ProblemLog(strict=False)
    report: dict[str, Any] = {"dataset": dataset, "root": str(root), "train": 0, "test": 0, "classes": 0, "parts": []}
    if dataset not in DATASETS:
        log.add(f"unknown data set '{dataset}': expected one of {', '.join(DATASETS)}")
        return {**report, "problems": log.problems}
    defaults = DataConfig()
    annotations = read_annotations(
        dataset, root, log, train_ratio=defaults.folder_train_ratio, split_seed=defaults.folder_split_seed
    )
    if annotations is not None:
        if verify_images:
            for path in annotations.image_paths:
                # Missing files were reported while reading; only decoding is new here.
                if path.is_file() and (problem := decode_problem(path)) is not None:
                    log.add(problem)
        for path in annotations.mask_paths or []:
            if not path.is_file():
                log.add(f"segmentation mask file '{path}' does not exist")
            elif verify_images and (problem := decode_problem(path, "segmentation mask")) is not None:
                log.add(problem)
        train = int(annotations.is_train.sum())
        report.update(
            train=train,
            test=len(annotations) - train,
            classes=len(annotations.class_names),
            parts=list(annotations.part_names),
        )
    return {**report, "problems": log.problems}


__all__ = ["check_dataset"]
