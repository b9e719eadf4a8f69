"""Each loss term on hand-made maps with known values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ivpt.losses import (
    StageMaps,
    affine_matrix,
    background_presence_loss,
    classification_loss,
    consistency_loss,
    entropy_loss,
    equivariance_loss,
    orthogonality_loss,
    presence_loss,
    sample_affine,
    smooth_maps,
    total_variation_loss,
    warp_images,
)
from ivpt.losses.terms import radial_mask


def _one_hot_maps(labels: torch.Tensor, channels: int) -> torch.Tensor:
    """``labels`` ``(B, h, w)`` of channel indices -> ``(B, K, h, w)`` one-hot maps."""
    return F.one_hot(labels, channels).permute(0, 3, 1, 2).float()


def _random_maps(*shape: int, seed: int = 0, sharpness: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(*shape, generator=generator), dim=1)


def _smooth_part_maps(size: int = 24, seed: int = 0, spread: float = 0.4) -> torch.Tensor:
    """(2, 4, size, size) maps of three smooth foreground parts and a background, like a model's.

    Part centres lie in the central ``spread`` fraction of the frame."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for _ in range(2):
        centres = size * (0.5 - spread / 2 + spread * torch.rand(3, 2, generator=generator))
        logits = [-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2) * 4 for cy, cx in centres]
        logits.append(torch.full_like(yy, -2.0))
        images.append(torch.softmax(torch.stack(logits), dim=0))
    return torch.stack(images)


# ---------------------------------------------------------------------------------------------------


def test_smooth_maps_is_positive_and_normalised() -> None:
    maps = _one_hot_maps(torch.tensor([[[0, 1], [2, 0]]]), 3)
    smoothed = smooth_maps(maps)
    assert smoothed.min() > 0
    torch.testing.assert_close(smoothed.sum(dim=1), torch.ones(1, 2, 2))
    torch.testing.assert_close(smoothed.max(), torch.tensor((1 + 1e-6) / (1 + 3e-6)))


def test_classification_loss_matches_log_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    expected = -(torch.log_softmax(logits, 1)[[0, 1], [0, 2]]).mean()
    torch.testing.assert_close(classification_loss(logits, labels), expected)
    # Label smoothing 0.3 over 3 classes: target 0.8 on the label, 0.1 elsewhere.
    smoothed_target = torch.full((2, 3), 0.1)
    smoothed_target[[0, 1], [0, 2]] = 0.8
    expected_smoothed = -(smoothed_target * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(classification_loss(logits, labels, label_smoothing=0.3), expected_smoothed)


def test_consistency_is_zero_for_equal_maps_and_matches_a_hand_computed_kl() -> None:
    target = _random_maps(2, 3, 4, 4)
    assert consistency_loss(target.clone(), target).abs() < 1e-6

    # One image, two pixels, two channels.
    target = torch.tensor([[[[0.75, 1.0]], [[0.25, 0.0]]]])  # (1, 2, 1, 2)
    fused = torch.tensor([[[[0.5, 0.9]], [[0.5, 0.1]]]])
    first_pixel = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    second_pixel = 1.0 * math.log(1.0 / 0.9)  # the empty target channel contributes ~0
    expected = (first_pixel + second_pixel) / 2
    torch.testing.assert_close(consistency_loss(fused, target), torch.tensor(expected), atol=1e-6, rtol=1e-5)


def test_consistency_of_several_stages_is_the_mean_of_each() -> None:
    target = _random_maps(2, 3, 4, 4, seed=1)
    fused_a, fused_b = _random_maps(2, 3, 4, 4, seed=2), _random_maps(2, 3, 4, 4, seed=3)
    chain_target = _random_maps(2, 5, 4, 4, seed=4)
    fused_c = _random_maps(2, 5, 4, 4, seed=5)
    separate = [
        consistency_loss(fused_a, target),
        consistency_loss(fused_b, target),
        consistency_loss(fused_c, chain_target),
    ]
    together = consistency_loss([fused_a, fused_b, fused_c], [target, target, chain_target])
    assert all(value > 0.05 for value in separate)
    torch.testing.assert_close(together, torch.stack(separate).mean())


def test_consistency_stops_the_gradient_into_its_target() -> None:
    target = _random_maps(2, 3, 4, 4, seed=1).requires_grad_()
    fused = _random_maps(2, 3, 4, 4, seed=2).requires_grad_()
    consistency_loss(fused, target).backward()
    assert target.grad is None
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def test_consistency_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match=r"fused stage 0: fused maps \(1, 3, 2, 2\) and target maps \(1, 4, 2, 2\)"):
        consistency_loss(torch.rand(1, 3, 2, 2), torch.rand(1, 4, 2, 2))
    with pytest.raises(ValueError, match="got 2 fused and 1 target maps"):
        consistency_loss([torch.rand(1, 3, 2, 2)] * 2, [torch.rand(1, 3, 2, 2)])


