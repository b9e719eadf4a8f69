"""Faithfulness pieces: part regions, random regions, blur, the batch helper and the meter."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from ivpt.metrics import (
    FaithfulnessMeter,
    MetricError,
    blur_images,
    default_blur_sigma,
    faithfulness_batch,
    part_region_masks,
    random_region_like,
)
from ivpt.model.output import IVPTOutput


def test_part_region_masks_upsample_the_argmax_region() -> None:
    maps = torch.zeros(2, 3, 2, 2)
    maps[:, 0, 0, 0] = 1.0
    maps[:, 1, 1, :] = 1.0
    maps[:, 2, 0, 1] = 1.0
    masks = part_region_masks(maps, torch.tensor([0, 1]), input_size=(4, 6))
    assert masks.shape == (2, 4, 6) and masks.dtype == torch.bool
    expected_part0 = torch.zeros(4, 6, dtype=torch.bool)
    expected_part0[:2, :3] = True
    assert torch.equal(masks[0], expected_part0)
    assert torch.equal(masks[1], torch.arange(4)[:, None].expand(4, 6) >= 2)


def test_random_region_keeps_area_and_shape() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 6, 7, generator=generator) > 0.6
    region = random_region_like(mask, generator)
    assert torch.equal(region.sum(dim=(1, 2)), mask.sum(dim=(1, 2)))
    for original, moved in zip(mask, region, strict=True):
        rolls = [torch.roll(original, (dy, dx), dims=(0, 1)) for dy in range(6) for dx in range(7)]
        assert any(torch.equal(moved, rolled) for rolled in rolls)


def test_random_region_is_reproducible_from_the_generator() -> None:
    mask = torch.zeros(8, 16, 16, dtype=torch.bool)
    mask[:, :4, :4] = True
    first = random_region_like(mask, torch.Generator().manual_seed(5))
    second = random_region_like(mask, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    assert not all(torch.equal(first[i], mask[i]) for i in range(8))


def test_blur_keeps_shape_and_constants_and_smooths_texture() -> None:
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(2, 3, 16, 16)
    blurred = blur_images(checker, sigma=2.0)
    assert blurred.shape == checker.shape
    assert blurred.var() < 0.01 * checker.var()
    reference = gaussian_blur(checker, kernel_size=[13, 13], sigma=[2.0, 2.0])
    assert torch.allclose(blurred, reference, atol=1e-5)
    constant = torch.full((1, 3, 8, 8), 0.7)
    assert torch.allclose(blur_images(constant, sigma=20.0), constant)  # kernel shortened to fit 8 px
    with pytest.raises(MetricError, match="sigma: expected a positive value, got 0"):
        blur_images(constant, sigma=0)


def test_default_blur_sigma_scales_with_the_image() -> None:
    assert default_blur_sigma(518) == pytest.approx(15.54)
    assert default_blur_sigma((224, 300)) == pytest.approx(6.72)


class _QuadrantModel:
    """Class 0 scores the texture energy of the top-left quadrant; class 1 is a constant 2.5."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        energy = images[:, :, :8, :8].pow(2).mean(dim=(1, 2, 3))
        return torch.stack([5 * energy, torch.full_like(energy, 2.5)], dim=1)


def _quadrant_output(images: torch.Tensor, model: _QuadrantModel) -> IVPTOutput:
    batch = images.shape[0]
    maps = torch.zeros(batch, 3, 4, 4)
    maps[:, 0, :2, :2] = 1.0  # part 0 owns the top-left quadrant
    maps[:, 1, 2:, 2:] = 1.0  # part 1 the bottom-right one
    maps[:, 2] = 0.5  # background elsewhere
    part_logits = torch.zeros(batch, 2, 2)
    part_logits[:, 0, 0] = 3.0  # part 0 carries class 0
    part_logits[:, 1, 1] = 3.0  # part 1 carries class 1
    return IVPTOutput(logits=model(images), part_logits=part_logits, concept_maps=[maps])


def test_removing_the_evidence_part_hurts_more_than_a_random_region() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 16, 16, generator=generator).sign()
    model = _QuadrantModel()
    p_orig, p_part, p_random = faithfulness_batch(model, images, _quadrant_output(images, model), generator, 1.5)
    assert p_orig.shape == p_part.shape == p_random.shape == (16,)
    assert bool((p_orig > 0.9).all())
    # The whole evidence is blurred away: class 0 falls below the constant class 1.
    assert bool((p_part < 0.5).all())
    meter = FaithfulnessMeter()
    meter.update(p_orig, p_part, p_random)
    result = meter.compute()
    assert result["faithfulness_part_drop"] > result["faithfulness_random_drop"] > 0
    assert result["faithfulness"] == pytest.approx(
        result["faithfulness_part_drop"] - result["faithfulness_random_drop"]
    )


def test_faithfulness_needs_parts() -> None:
    images = torch.zeros(1, 3, 16, 16)
    with pytest.raises(MetricError, match="faithfulness needs a model with parts"):
        faithfulness_batch(lambda x: torch.zeros(1, 2), images, IVPTOutput(logits=torch.zeros(1, 2)))


def test_faithfulness_meter_arithmetic_and_merge() -> None:
    meter = FaithfulnessMeter()
    meter.update(torch.tensor([0.9, 0.7]), torch.tensor([0.4, 0.4]), torch.tensor([0.8, 0.6]))
    other = FaithfulnessMeter()
    other.update(torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.5]))
    result = meter.merge(other).compute()
    # Drops: part (0.5 + 0.3 + 0) / 3, random (0.1 + 0.1 + 0) / 3.
    assert result["faithfulness_part_drop"] == pytest.approx(80 / 3)
    assert result["faithfulness_random_drop"] == pytest.approx(20 / 3)
    assert result["faithfulness_ratio"] == pytest.approx(4.0)
    assert result["faithfulness"] == pytest.approx(20.0)

    unchanged = FaithfulnessMeter()
    unchanged.update(torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.5]))
    assert math.isnan(unchanged.compute()["faithfulness_ratio"])
    with pytest.raises(MetricError, match="expected three \\(B,\\) tensors of equal shape"):
        unchanged.update(torch.tensor([0.5]), torch.tensor([0.5, 0.1]), torch.tensor([0.5]))
    with pytest.raises(MetricError, match="no images were added"):
        FaithfulnessMeter().compute()
