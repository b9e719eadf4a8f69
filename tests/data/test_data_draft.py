"""Reduced JPEG decoding (PIL's draft mode): fewer pixels decoded, the geometry of the full-size decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ivpt.config import Config, apply_overrides
from ivpt.data import build_dataset, make_synthetic
from ivpt.data.images import decode_image
from ivpt.data.transforms import SampleTransform
from ivpt.errors import DataError

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def write_jpeg(path: Path, width: int, height: int, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def disc_jpeg(path: Path, size: tuple[int, int], centre: tuple[float, float], radius: float) -> Path:
    """A white disc on black whose centre sits at ``centre`` in pixel-centre coordinates (sub-pixel exact)."""
    factor = 8  # drawn 8x larger, then area-averaged down, so the disc's edge is anti-aliased
    big = Image.new("L", (size[0] * factor, size[1] * factor), 0)
    # Pixel-centre coordinate x is edge coordinate x + 0.5.
    cx, cy, r = (centre[0] + 0.5) * factor, (centre[1] + 0.5) * factor, radius * factor
    ImageDraw.Draw(big).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    big.resize(size, Image.Resampling.BOX).convert("RGB").save(path, quality=95)
    return path


def brightness_centroid(image: torch.Tensor) -> tuple[float, float]:
    """``(x, y)`` centre of mass of a ``(3, H, W)`` image's brightness, in pixel-centre coordinates."""
    weights = image.sum(0).clamp(min=0)
    rows, cols = torch.meshgrid(torch.arange(image.shape[1]), torch.arange(image.shape[2]), indexing="ij")
    total = weights.sum()
    return float((weights * cols).sum() / total), float((weights * rows).sum() / total)


@pytest.mark.parametrize(
    ("limit", "reduction", "size"),
    [(1.99, 1, (500, 375)), (2.3, 2, (250, 188)), (5.0, 4, (125, 94)), (99, 8, (63, 47))],
)
def test_jpeg_is_decoded_at_the_largest_reduction_the_caller_allows(
    tmp_path: Path, limit: float, reduction: int, size: tuple[int, int]
) -> None:
    path = write_jpeg(tmp_path / "a.jpg", 500, 375)
    asked: list[tuple[int, int]] = []

    def max_reduction(width: int, height: int) -> float:
        asked.append((width, height))
        return limit

    decoded = decode_image(path, max_reduction=max_reduction)
    assert asked == [(500, 375)]
    assert decoded.reduction == reduction and decoded.source_size == (500, 375)
    # libjpeg rounds the reduced size up: ceil(375 / 2) = 188.
    assert decoded.image.size == size and decoded.image.mode == "RGB"


def test_other_formats_and_no_limit_decode_at_full_size(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    Image.new("RGB", (400, 300), (10, 20, 30)).save(png)
    assert decode_image(png, max_reduction=lambda w, h: 8.0).reduction == 1
    assert decode_image(png, max_reduction=lambda w, h: 8.0).image.size == (400, 300)
    full = decode_image(write_jpeg(tmp_path / "b.jpg", 400, 300))
    assert full.reduction == 1 and full.image.size == (400, 300)


def test_a_broken_jpeg_names_the_file_also_when_reduced(tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "c.jpg", 400, 300)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"^cannot decode image '.*c\.jpg'"):
        decode_image(path, max_reduction=lambda w, h: 4.0)


@pytest.mark.parametrize("augment", ["paper", "none"])
def test_a_disc_lands_on_its_keypoint_with_and_without_reduced_decoding(tmp_path: Path, augment: str) -> None:
    centre = (151.3, 97.8)
    path = disc_jpeg(tmp_path / "disc.jpg", (400, 300), centre, radius=16.0)
    transform = SampleTransform(64, augment, MEAN, STD)  # 300 / 64: the short side can shrink 4 times
    keypoints, box = np.array([[centre[0], centre[1], 1.0]]), np.array([10.0, 20.0, 380.0, 290.0])
    checked = 0
    for seed in range(12):
        samples = {}
        for draft in (False, True):
            decoded = decode_image(path, max_reduction=transform.max_reduction if draft else None)
            assert decoded.reduction == (4 if draft else 1)
            samples[draft] = transform(
                decoded.image,
                keypoints,
                box,
                generator=torch.Generator().manual_seed(seed),
                source_size=decoded.source_size,
                reduction=decoded.reduction,
            )
        # The geometry comes from the plan alone: keypoints and boxes are identical.
        assert torch.equal(samples[True]["keypoints"], samples[False]["keypoints"])
        assert torch.equal(samples[True]["bbox"], samples[False]["bbox"])
        x, y, visible = samples[True]["keypoints"][0].tolist()
        if not (visible and 6 <= x <= 57 and 6 <= y <= 57):  # the disc (radius ~3.4 px here) must be inside
            continue
        checked += 1
        for draft, sample in samples.items():
            cx, cy = brightness_centroid(sample["image"])
            assert abs(cx - x) < 0.1 and abs(cy - y) < 0.1, (augment, seed, draft, (cx, cy), (x, y))
    assert checked >= (1 if augment == "none" else 5)


def test_the_dataset_gives_the_same_geometry_and_nearly_the_same_pixels_with_draft(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_synthetic(root, num_classes=2, per_class=2, size=256, seed=0)
    samples = {}
    for draft in (True, False):
        cfg = apply_overrides(
            Config(),
            ["data.dataset=cub", f"data.root={root}", "model.img_size=96", f"data.jpeg_draft={str(draft).lower()}"],
        )
        dataset = build_dataset(cfg, "train_full", with_masks=True)
        assert dataset.jpeg_draft is draft
        torch.manual_seed(5)
        samples[draft] = [dataset[i] for i in range(len(dataset))]
    for reduced, full in zip(samples[True], samples[False], strict=True):
        assert torch.equal(reduced["keypoints"], full["keypoints"]) and torch.equal(reduced["bbox"], full["bbox"])
        assert torch.equal(reduced["mask"], full["mask"])  # masks are PNGs: never reduced
        # 256 px decoded at 128 px, then resized to 96: a slightly softer image, the same picture.
        difference = (reduced["image"].float() - full["image"].float()).abs().mean() / full["image"].float().std()
        assert 0 < difference < 0.1
