"""The random affine transform of the equivariance loss: ranges, conventions, round trips."""

from __future__ import annotations

import math

import pytest
import torch

from ivpt.losses import affine_matrix, invert_affine, sample_affine, unwarp_maps, unwarp_validity, warp_images


def _decompose(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recover (angle, translation, scale) of the content motion ``p -> s R p + t`` from ``theta``."""
    inv_linear = theta[:, :2]  # R^T / s
    scale = inv_linear.det().rsqrt()
    rotation = (inv_linear * scale).T
    angle = torch.atan2(rotation[1, 0], rotation[0, 0])
    translation = -(rotation * scale) @ theta[:, 2]
    return angle, translation, scale


def _dot_image(size: int, row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[0, 0, row, col] = 1.0
    return image


def _brightest(image: torch.Tensor) -> tuple[int, int]:
    flat = int(image[0, 0].flatten().argmax())
    return divmod(flat, image.shape[-1])


def _smooth_blobs(size: int = 32) -> torch.Tensor:
    """(1, 3, size, size) smooth Gaussian bumps, so bilinear resampling is nearly exact."""
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centres = [(10.0, 12.0), (20.0, 18.0), (15.0, 9.0)]
    bumps = [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2)) for cy, cx in centres]
    return torch.stack(bumps).unsqueeze(0)


def test_sample_affine_stays_within_the_documented_ranges_and_covers_them() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = [_decompose(sample_affine(generator)) for _ in range(400)]
    angles = torch.stack([a for a, _, _ in draws])
    translations = torch.stack([t for _, t, _ in draws])
    scales = torch.stack([s for _, _, s in draws])

    assert angles.abs().max() <= math.pi / 2 + 1e-5
    assert angles.min() < math.radians(-80) and angles.max() > math.radians(80)
    # 11% of the size is 0.22 normalised units (the frame spans 2).
    assert translations.abs().max() <= 0.22 + 1e-5
    assert translations.min() < -0.19 and translations.max() > 0.19
    assert scales.min() >= 0.8 - 1e-5 and scales.max() <= 1.4 + 1e-5
    assert scales.min() < 0.85 and scales.max() > 1.35


def test_sample_affine_is_reproducible_with_a_seeded_generator() -> None:
    first = sample_affine(torch.Generator().manual_seed(7))
    again = sample_affine(torch.Generator().manual_seed(7))
    other = sample_affine(torch.Generator().manual_seed(8))
    assert first.shape == (2, 3) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_sample_affine_uses_exactly_one_draw_of_the_generator() -> None:
    generator = torch.Generator().manual_seed(3)
    sample_affine(generator)
    after_one = torch.rand(1, generator=generator)
    reference = torch.Generator().manual_seed(3)
    torch.rand(4, generator=reference)
    assert torch.equal(after_one, torch.rand(1, generator=reference))


def test_affine_matrix_recovers_its_parameters() -> None:
    angle, translation, scale = torch.tensor(0.3), torch.tensor([0.1, -0.05]), torch.tensor(1.2)
    got_angle, got_translation, got_scale = _decompose(affine_matrix(angle, translation, scale))
    torch.testing.assert_close(got_angle, angle)
    torch.testing.assert_close(got_translation, translation)
    torch.testing.assert_close(got_scale, scale)


@pytest.mark.parametrize(
    ("angle", "translation", "scale", "source", "expected"),
    [
        # 17-pixel frame: pixel 8 sits exactly on the centre. A shift of 0.5 normalised units is a
        # quarter of the frame, 4.25 px: most of the dot lands 4 px to the right.
        (0.0, (0.5, 0.0), 1.0, (8, 8), (8, 12)),
        # Positive angle turns +x towards +y: a dot right of the centre ends up below it.
        (math.pi / 2, (0.0, 0.0), 1.0, (8, 12), (12, 8)),
        # Zoom 2 doubles the dot's offset from the centre (3 px -> 6 px).
        (0.0, (0.0, 0.0), 2.0, (8, 11), (8, 14)),
    ],
)
def test_warp_images_moves_content_as_documented(
    angle: float,
    translation: tuple[float, float],
    scale: float,
    source: tuple[int, int],
    expected: tuple[int, int],
) -> None:
    theta = affine_matrix(torch.tensor(angle), torch.tensor(translation), torch.tensor(scale))
    assert _brightest(warp_images(_dot_image(17, *source), theta)) == expected


def test_warp_images_fills_outside_with_zero_and_keeps_dtype() -> None:
    images = torch.ones(2, 3, 8, 8, dtype=torch.float64)
    shift_right = affine_matrix(torch.tensor(0.0), torch.tensor([1.0, 0.0]), torch.tensor(1.0))
    warped = warp_images(images, shift_right)
    assert warped.dtype == torch.float64 and warped.shape == images.shape
    # The left half now shows what lay left of the frame: zeros (the mean colour after normalisation).
    assert torch.all(warped[..., :3] == 0)
    torch.testing.assert_close(warped[..., 5:], torch.ones_like(warped[..., 5:]))


def test_invert_affine_composes_to_the_identity() -> None:
    theta = sample_affine(torch.Generator().manual_seed(1))
    inverse = invert_affine(theta)
    as_3x3 = torch.cat([theta, torch.tensor([[0.0, 0.0, 1.0]])])
    inverse_3x3 = torch.cat([inverse, torch.tensor([[0.0, 0.0, 1.0]])])
    torch.testing.assert_close(as_3x3 @ inverse_3x3, torch.eye(3), atol=1e-6, rtol=0)
    batched = invert_affine(theta.expand(3, 2, 3))
    torch.testing.assert_close(batched, inverse.expand(3, 2, 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unwarp_undoes_warp_wherever_the_content_stayed_in_frame(seed: int) -> None:
    maps = _smooth_blobs()
    theta = sample_affine(torch.Generator().manual_seed(seed))
    round_trip = unwarp_maps(warp_images(maps, theta), theta)
    inside = unwarp_validity(theta, (32, 32)) > 0.999
    assert inside.float().mean() > 0.3
    error = (round_trip - maps).abs()[inside.expand_as(maps)]
    # Two bilinear resamplings blur the bumps slightly; a wrong convention is off by O(1).
    assert error.max() < 0.05 and error.mean() < 0.005
    wrong_direction = (warp_images(warp_images(maps, theta), theta) - maps).abs()[inside.expand_as(maps)]
    assert wrong_direction.max() > 0.3


def test_unwarp_maps_aligns_a_coarse_grid_with_the_image_warp() -> None:
    # Maps on a 4x coarser grid of the same frame follow the same theta.
    fine = _smooth_blobs(32)
    coarse = torch.nn.functional.avg_pool2d(fine, 4)
    theta = affine_matrix(torch.tensor(0.4), torch.tensor([0.1, -0.1]), torch.tensor(1.1))
    coarse_of_warped = torch.nn.functional.avg_pool2d(warp_images(fine, theta), 4)
    aligned = unwarp_maps(coarse_of_warped, theta)
    inside = unwarp_validity(theta, (8, 8)) > 0.999
    assert (aligned - coarse).abs()[inside.expand_as(coarse)].max() < 0.1


def test_unwarp_validity_marks_what_left_the_frame() -> None:
    identity = affine_matrix(torch.tensor(0.0), torch.zeros(2), torch.tensor(1.0))
    torch.testing.assert_close(unwarp_validity(identity, (5, 7)), torch.ones(1, 1, 5, 7))
    # Content moved right by half the frame: its right half was cut off.
    shifted = affine_matrix(torch.tensor(0.0), torch.tensor([1.0, 0.0]), torch.tensor(1.0))
    validity = unwarp_validity(shifted, (4, 8))
    torch.testing.assert_close(validity[..., :4], torch.ones(1, 1, 4, 4))
    torch.testing.assert_close(validity[..., 4:], torch.zeros(1, 1, 4, 4))
