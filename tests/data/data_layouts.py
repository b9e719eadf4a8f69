"""Writers of tiny data sets in the official CUB-200-2011 / NABirds layouts and as image folders."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# CUB fixture geometry: every image is WIDTH x HEIGHT; three parts, the third never annotated.
WIDTH, HEIGHT = 48, 36
CUB_CLASSES = ("001.Alpha_bird", "002.Beta_bird", "003.Gamma_bird")
PER_CLASS = 4  # images 1-2 of each class are train, 3-4 test
PARTS = ("beak", "left eye", "tail")
KEYPOINTS = ((10.0, 8.0, 1), (30.0, 20.0, 1), (0.0, 0.0, 0))
BOX = (4.0, 3.0, 20.0, 10.0)  # x, y, w, h

# NABirds fixture: sparse, hierarchical class ids (0 and 1 are parents, never used by an image).
NABIRDS_CLASSES = {0: "Birds", 1: "Perching Birds", 1010: "Zeta Wren", 22: "Alpha Duck", 295: "Mu Heron"}
NABIRDS_USED = (1010, 22, 295)


def image_colour(label: int, k: int) -> tuple[int, int, int]:
    return (40 + 60 * label, 20 * k, 200 - 50 * label)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_part_layout(root: Path, nabirds: bool = False) -> Path:
    """Write a 12-image data set; NABirds style uses UUID image ids, sparse class ids and int boxes."""
    images, labels, split, boxes, locs = [], [], [], [], []
    class_ids = NABIRDS_USED if nabirds else (1, 2, 3)
    names = [NABIRDS_CLASSES[c] for c in class_ids] if nabirds else list(CUB_CLASSES)
    for label, (class_id, name) in enumerate(zip(class_ids, names, strict=True)):
        folder = f"{class_id:04d}" if nabirds else name
        for k in range(PER_CLASS):
            number = label * PER_CLASS + k + 1
            image_id = f"{number:08x}-1c2d-4e5f-8a9b-{number:012x}" if nabirds else str(number)
            rel = f"{folder}/img_{k}.jpg"
            pixels = np.full((HEIGHT, WIDTH, 3), image_colour(label, k), dtype=np.uint8)
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "images" / rel, quality=95)
            if not nabirds:
                mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
                mask[3:13, 4:24] = 255  # the box region
                (root / "segmentations" / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "segmentations" / f"{folder}/img_{k}.png")
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(k < 2)}")
            box = " ".join(str(int(v)) if nabirds else f"{v:.1f}" for v in BOX)
            boxes.append(f"{image_id} {box}")
            first_part = 0 if nabirds else 1
            for part, (x, y, visible) in enumerate(KEYPOINTS, start=first_part):
                locs.append(f"{image_id} {part} {x:.1f} {y:.1f} {visible}")
    if nabirds:
        classes = [f"{c} {n}" for c, n in sorted(NABIRDS_CLASSES.items())]
        parts = [f"{i} {name}" for i, name in enumerate(PARTS)]
    else:
        classes = [f"{i + 1} {name}" for i, name in enumerate(CUB_CLASSES)]
        parts = [f"{i + 1} {name}" for i, name in enumerate(PARTS)]
    _write(root / "images.txt", images)
    _write(root / "classes.txt", classes)
    _write(root / "image_class_labels.txt", labels)
    _write(root / "train_test_split.txt", split)
    _write(root / "bounding_boxes.txt", boxes)
    _write(root / "parts" / "parts.txt", parts)
    _write(root / "parts" / "part_locs.txt", locs)
    return root


def write_folder_layout(root: Path, counts: dict[str, int], split: bool) -> Path:
    """Class folders of small PNGs; with ``split``, ``counts`` images in train/ and 1 in test/."""
    for label, (name, count) in enumerate(counts.items()):
        targets = [(root / "train" / name, count), (root / "test" / name, 1)] if split else [(root / name, count)]
        for folder, n in targets:
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.new("RGB", (40, 30), image_colour(label, k)).save(folder / f"im{k:02d}.png")
    return root


def write_huge_png(path: Path, width: int, height: int) -> None:
    """A black 1-bit PNG of ``width x height`` pixels in a few kilobytes (all-zero rows compress well).

    PIL reads its size from the header, so it stands for a decompression bomb without the memory.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
