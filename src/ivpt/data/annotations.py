"""Reading CUB-200-2011 and NABirds annotations (official layouts) into one in-memory table.

Both data sets share the file layout below (paths relative to the data set root); NABirds differs in
its ids: image ids are UUID strings, class ids are sparse and ``classes.txt`` also lists the parent
categories of its hierarchy, so only the class ids used in ``image_class_labels.txt`` become labels.

=============================  =============================================================
``images.txt``                 ``<image_id> <relative path under images/>``
``classes.txt``                ``<class_id> <name>``
``image_class_labels.txt``     ``<image_id> <class_id>``
``train_test_split.txt``       ``<image_id> <is_train>`` (1 train, 0 test)
``bounding_boxes.txt``         ``<image_id> <x> <y> <width> <height>`` (pixels, top-left corner)
``parts/parts.txt``            ``<part_id> <name>``
``parts/part_locs.txt``        ``<image_id> <part_id> <x> <y> <visible>``
``segmentations/`` (optional)  one greyscale PNG per image, same relative path, ``.png`` suffix
=============================  =============================================================

Every problem is reported through a :class:`ProblemLog`, which either raises :class:`DataError` at the
first one (loaders used for training) or collects them all (``ivpt data-check``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ivpt.errors import DataError

PartLayout = Literal["cub", "nabirds"]


class ProblemLog:
    """Collects data set problems, or raises :class:`DataError` on the first one when ``strict``.

    Args:
        strict: raise at the first problem instead of collecting.
        limit: at most this many messages are kept; the rest are only counted.
        kind: what the messages are, for the line counting those left out (``"problems"``, ``"warnings"``).
    """

    def __init__(self, strict: bool, limit: int = 1000, kind: str = "problems") -> None:
        self.strict = strict
        self.limit = limit
        self.kind = kind
        self.count = 0
        self._messages: list[str] = []

    def add(self, message: str) -> None:
        if self.strict:
            raise DataError(message)
        self.count += 1
        if len(self._messages) < self.limit:
            self._messages.append(message)

    @property
    def problems(self) -> list[str]:
        """The kept messages, plus a final line counting those left out."""
        hidden = self.count - len(self._messages)
        return self._messages + ([f"... and {hidden} more {self.kind}"] if hidden else [])

    def __bool__(self) -> bool:
        return self.count > 0


@dataclass
class Annotations:
    """Everything known about a data set's images, before splitting and decoding.

    Shapes: ``N`` images, ``P`` parts.

    Attributes:
        root: the data set folder.
        image_paths: path of each image.
        labels: ``(N,)`` int64 contiguous class index.
        is_train: ``(N,)`` bool, membership of the official train split.
        boxes: ``(N, 4)`` float32 ``(x_min, y_min, x_max, y_max)`` in source pixel-centre coordinates, or
            ``None`` when the data set has no boxes (the whole image is used).
        keypoints: ``(N, P, 3)`` float32 ``(x, y, visible)`` in source pixel coordinates (zeros when
            unannotated).
        class_names: name of each label.
        part_names: name of each keypoint column.
        mask_paths: segmentation PNG of each image, or ``None`` when the data set has none.
        class_ids: the data set's own id of each label (for messages and reports).
    """

    root: Path
    image_paths: list[Path]
    labels: np.ndarray
    is_train: np.ndarray
    boxes: np.ndarray | None
    keypoints: np.ndarray
    class_names: list[str]
    part_names: list[str]
    mask_paths: list[Path] | None
    class_ids: list[str]

    def __len__(self) -> int:
        return len(self.image_paths)


def is_data_folder(root: Path, log: ProblemLog) -> bool:
    """Whether ``root`` is a folder; reports what it is otherwise."""
    if root.is_dir():
        return True
    log.add(f"data set folder '{root}' " + ("is a file, expected a folder" if root.exists() else "does not exist"))
    return False


def check_classes_have_training_images(annotations: Annotations, log: ProblemLog) -> None:
    """Report every class without a single image in the official train split."""
    counts = np.bincount(annotations.labels[annotations.is_train], minlength=len(annotations.class_names))
    for label in np.flatnonzero(counts == 0):
        log.add(f"class '{annotations.class_names[label]}' (id {annotations.class_ids[label]}) has no training image")


# --- line-oriented tables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One parsed line: its 1-based number and converted fields."""

    line: int
    fields: tuple[Any, ...]


def binary(text: str) -> int:
    """``"0"`` or ``"1"`` as an int; anything else is a ValueError."""
    if text not in ("0", "1"):
        raise ValueError(text)
    return int(text)


def finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def read_table(
    path: Path, layout: str, converters: tuple[Callable[[str], Any], ...], log: ProblemLog, *, text_last: bool = False
) -> list[Row] | None:
    """Parse a whitespace-separated file, one record per non-empty line.

    Args:
        path: the file.
        layout: what a line looks like, for messages (e.g. ``"<image_id> <class_id>"``).
        converters: one per field; a ValueError marks the line as malformed.
        log: where problems go.
        text_last: the last field is free text that may contain spaces (a name or a path).

    Returns:
        The parsed rows (malformed lines left out), or ``None`` when the file is missing.
    """
    if not path.is_file():
        log.add(f"missing file '{path}' (expected lines '{layout}')")
        return None
    rows: list[Row] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.add(f"cannot read '{path}': {exc}")
        return None
    count = len(converters)
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        tokens = stripped.split(maxsplit=count - 1) if text_last else stripped.split()
        try:
            if len(tokens) != count:
                raise ValueError(stripped)
            fields = tuple(convert(token) for convert, token in zip(converters, tokens, strict=True))
        except ValueError:
            log.add(f"{path}:{number}: expected '{layout}', got {stripped!r}")
            continue
        rows.append(Row(number, fields))
    return rows


def id_sort_key(identifier: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then other ids in text order."""
    return (0, int(identifier), "") if identifier.isdigit() else (1, 0, identifier)


def index_rows(rows: Iterable[Row], path: Path, what: str, log: ProblemLog) -> dict[str, Row]:
    """Map each row's first field to the row, reporting duplicates."""
    index: dict[str, Row] = {}
    for row in rows:
        key = row.fields[0]
        if key in index:
            log.add(f"{path}:{row.line}: duplicate {what} '{key}' (first on line {index[key].line})")
            continue
        index[key] = row
    return index


def match_image_rows(
    rows: list[Row] | None, path: Path, images: dict[str, Row], images_path: Path, log: ProblemLog
) -> dict[str, Row]:
    """Index a per-image file by image id; report ids unknown to ``images.txt`` and images it lacks."""
    if rows is None:
        return {}
    index = index_rows(rows, path, "image id", log)
    for image_id, row in index.items():
        if image_id not in images:
            log.add(f"{path}:{row.line}: image id '{image_id}' is not in {images_path.name}")
    for image_id, row in images.items():
        if image_id not in index:
            log.add(f"{images_path}:{row.line}: image id '{image_id}' has no line in {path.name}")
    return index


# --- CUB-200-2011 and NABirds -------------------------------------------------------------------------


# File name -> what one of its lines looks like, and how each field is converted.
PART_LAYOUT_FILES: dict[str, tuple[str, tuple[Callable[[str], Any], ...], bool]] = {
    "images.txt": ("<image_id> <path>", (str, str), True),
    "classes.txt": ("<class_id> <name>", (str, str), True),
    "image_class_labels.txt": ("<image_id> <class_id>", (str, str), False),
    "train_test_split.txt": ("<image_id> <is_train>", (str, binary), False),
    "bounding_boxes.txt": ("<image_id> <x> <y> <width> <height>", (str, finite, finite, finite, finite), False),
    "parts/parts.txt": ("<part_id> <name>", (str, str), True),
    "parts/part_locs.txt": ("<image_id> <part_id> <x> <y> <visible>", (str, str, finite, finite, binary), False),
}


def _class_labels(
    layout: PartLayout, class_rows: list[Row] | None, labels_by_image: dict[str, Row], root: Path, log: ProblemLog
) -> tuple[list[str], list[str]]:
    """Class ids that become labels (sorted by id) and their names; reports unknown class ids."""
    classes = index_rows(class_rows or [], root / "classes.txt", "class id", log)
    if class_rows is not None:
        for row in labels_by_image.values():
            if row.fields[1] not in classes:
                log.add(
                    f"{root / 'image_class_labels.txt'}:{row.line}: class id '{row.fields[1]}' is not in classes.txt"
                )
    if layout == "cub":
        class_ids = sorted(classes, key=id_sort_key)
    else:
        used = {row.fields[1] for row in labels_by_image.values()}
        class_ids = sorted((c for c in used if c in classes or class_rows is None), key=id_sort_key)
    return class_ids, [classes[c].fields[1] if c in classes else c for c in class_ids]


def _boxes(box_by_image: dict[str, Row], position: dict[str, int], root: Path, log: ProblemLog) -> np.ndarray:
    """``(N, 4)`` boxes ``(x_min, y_min, x_max, y_max)`` in pixel-centre coordinates."""
    boxes = np.zeros((len(position), 4), dtype=np.float32)
    for image_id, row in box_by_image.items():
        x, y, width, height = row.fields[1:]
        if width <= 0 or height <= 0:
            log.add(
                f"{root / 'bounding_boxes.txt'}:{row.line}: box width and height must be positive, "
                f"got {width} x {height}"
            )
        elif image_id in position:
            # A box (x, y, w, h) covers the w x h pixels starting at pixel (x, y).
            boxes[position[image_id]] = (x, y, x + max(width - 1.0, 0.0), y + max(height - 1.0, 0.0))
    return boxes


def _keypoints(
    loc_rows: list[Row] | None,
    part_rows: list[Row] | None,
    position: dict[str, int],
    root: Path,
    log: ProblemLog,
) -> tuple[np.ndarray, list[str]]:
    """``(N, P, 3)`` keypoints (columns sorted by part id) and the part names."""
    parts = index_rows(part_rows or [], root / "parts/parts.txt", "part id", log)
    part_ids = sorted(parts, key=id_sort_key)
    column = {part_id: c for c, part_id in enumerate(part_ids)}
    keypoints = np.zeros((len(position), len(part_ids), 3), dtype=np.float32)
    seen: dict[tuple[str, str], int] = {}
    for row in loc_rows or []:
        image_id, part_id, x, y, visible = row.fields
        where = f"{root / 'parts/part_locs.txt'}:{row.line}"
        if image_id not in position:
            log.add(f"{where}: image id '{image_id}' is not in images.txt")
        elif part_rows is not None and part_id not in column:
            log.add(f"{where}: part id '{part_id}' is not in parts/parts.txt")
        elif (image_id, part_id) in seen:
            first = seen[image_id, part_id]
            log.add(f"{where}: duplicate keypoint for image '{image_id}', part '{part_id}' (first on line {first})")
        elif part_id in column:
            seen[image_id, part_id] = row.line
            if visible:
                keypoints[position[image_id], column[part_id]] = (x, y, 1.0)
    return keypoints, [parts[p].fields[1] for p in part_ids]


def read_part_annotations(
    root: str | Path, layout: PartLayout, log: ProblemLog, check_files: bool = True
) -> Annotations | None:
    """Read a CUB-200-2011 or NABirds folder.

    Args:
        root: the data set folder (the one holding ``images.txt``).
        layout: ``"cub"`` (every class of ``classes.txt`` is a label) or ``"nabirds"`` (only the class ids
            that images use are labels; ``classes.txt`` also lists parent categories).
        log: where problems go (strict: raise at the first).
        check_files: also check that every image file exists.

    Returns:
        The annotations, or ``None`` when too much is missing to build them (only in collecting mode).
    """
    root = Path(root)
    if not is_data_folder(root, log):
        return None
    # Read every file first, so that a collecting log reports the parse problems of all of them.
    rows = {
        name: read_table(root / name, layout_text, converters, log, text_last=text_last)
        for name, (layout_text, converters, text_last) in PART_LAYOUT_FILES.items()
    }
    if rows["images.txt"] is None:
        return None

    images_path = root / "images.txt"
    images = index_rows(rows["images.txt"], images_path, "image id", log)
    image_ids = list(images)
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    per_image = {
        name: match_image_rows(rows[name], root / name, images, images_path, log)
        for name in ("image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
    }
    class_ids, class_names = _class_labels(layout, rows["classes.txt"], per_image["image_class_labels.txt"], root, log)
    label_of_class = {class_id: label for label, class_id in enumerate(class_ids)}
    labels = np.zeros(len(image_ids), dtype=np.int64)
    for image_id, row in per_image["image_class_labels.txt"].items():
        if image_id in position and row.fields[1] in label_of_class:
            labels[position[image_id]] = label_of_class[row.fields[1]]
    is_train = np.zeros(len(image_ids), dtype=bool)
    for image_id, row in per_image["train_test_split.txt"].items():
        if image_id in position:
            is_train[position[image_id]] = bool(row.fields[1])
    boxes = _boxes(per_image["bounding_boxes.txt"], position, root, log)
    keypoints, part_names = _keypoints(rows["parts/part_locs.txt"], rows["parts/parts.txt"], position, root, log)

    relative = [images[image_id].fields[1] for image_id in image_ids]
    image_paths = [root / "images" / rel for rel in relative]
    if check_files:
        for image_id, path in zip(image_ids, image_paths, strict=True):
            if not path.is_file():
                log.add(f"{images_path}:{images[image_id].line}: image file '{path}' does not exist")
    mask_dir = root / "segmentations"
    mask_paths = [mask_dir / Path(rel).with_suffix(".png") for rel in relative] if mask_dir.is_dir() else None

    annotations = Annotations(
        root=root,
        image_paths=image_paths,
        labels=labels,
        is_train=is_train,
        boxes=boxes,
        keypoints=keypoints,
        class_names=class_names,
        part_names=part_names,
        mask_paths=mask_paths,
        class_ids=class_ids,
    )
    check_classes_have_training_images(annotations, log)
    return annotations


__all__ = [
    "Annotations",
    "ProblemLog",
    "check_classes_have_training_images",
    "is_data_folder",
    "read_part_annotations",
    "read_table",
]
