"""Where annotations come from: one entry point per ``cfg.data.dataset`` value."""

from __future__ import annotations

from pathlib import Path

from ivpt.config import DATASETS, DataConfig
from ivpt.data.annotations import Annotations, ProblemLog, read_part_annotations
from ivpt.data.folder import read_folder_annotations
from ivpt.errors import DataError


def read_annotations(
    dataset: str, root: str | Path, log: ProblemLog, *, train_ratio: float = 0.8, split_seed: int = 0
) -> Annotations | None:
    """Read the annotations of a ``"cub"``, ``"nabirds"`` or ``"folder"`` data set at ``root``.

    ``train_ratio`` / ``split_seed`` only matter for image folders without ``train/`` and ``test/``.
    Returns ``None`` only when ``log`` collects and the folder is unusable.
    """
    if dataset == "folder":
        return read_folder_annotations(root, log, train_ratio=train_ratio, split_seed=split_seed)
    if dataset in ("cub", "nabirds"):
        return read_part_annotations(root, dataset, log)  # type: ignore[arg-type]
    raise DataError(f"unknown data set '{dataset}': expected one of {', '.join(DATASETS)}")


def load_annotations(data: DataConfig) -> Annotations:
    """Strictly read the data set of ``cfg.data``; the first problem raises :class:`DataError`."""
    annotations = read_annotations(
        data.dataset,
        data.root,
        ProblemLog(strict=True),
        train_ratio=data.folder_train_ratio,
        split_seed=data.folder_split_seed,
    )
    assert annotations is not None  # a strict log raises instead of returning None
    return annotations


__all__ = ["DATASETS", "load_annotations", "read_annotations"]