def test_presence_is_zero_when_every_part_fills_a_patch_in_some_image() -> None:
    labels = torch.full((2, 6, 6), 2)  # background everywhere
    labels[0, 1:4, 2:5] = 0  # part 0: a 3x3 patch in image 0 only
    labels[1, 4:6, 0:2] = 1  # part 1: a 2x2 patch in image 1's corner (full, in-frame neighbourhood)
    assert presence_loss(_one_hot_maps(labels, 3)) < 1e-5


def test_presence_of_a_single_pixel_and_of_a_missing_part() -> None:
    labels = torch.full((1, 6, 6), 2)
    labels[0, 2, 3] = 0  # part 0: one interior pixel -> pooled peak 1/9; part 1 absent -> ~0
    expected = 1 - (1 / 9 + 0) / 2
    torch.testing.assert_close(presence_loss(_one_hot_maps(labels, 3)), torch.tensor(expected), atol=1e-5, rtol=0)


def test_radial_mask_is_zero_at_the_centre_and_one_at_the_corners() -> None:
    mask = radial_mask(5, 5, torch.device("cpu"))
    assert mask[2, 2] == 0
    torch.testing.assert_close(mask[[0, 0, 4, 4], [0, 4, 0, 4]], torch.ones(4))
    torch.testing.assert_close(mask[0, 2], torch.tensor(0.5))


def test_background_presence_rewards_background_at_the_border() -> None:
    labels = torch.zeros(2, 7, 7, dtype=torch.long)
    labels[:, :2, :2] = 1  # background fills a 2x2 corner of every image
    assert background_presence_loss(_one_hot_maps(labels, 2)) < 1e-5

    centre_only = torch.zeros(2, 7, 7, dtype=torch.long)
    centre_only[:, 2:5, 2:5] = 1
    # Pooled background peaks where the mask is small: at most 4/9 coverage times m = 0.5 or so.
    assert background_presence_loss(_one_hot_maps(centre_only, 2)) > 1.0

    absent = background_presence_loss(_one_hot_maps(torch.zeros(2, 7, 7, dtype=torch.long), 2))
    assert torch.isfinite(absent) and absent > 13.0  # -log(~1e-6)


def test_background_presence_is_the_mean_of_per_image_bce() -> None:
    labels = torch.zeros(2, 7, 7, dtype=torch.long)
    labels[0, :2, :2] = 1  # image 0: present (loss ~0); image 1: a single corner pixel -> 1/4 pooled
    labels[1, 0, 6] = 1
    expected = (0.0 - math.log(0.25)) / 2
    torch.testing.assert_close(
        background_presence_loss(_one_hot_maps(labels, 2)), torch.tensor(expected), atol=1e-4, rtol=0
    )


def test_background_presence_gradient_is_finite_when_background_vanishes() -> None:
    maps = _one_hot_maps(torch.zeros(1, 5, 5, dtype=torch.long), 3).requires_grad_()
    background_presence_loss(maps).backward()
    assert torch.isfinite(maps.grad).all() and maps.grad[:, 2].abs().sum() > 0


def test_equivariance_is_zero_for_perfectly_equivariant_maps() -> None:
    maps = _smooth_part_maps()
    theta = sample_affine(torch.Generator().manual_seed(0))
    maps_of_transformed = warp_images(maps, theta)  # what an equivariant model would predict on T(x)
    assert equivariance_loss(maps, maps_of_transformed, theta) < 0.01


def test_equivariance_mask_ignores_content_the_transform_cut_off() -> None:
    maps = _smooth_part_maps(spread=0.9)  # parts near the border
    strong = affine_matrix(torch.tensor(1.2), torch.tensor([0.22, 0.22]), torch.tensor(1.4))
    maps_of_transformed = warp_images(maps, strong)
    assert equivariance_loss(maps, maps_of_transformed, strong) < 0.01
    # Without the mask, parts pushed out of the frame count against perfectly equivariant maps.
    assert equivariance_loss(maps, maps_of_transformed, strong, mask_outside=False) > 0.05


def test_equivariance_penalises_maps_that_ignore_the_transform() -> None:
    maps = _smooth_part_maps()
    identity = affine_matrix(torch.tensor(0.0), torch.zeros(2), torch.tensor(1.0))
    assert equivariance_loss(maps, maps, identity) < 1e-5
    quarter_turn = affine_matrix(torch.tensor(math.pi / 2), torch.zeros(2), torch.tensor(1.0))
    assert equivariance_loss(maps, maps, quarter_turn) > 0.2


def test_equivariance_rejects_stage_mismatch() -> None:
    theta = affine_matrix(torch.tensor(0.0), torch.zeros(2), torch.tensor(1.0))
    with pytest.raises(ValueError, match="do not match the original maps"):
        equivariance_loss(torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4, 4), theta)


