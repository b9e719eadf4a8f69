"""Faithfulness of the part explanation: does removing the most important part hurt the prediction?

For each image the predicted class ``c`` is taken from the original logits. The most important part is
the one with the largest contribution to the logit of ``c`` (``argmax_n part_logits[b, n, c] / N``; the
``1/N`` does not change the argmax). Its region (pixels where it wins the argmax of the final maps) is
replaced by a blurred copy of the image, and so is a random region of the same pixel count. The
probability of ``c`` is read before and after each removal:

- ``faithfulness_part_drop``: mean of ``p_orig - p_part_removed``, in percentage points;
- ``faithfulness_random_drop``: mean of ``p_orig - p_random_removed``, in percentage points;
- ``faithfulness``: ``part_drop - random_drop`` (positive: the explanation points at evidence the model
  really uses);
- ``faithfulness_ratio``: ``part_drop / random_drop`` (NaN when the random drop is exactly 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ivpt.metrics._base import CountMeter, MetricError, check_maps, check_positive, image_size

if TYPE_CHECKING:
    from ivpt.model.output import IVPTOutput


def part_region_masks(maps: Tensor, part_index: Tensor, input_size: int | Sequence[int]) -> Tensor:
    """Region of one part per image, at input resolution.

    Args:
        maps: ``(B, K, h, w)`` maps; the argmax runs over all ``K`` channels.
        part_index: ``(B,)`` channel whose region is wanted, per image.
        input_size: ``S`` or ``(H, W)`` of the model input.

    Returns:
        ``(B, H, W)`` bool: pixels whose grid cell (nearest upsampling) has ``part_index`` as argmax.
    """
    check_maps(maps)
    if part_index.shape != maps.shape[:1]:
        raise MetricError(f"part_index: expected shape ({maps.shape[0]},), got {tuple(part_index.shape)}")
    winners = maps.argmax(dim=1) == part_index.to(maps.device)[:, None, None]  # (B, h, w)
    upsampled = F.interpolate(winners[:, None].float(), size=image_size(input_size), mode="nearest")
    return upsampled[:, 0] > 0.5


def random_region_like(mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random region with exactly the pixel count (and the shape) of each ``mask``.

    Each ``(H, W)`` mask of the ``(B, H, W)`` batch is translated cyclically by a random offset drawn
    uniformly from ``[0, H) x [0, W)``: whatever leaves one border re-enters at the opposite one, so
    the area is preserved exactly. The offsets are drawn on the generator's device (CPU when None).
    """
    if mask.dim() != 3:
        raise MetricError(f"mask: expected a (B, H, W) tensor, got shape {tuple(mask.shape)}")
    batch, height, width = mask.shape
    rng_device = generator.device if generator is not None else torch.device("cpu")
    shift_y = torch.randint(height, (batch,), generator=generator, device=rng_device).to(mask.device)
    shift_x = torch.randint(width, (batch,), generator=generator, device=rng_device).to(mask.device)
    rows = (torch.arange(height, device=mask.device)[None] - shift_y[:, None]) % height  # (B, H)
    cols = (torch.arange(width, device=mask.device)[None] - shift_x[:, None]) % width  # (B, W)
    batch_index = torch.arange(batch, device=mask.device)[:, None, None]
    return mask[batch_index, rows[:, :, None], cols[:, None, :]]


def default_blur_sigma(input_size: int | Sequence[int]) -> float:
    """Blur strength used when none is given: 3% of the shorter image side (15.5 px at 518, 6.7 at 224)."""
    return 0.03 * min(image_size(input_size))


