"""Geometry of the sample transforms: image, keypoints, boxes and masks move together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ivpt.data.transforms import (
    AugmentParams,
    Normalize,
    SampleTransform,
    apply_matrix,
    hflip_matrix,
    image_transform,
    plan_geometry,
    region_resize_matrix,
    rotation_scale_matrix,
    transform_box,
    transform_keypoints,
    warp_image,
)
from ivpt.errors import IVPTError

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


def test_samples_carry_uint8_images_that_normalize_maps_with_mean_and_std() -> None:
    transform = SampleTransform(8, "none", (0.2, 0.4, 0.6), (0.1, 0.2, 0.3))
    image = Image.new("RGB", (8, 8), (255, 0, 51))
    sample = transform(image, np.zeros((0, 3)), np.array([0.0, 0.0, 7.0, 7.0]))
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 8, 8)
    assert sample["image"].is_contiguous()
    assert sample["image"][:, 0, 0].tolist() == [255, 0, 51]
    normalised = transform.normalize(sample["image"])
    assert normalised.dtype == torch.float32 and normalised.shape == (3, 8, 8)
    assert normalised[:, 0, 0].tolist() == pytest.approx([8.0, -2.0, (0.2 - 0.6) / 0.3], abs=1e-5)
    assert sample["keypoints"].shape == (0, 3)


def _old_float_path(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """What samples held before they were uint8: ``(x / 255 - mean) / std`` of ``(H, W, 3)`` bytes, in float64."""
    values = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float64)) / 255.0
    mean_t, std_t = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (mean, std))
    return (values - mean_t) / std_t


def test_normalize_equals_the_float_path_to_within_rounding() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ImageNet values
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = 0, 255  # both ends of the range
    transform = SampleTransform(20, "none", mean, std)
    uint8 = transform(Image.fromarray(pixels), np.zeros((0, 3)), np.array([0.0, 0.0, 23.0, 19.0]))["image"]
    # The test transform of a 24 x 20 image at 20 px: the centre 20 columns, untouched.
    np.testing.assert_array_equal(uint8.numpy(), pixels[:, 2:22].transpose(2, 0, 1))
    expected = _old_float_path(pixels[:, 2:22], mean, std)
    single = transform.normalize(uint8)
    batch = transform.normalize(torch.stack([uint8, uint8.flip(-1)]))
    assert single.dtype == batch.dtype == torch.float32 and batch.shape == (2, 3, 20, 20)
    # float32 rounding of values up to 2.7: a few 1e-7.
    torch.testing.assert_close(single.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[0], single, rtol=0, atol=0)
    torch.testing.assert_close(batch[1], single.flip(-1), rtol=0, atol=0)
    # Floating inputs are read as pixel values on the same 0..255 scale, and never written to.
    torch.testing.assert_close(transform.normalize(uint8.double()), single, rtol=0, atol=1e-6)
    floats = uint8.float()
    torch.testing.assert_close(transform.normalize(floats), single, rtol=0, atol=0)
    assert torch.equal(floats, uint8.float())
    # The bare image transform still returns what the model takes.
    bare = image_transform(20, mean, std)(Image.fromarray(pixels))
    assert bare.dtype == torch.float32
    torch.testing.assert_close(bare.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(3, 4, 4, dtype=torch.int64), "uint8 images"),
        (torch.zeros(3, 4, 4, dtype=torch.bool), "uint8 images"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), r"\(3, H, W\) or \(B, 3, H, W\)"),
        (torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8), r"\(3, H, W\) or \(B, 3, H, W\)"),
        (np.zeros((3, 4, 4), dtype=np.uint8), "expected a tensor"),
    ],
)
def test_normalize_refuses_what_is_not_an_image_batch(images: object, message: str) -> None:
    with pytest.raises(IVPTError, match=message):
        Normalize(MEAN, STD)(images)  # type: ignore[arg-type]


def test_normalize_keeps_its_device_constants_out_of_pickles() -> None:
    import pickle

    normalize = SampleTransform(8, "none", MEAN, STD).normalize
    normalize(torch.zeros(3, 2, 2, dtype=torch.uint8))
    assert normalize._constants  # made on first use
    copy = pickle.loads(pickle.dumps(normalize))
    assert copy._constants == {} and copy.mean == normalize.mean and copy.std == normalize.std
    seven = torch.full((3, 1, 1), 7, dtype=torch.uint8)
    torch.testing.assert_close(copy(seven), normalize(seven))