def test_orthogonality_is_zero_for_orthogonal_columns_of_any_length() -> None:
    q, _ = torch.linalg.qr(torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(0)))
    lengths = torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0])
    assert orthogonality_loss(q * lengths) < 1e-10


def test_orthogonality_of_identical_columns() -> None:
    features = torch.ones(3, 8, 4)
    # Every off-diagonal cosine is 1, the diagonal matches: 12 of 16 entries are off by 1.
    torch.testing.assert_close(orthogonality_loss(features), torch.tensor(12 / 16))


def test_total_variation_of_a_constant_and_a_checkerboard() -> None:
    assert total_variation_loss(torch.full((2, 4, 5, 6), 0.25)) < 1e-7
    height, width = 4, 6
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    checker = _one_hot_maps(((rows + cols) % 2).unsqueeze(0), 2)
    # Both channels flip at every step; smoothing shrinks the jump from 1 to 1 / (1 + 2e-6).
    jumps = 2 * ((height - 1) * width + height * (width - 1))
    expected = jumps / (1 + 2e-6) / (height * width)
    torch.testing.assert_close(total_variation_loss(checker), torch.tensor(expected))


def test_entropy_of_one_hot_and_uniform_maps() -> None:
    labels = torch.randint(0, 5, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    assert entropy_loss(_one_hot_maps(labels, 5)) < 1e-4
    torch.testing.assert_close(entropy_loss(torch.full((2, 5, 4, 4), 0.2)), torch.tensor(math.log(5)))


@pytest.mark.parametrize(
    "loss", [presence_loss, background_presence_loss, total_variation_loss, entropy_loss], ids=lambda f: f.__name__
)
def test_shaping_terms_average_over_stages_of_any_grid(loss) -> None:
    stages = [_random_maps(2, 6, 4, 4, seed=1, sharpness=3), _random_maps(2, 3, 4, 4, seed=2, sharpness=3)]
    finer = _random_maps(2, 4, 8, 8, seed=3, sharpness=3)
    per_stage = [loss(stage) for stage in [*stages, finer]]
    assert len({round(float(v), 4) for v in per_stage}) == 3  # the stages really differ
    torch.testing.assert_close(loss([*stages, finer]), torch.stack(per_stage).mean())
    torch.testing.assert_close(loss(StageMaps([*stages, finer])), torch.stack(per_stage).mean())


def test_equivariance_averages_over_stages() -> None:
    theta = sample_affine(torch.Generator().manual_seed(4))
    stages = [_random_maps(2, 6, 4, 4, seed=1, sharpness=3), _random_maps(2, 3, 4, 4, seed=2, sharpness=3)]
    transformed = [_random_maps(2, 6, 4, 4, seed=3, sharpness=3), _random_maps(2, 3, 4, 4, seed=4, sharpness=3)]
    per_stage = [equivariance_loss(a, b, theta) for a, b in zip(stages, transformed, strict=True)]
    torch.testing.assert_close(equivariance_loss(stages, transformed, theta), torch.stack(per_stage).mean())


def test_stage_maps_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"stage 1: expected \(B, K, h, w\) with K >= 2 .* got shape \(2, 1, 4, 4\)"):
        StageMaps([torch.rand(2, 3, 4, 4), torch.rand(2, 1, 4, 4)])
    with pytest.raises(ValueError, match="stage 1: batch 3 differs from stage 0's 2"):
        StageMaps([torch.rand(2, 3, 4, 4), torch.rand(3, 3, 4, 4)])
    with pytest.raises(ValueError, match="at least one stage"):
        StageMaps([])


def test_terms_are_fp32_under_autocast_and_for_bf16_inputs() -> None:
    maps = _random_maps(2, 4, 6, 6, seed=5, sharpness=2)
    fused = _random_maps(2, 4, 6, 6, seed=6, sharpness=2)
    features = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    theta = sample_affine(torch.Generator().manual_seed(1))
    cases = {
        "consistency": lambda m, f, x: consistency_loss(f, m),
        "presence": lambda m, f, x: presence_loss(m),
        "bg_presence": lambda m, f, x: background_presence_loss(m),
        "equivariance": lambda m, f, x: equivariance_loss(m, f, theta),
        "orthogonality": lambda m, f, x: orthogonality_loss(x),
        "total_variation": lambda m, f, x: total_variation_loss(m),
        "entropy": lambda m, f, x: entropy_loss(m),
    }
    for name, term in cases.items():
        reference = term(maps, fused, features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = term(maps.bfloat16(), fused.bfloat16(), features.bfloat16())
            same_inputs = term(maps, fused, features)
        assert low.dtype == torch.float32 and torch.isfinite(low), name
        torch.testing.assert_close(same_inputs, reference, msg=name)
        torch.testing.assert_close(low, reference, atol=3e-2, rtol=3e-2, msg=name)