def blur_images(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(B, C, H, W)`` images with standard deviation ``sigma`` pixels.

    Separable filter over ``+-3 sigma`` with reflective borders; the kernel is shortened when the image is
    too small for that padding.
    """
    check_positive(sigma, "sigma")
    if images.dim() != 4:
        raise MetricError(f"images: expected a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
    radius = min(math.ceil(3 * sigma), min(images.shape[-2:]) - 1)
    if radius == 0:
        return images.clone()
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(images.dtype)
    channels = images.shape[1]
    horizontal = weights.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = weights.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)


def replace_region(images: Tensor, replacement: Tensor, mask: Tensor) -> Tensor:
    """``images`` with the pixels of ``mask (B, H, W)`` taken from ``replacement`` (same shape as images)."""
    return torch.where(mask[:, None].to(images.device), replacement, images)


@torch.no_grad()
def faithfulness_batch(
    model_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    output: IVPTOutput,
    generator: torch.Generator | None = None,
    sigma: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Probabilities of the predicted class before and after removing the top part / a random region.

    Args:
        model_fn: ``images (B, 3, H, W) -> logits (B, C)`` (e.g. ``lambda x: model(x).logits``).
        images: ``(B, 3, H, W)`` normalised images that produced ``output``.
        output: the model's :class:`~ivpt.model.output.IVPTOutput` for ``images`` (uses ``logits (B, C)``,
            ``part_logits (B, N, C)`` and ``concept_maps[-1] (B, N + 1, h, w)``).
        generator: drives the random regions.
        sigma: blur strength in pixels; :func:`default_blur_sigma` when None.

    Returns:
        ``(p_orig, p_part_removed, p_random_removed)``, each ``(B,)``.
    """
    if output.part_logits is None or not output.concept_maps:
        raise MetricError("faithfulness needs a model with parts (part_logits and concept_maps); this one has none")
    input_size = tuple(images.shape[-2:])
    logits = output.logits
    predicted = logits.argmax(dim=1)
    batch_index = torch.arange(logits.shape[0], device=logits.device)
    top_part = output.part_logits[batch_index, :, predicted].argmax(dim=1)  # (B,)
    part_mask = part_region_masks(output.concept_maps[-1], top_part, input_size)
    random_mask = random_region_like(part_mask, generator)
    blurred = blur_images(images, sigma if sigma is not None else default_blur_sigma(input_size))

    def probability_of_prediction(batch_logits: Tensor) -> Tensor:
        return batch_logits.float().softmax(dim=1)[batch_index, predicted]

    return (
        probability_of_prediction(logits),
        probability_of_prediction(model_fn(replace_region(images, blurred, part_mask))),
        probability_of_prediction(model_fn(replace_region(images, blurred, random_mask))),
    )


class FaithfulnessMeter(CountMeter):
    """Streaming means of the probability drops (see the module docstring for the returned keys).

    State: ``sums (3,)`` float64 sums of ``p_orig``, ``p_part_removed``, ``p_random_removed``, and
    ``images ()``.
    """

    _state_names = ("sums", "images")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.images = torch.zeros((), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(self, prob_orig: Tensor, prob_part_removed: Tensor, prob_random_removed: Tensor) -> None:
        """Add a batch of ``(B,)`` probabilities of the predicted class."""
        if prob_orig.dim() != 1 or not prob_orig.shape == prob_part_removed.shape == prob_random_removed.shape:
            raise MetricError(
                "faithfulness probabilities: expected three (B,) tensors of equal shape, got "
                f"{tuple(prob_orig.shape)}, {tuple(prob_part_removed.shape)}, {tuple(prob_random_removed.shape)}"
            )
        stacked = torch.stack([prob_orig, prob_part_removed, prob_random_removed]).double()
        self.sums += stacked.sum(dim=1).to(self.device)
        self.images += prob_orig.shape[0]

    def compute(self) -> dict[str, float]:
        count = int(self.images)
        if count == 0:
            raise MetricError("FaithfulnessMeter: no images were added before compute()")
        mean_orig, mean_part, mean_random = (float(v) / count for v in self.sums)
        part_drop = 100.0 * (mean_orig - mean_part)
        random_drop = 100.0 * (mean_orig - mean_random)
        return {
            "faithfulness_part_drop": part_drop,
            "faithfulness_random_drop": random_drop,
            "faithfulness_ratio": part_drop / random_drop if random_drop != 0 else math.nan,
            "faithfulness": part_drop - random_drop,
        }
