"""Where an annotated keypoint and box lie in the image, and where they land after the transform.

Both data sets document ``<x> <y>`` of ``parts/part_locs.txt`` as "the pixel location of the center of
the part": a pixel's column and row, which NABirds' own viewer draws at that pixel's centre. ivpt reads a
keypoint ``(x, y)`` as the centre of pixel ``(x, y)`` (docs/method.md section 9, "Pixel convention").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from data_layouts import BOX, HEIGHT, KEYPOINTS, WIDTH
from PIL import Image

from ivpt.config import Config
from ivpt.data import build_dataset, load_annotations


def _dot_images(root: Path, x: int, y: int) -> None:
    """Overwrite every image of the layout with a black one whose only bright pixel is column x, row y.

    Saved losslessly (PNG data under the layout's file names: PIL reads the content, not the suffix).
    """
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[y, x] = 255
    for line in (root / "images.txt").read_text().splitlines():
        Image.fromarray(pixels).save(root / "images" / line.split(maxsplit=1)[1], format="PNG")


def _brightness_centroid(image: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` of an ``(H, W)`` intensity image, pixel centres at integers."""
    rows, cols = np.indices(image.shape)
    return float((image * cols).sum() / image.sum()), float((image * rows).sum() / image.sum())


@pytest.mark.parametrize("layout", ["cub", "nabirds"])
@pytest.mark.parametrize("bbox_crop", [False, True])
def test_a_keypoint_lands_on_the_pixel_it_names(
    layout: str, bbox_crop: bool, request: pytest.FixtureRequest, make_cfg: Callable[..., Config]
) -> None:
    root: Path = request.getfixturevalue(f"{layout}_root")
    kx, ky, _ = KEYPOINTS[0]
    _dot_images(root, int(kx), int(ky))
    notes = load_annotations(make_cfg(layout, root).data)
    assert notes.keypoints[0, 0].tolist() == [kx, ky, 1.0]  # read as written, no offset
    # Upsampling (48 x 36 -> 96 x 72 and a centre crop of 72; the 20 x 10 box -> 72 x 72) spreads the dot
    # symmetrically around the centre of the pixel it came from.
    cfg = make_cfg(layout, root, img_size=72)
    sample = build_dataset(cfg, "test", bbox_crop=bbox_crop)[0]
    brightness = sample["image"].numpy().astype(np.float64).mean(axis=0) / 255.0  # uint8: the pixels as they are
    centroid = np.array(_brightness_centroid(brightness))
    keypoint = sample["keypoints"][0, :2].numpy()
    np.testing.assert_allclose(keypoint, centroid, atol=0.02)
    # Reading the annotation as the pixel's top-left corner instead would miss it by half a source pixel
    # (here 1 output pixel along x, and along y without the box crop).
    if bbox_crop:
        x, y, w, h = BOX
        scale = np.array([72 / w, 72 / h])
        corner_reading = (np.array([kx, ky]) - np.array([x, y])) * scale - 0.5
    else:
        corner_reading = np.array([kx, ky]) * 2 - 0.5 - np.array([12, 0])
    assert np.abs(corner_reading - centroid).max() > 0.9


def test_bbox_edges_keep_the_annotated_size_where_the_crop_cuts_the_box(
    cub_root: Path, make_cfg: Callable[..., Config]
) -> None:
    # 48 x 36 -> 32 x 24 (scale 2/3), the centre crop drops 4 columns: the box (x 4, y 3, 20 x 10 pixels)
    # has its left edge at source x = 3.5, i.e. (3.5 + 0.5) * 2/3 - 0.5 - 4 = -11/6 in the output.
    sample = build_dataset(make_cfg("cub", cub_root, img_size=24), "test")[0]
    x, y, w, h = BOX
    scale = 24 / HEIGHT
    left, top = x * scale - 0.5 - 4, y * scale - 0.5
    assert sample["bbox_edges"].tolist() == pytest.approx([left, top, left + w * scale, top + h * scale])
    assert left == pytest.approx(-11 / 6)
    # The clipped box starts at the frame instead and is narrower than the annotation.
    assert sample["bbox"][0].item() == 0.0
    assert float(sample["bbox"][2] - sample["bbox"][0]) < w * scale - 1
