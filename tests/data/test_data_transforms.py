"""Geometry of the sample transforms: image, keypoints, boxes and masks move together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ivpt.data.transforms import (
    AugmentParams,
    SampleTransform,
    apply_matrix,
    hflip_matrix,
    plan_geometry,
    region_resize_matrix,
    rotation_scale_matrix,
    transform_box,
    transform_keypoints,
    warp_image,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def gradient_image(width: int, height: int) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :] * 3
    y = np.arange(height, dtype=np.uint8)[:, None] * 5
    return Image.fromarray(np.stack([x + 0 * y, y + 0 * x, (x + y) // 2], axis=-1).astype(np.uint8))


def dot_image(width: int, height: int, centre: tuple[int, int], radius: int = 3) -> Image.Image:
    image = Image.new("RGB", (width, height), 0)
    x, y = centre
    ImageDraw.Draw(image).ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255))
    return image


def test_hflip_maps_x_to_width_minus_one_minus_x() -> None:
    flip = hflip_matrix(10)
    assert np.allclose(apply_matrix(flip, np.array([[0.0, 2.0], [9.0, 3.0], [2.5, 7.0]])), [[9, 2], [0, 3], [6.5, 7]])
    image = gradient_image(16, 16)
    plan = plan_geometry(16, 16, 16, AugmentParams(flip=True))
    assert np.array_equal(np.asarray(warp_image(image, plan, Image.Resampling.BILINEAR)), np.asarray(image)[:, ::-1])
    keypoints = np.array([[3.0, 5.0, 1.0], [15.0, 0.0, 1.0]])
    assert np.allclose(transform_keypoints(keypoints, plan.matrix, 16), [[12, 5, 1], [0, 0, 1]])


def test_rotation_by_90_degrees_turns_right_into_up() -> None:
    rotation = rotation_scale_matrix(90.0, 1.0, center=(10.0, 10.0))
    assert np.allclose(apply_matrix(rotation, np.array([[14.0, 10.0], [10.0, 13.0]])), [[10, 6], [13, 10]])
    doubled = rotation_scale_matrix(0.0, 2.0, center=(10.0, 10.0))
    assert np.allclose(apply_matrix(doubled, np.array([[13.0, 9.0]])), [[16, 8]])


def test_rotated_image_content_follows_the_matrix() -> None:
    # A quarter turn of a square image is a pixel permutation (up to PIL's rounding of the weights):
    # counter-clockwise as displayed, which is numpy's rot90.
    image = gradient_image(15, 15)
    plan = plan_geometry(15, 15, 15, AugmentParams(angle_deg=90.0))
    rotated = np.asarray(warp_image(image, plan, Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(rotated - np.rot90(np.asarray(image)).astype(int)).max() <= 1


def test_region_resize_maps_edges_to_edges() -> None:
    matrix = region_resize_matrix((10.0, 20.0, 30.0, 60.0), (5, 10))
    # Pixel-centre coordinates of the region's edges: left edge -> -0.5, right edge -> W - 0.5.
    corners = apply_matrix(matrix, np.array([[9.5, 19.5], [29.5, 59.5]]))
    assert np.allclose(corners, [[-0.5, -0.5], [4.5, 9.5]])


def test_test_transform_is_short_side_resize_and_centre_crop() -> None:
    # 48 x 36 -> short side 24 gives 32 x 24, centre crop removes 4 columns on the left.
    plan = plan_geometry(48, 36, 24)
    assert plan.resized_size == (32, 24)
    scale = 32 / 48
    expected = [(10 + 0.5) * scale - 0.5 - 4, (8 + 0.5) * scale - 0.5]
    assert np.allclose(apply_matrix(plan.matrix, np.array([[10.0, 8.0]]))[0], expected)


def test_keypoints_leaving_the_frame_become_invisible_and_zero() -> None:
    keypoints = np.array([[1.0, 1.0, 1.0], [30.0, 5.0, 1.0], [7.0, 7.0, 0.0]])
    shift = np.array([[1.0, 0.0, -3.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # (1, 1) -> (-2, 1) and (30, 5) -> (27, 5) leave a 16 x 16 frame; (7, 7) was never annotated.
    out = transform_keypoints(keypoints, shift, size=16)
    assert out.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
    inside = transform_keypoints(np.array([[5.0, 6.0, 1.0]]), shift, size=16)
    assert inside.tolist() == [[2.0, 6.0, 1.0]]


def test_box_after_rotation_is_the_clipped_hull_of_its_corners() -> None:
    rotation = rotation_scale_matrix(45.0, 1.0, center=(10.0, 10.0))
    box = transform_box(np.array([6.0, 8.0, 14.0, 12.0]), rotation, size=20)
    corners = apply_matrix(rotation, np.array([[6.0, 8.0], [14.0, 8.0], [6.0, 12.0], [14.0, 12.0]]))
    assert np.allclose(box, [*corners.min(0), *corners.max(0)], atol=1e-5)
    clipped = transform_box(np.array([0.0, 0.0, 19.0, 19.0]), rotation, size=20)
    assert clipped.tolist() == [0.0, 0.0, 19.0, 19.0]


def test_paper_augmentation_moves_a_bright_dot_with_its_keypoint() -> None:
    transform = SampleTransform(48, "paper", MEAN, STD)
    image = dot_image(96, 64, centre=(40, 30))
    mask = Image.fromarray((np.asarray(image)[..., 0] > 0).astype(np.uint8) * 255)
    keypoints, box = np.array([[40.0, 30.0, 1.0]]), np.array([0.0, 0.0, 95.0, 63.0])
    checked = 0
    for seed in range(10):
        sample = transform(image, keypoints, box, mask, generator=torch.Generator().manual_seed(seed))
        x, y, visible = sample["keypoints"][0].tolist()
        if not visible:  # the random affine / crop may push the dot out of the frame
            continue
        checked += 1
        row, col = divmod(int(sample["image"].sum(0).argmax()), 48)
        assert abs(col - x) <= 1.5 and abs(row - y) <= 1.5, (seed, (col, row), (x, y))
        mask_row, mask_col = divmod(int(sample["mask"].argmax()), 48)
        assert abs(mask_col - x) <= 1.5 and abs(mask_row - y) <= 1.5, (seed, (mask_col, mask_row), (x, y))
    assert checked >= 5


def test_same_generator_seed_gives_the_same_sample() -> None:
    transform = SampleTransform(32, "paper", MEAN, STD)
    image, keypoints, box = gradient_image(50, 40), np.array([[20.0, 10.0, 1.0]]), np.array([2.0, 2.0, 30.0, 30.0])
    a = transform(image, keypoints, box, generator=torch.Generator().manual_seed(3))
    b = transform(image, keypoints, box, generator=torch.Generator().manual_seed(3))
    c = transform(image, keypoints, box, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["keypoints"], b["keypoints"])
    assert not torch.equal(a["image"], c["image"])


def test_flip_augmentation_only_flips_and_crops() -> None:
    transform = SampleTransform(16, "flip", MEAN, STD)
    image = gradient_image(16, 16)
    keypoints = np.array([[3.0, 5.0, 1.0]])
    seen = set()
    for seed in range(12):
        sample = transform(
            image, keypoints, np.array([0.0, 0.0, 15.0, 15.0]), generator=torch.Generator().manual_seed(seed)
        )
        seen.add(tuple(sample["keypoints"][0].tolist()))
    assert seen == {(3.0, 5.0, 1.0), (12.0, 5.0, 1.0)}


def test_bbox_crop_resizes_the_box_to_the_output() -> None:
    transform = SampleTransform(20, "none", MEAN, STD)
    image = gradient_image(48, 36)
    box = np.array([4.0, 3.0, 23.0, 12.0])  # 20 x 10 pixels
    sample = transform(image, np.array([[4.0, 3.0, 1.0], [23.0, 12.0, 1.0]]), box, crop_box=box)
    # The box is stretched 1x horizontally, 2x vertically; pixel (4, 3) is the crop's top-left pixel, its
    # centre lands half a source pixel (one output pixel) below the top edge: y = 2 * 0.5 - 0.5.
    assert sample["bbox"].tolist() == pytest.approx([0.0, 0.5, 19.0, 18.5])
    assert sample["keypoints"][0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert sample["keypoints"][1].tolist() == pytest.approx([19.0, 18.5, 1.0])


def test_bbox_crop_is_clipped_to_the_image() -> None:
    plan = plan_geometry(30, 20, 10, crop_box=(-4.0, 5.0, 40.0, 14.0))
    assert plan.source_box == (0.0, 5.0, 30.0, 15.0)
    # A box wholly outside the image still gives a valid one-pixel region.
    assert plan_geometry(30, 20, 10, crop_box=(50.0, 25.0, 60.0, 30.0)).source_box == (29.0, 19.0, 30.0, 20.0)
    image = gradient_image(30, 20)
    assert warp_image(image, plan, Image.Resampling.BILINEAR).size == (10, 10)


def test_normalisation_uses_mean_and_std() -> None:
    transform = SampleTransform(8, "none", (0.2, 0.4, 0.6), (0.1, 0.2, 0.3))
    image = Image.new("RGB", (8, 8), (255, 0, 51))
    sample = transform(image, np.zeros((0, 3)), np.array([0.0, 0.0, 7.0, 7.0]))
    assert sample["image"].shape == (3, 8, 8)
    assert sample["image"][:, 0, 0].tolist() == pytest.approx([8.0, -2.0, (0.2 - 0.6) / 0.3], abs=1e-5)
    assert sample["keypoints"].shape == (0, 3)
