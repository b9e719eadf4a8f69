"""Pure functions that turn a model's maps and scores into what the figures show.

Nothing here draws or touches a model: inputs are tensors or arrays for ONE image, outputs are arrays or
plain records, so every function can be checked on hand-made maps whose answer is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ivpt.errors import IVPTError

ArrayLike = torch.Tensor | np.ndarray

# Share of the full overlay opacity that even the least confident region gets: with many concepts the
# winning probability can be small, and a region coloured in proportion to it alone would be invisible.
MIN_OPACITY_SHARE = 0.4


def _as_tensor(values: ArrayLike) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float32)
    return torch.as_tensor(np.asarray(values), dtype=torch.float32)


def denormalize_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the input normalisation: ``(3, H, W)`` normalised tensor -> ``(H, W, 3)`` uint8 for drawing.

    A ``uint8`` image (a data set's ``image``: never normalised) is already pixels: only its axes move.
    """
    if image.dtype == torch.uint8:
        return image.detach().cpu().permute(1, 2, 0).numpy().copy()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.detach().cpu().float() * std_t + mean_t).clamp(0.0, 1.0)
    return (pixels * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def upsample_maps(maps: ArrayLike, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize soft concept maps ``(K, h, w)`` to ``(K, H, W)`` with ``size = (H, W)``.

    Bilinear interpolation of a per-pixel distribution is again a distribution, so the result still sums
    to 1 over ``K``; ``align_corners=False`` keeps each patch centred on the pixels it covers.
    """
    grid = _as_tensor(maps)
    if grid.ndim != 3:
        raise IVPTError(f"concept maps: expected shape (K, h, w), got {tuple(grid.shape)}")
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]


def region_areas(maps: ArrayLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Fraction of pixels each concept claims (is the argmax at).

    Args:
        maps: ``(K, h, w)`` soft concept maps of one image (background last).
        size: ``(H, W)`` to measure at, after the same bilinear upsampling that :func:`overlay_maps`
            uses (so the numbers match the picture); ``None`` measures on the patch grid.

    Returns:
        ``(K,)`` float64 fractions that add up to 1.
    """
    grid = _as_tensor(maps) if size is None else upsample_maps(maps, size)
    if grid.ndim != 3:
        raise IVPTError(f"concept maps: expected shape (K, h, w), got {tuple(grid.shape)}")
    num_concepts = grid.shape[0]
    winners = grid.argmax(dim=0).flatten()
    counts = torch.bincount(winners, minlength=num_concepts).double()
    return (counts / winners.numel()).numpy()


def overlay_maps(image: np.ndarray, maps: ArrayLike, palette: np.ndarray, *, alpha: float = 0.65) -> np.ndarray:
    """Colour each pixel of ``image`` by the concept that claims it.

    The maps are upsampled to the image size; every pixel takes the colour of its argmax concept,
    blended with opacity ``alpha * (f + (1 - f) * confidence)`` where confidence is the winning
    probability and ``f`` = :data:`MIN_OPACITY_SHARE`: uncertain pixels show more of the photograph, yet
    every region stays visible. Background pixels (the last concept) stay uncoloured.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image.
        maps: ``(K, h, w)`` soft concept maps of that image, summing to 1 over ``K``.
        palette: ``(K, 3)`` RGB colours in ``[0, 1]`` (one stage of :func:`concept_palette`).
        alpha: opacity of a fully confident concept colour.

    Returns:
        ``(H, W, 3)`` uint8 image.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise IVPTError(f"overlay_maps: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    colours = np.asarray(palette, dtype=np.float64)
    grid = upsample_maps(maps, (image.shape[0], image.shape[1]))
    if colours.shape != (grid.shape[0], 3):
        raise IVPTError(
            f"overlay_maps: palette has shape {colours.shape}, expected ({grid.shape[0]}, 3) for "
            f"{grid.shape[0]} concept maps"
        )
    confidence, winner = grid.max(dim=0)
    winner_np = winner.numpy()
    opacity = alpha * (MIN_OPACITY_SHARE + (1.0 - MIN_OPACITY_SHARE) * confidence.double().numpy())
    opacity[winner_np == grid.shape[0] - 1] = 0.0
    blended = (1.0 - opacity[..., None]) * image.astype(np.float64) + opacity[..., None] * (colours[winner_np] * 255.0)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def part_contributions(part_logits: ArrayLike, class_index: int) -> np.ndarray:
    """Each final part's share of one class's logit.

    The model's logit is the mean of the part logits, ``logit_c = (1/N) sum_n part_logits[n, c]``, so
    part ``n`` contributes exactly ``part_logits[n, c] / N`` and the shares add up to the logit.

    Args:
        part_logits: ``(N, C)`` part scores of one image.
        class_index: the class ``c`` to explain.

    Returns:
        ``(N,)`` float64 contributions.
    """
    scores = _as_tensor(part_logits).double()
    if scores.ndim != 2:
        raise IVPTError(f"part_contributions: expected part logits of shape (N, C), got {tuple(scores.shape)}")
    num_parts, num_classes = scores.shape
    if not 0 <= class_index < num_classes:
        raise IVPTError(f"part_contributions: class index {class_index} is outside 0..{num_classes - 1}")
    return (scores[:, class_index] / num_parts).numpy()


@dataclass(frozen=True)
class FlowEdge:
    """One arrow of the fine-to-coarse hierarchy: a concept feeding a coarser concept.

    Stages are 0-based over all stages (the last one holds the final parts); concepts are foreground
    indices within their stage.
    """

    source_stage: int
    source_concept: int
    target_stage: int
    target_concept: int
    weight: float


def grouping_flow(
    groupings: Sequence[ArrayLike], targets: Sequence[int] | None = None, *, min_weight: float = 0.0
) -> list[FlowEdge]:
    """Edges of the concept hierarchy for drawing.

    Args:
        groupings: per stage ``s = 0..S-2``, ``(K_s - 1, N_t)`` soft assignment of the stage's foreground
            concepts to the foreground concepts of its target stage (rows sum to 1).
        targets: the 0-based target stage of each grouping (``IVPTOutput.fusion_targets``); by default
            every stage feeds the last stage (``final`` mode). In ``chain`` mode it is ``[1, 2, ..., S-1]``.
        min_weight: edges lighter than this are left out.

    Returns:
        Edges ordered by source stage, source concept, target concept.
    """
    final_stage = len(groupings)
    stage_targets = list(targets) if targets is not None else [final_stage] * len(groupings)
    if len(stage_targets) != len(groupings):
        raise IVPTError(
            f"grouping_flow: {len(groupings)} groupings but {len(stage_targets)} target stages; expected one each"
        )
    edges: list[FlowEdge] = []
    for stage, (weights, target) in enumerate(zip(groupings, stage_targets, strict=True)):
        matrix = _as_tensor(weights).double()
        if matrix.ndim != 2:
            raise IVPTError(f"grouping_flow: stage {stage} grouping must be (K_s - 1, N_t), got {tuple(matrix.shape)}")
        if target <= stage:
            raise IVPTError(f"grouping_flow: stage {stage} groups into stage {target}; expected a deeper stage")
        for (source, destination), weight in np.ndenumerate(matrix.numpy()):
            if weight >= min_weight:
                edges.append(FlowEdge(stage, int(source), int(target), int(destination), float(weight)))
    return edges


__all__ = [
    "MIN_OPACITY_SHARE",
    "FlowEdge",
    "denormalize_image",
    "grouping_flow",
    "overlay_maps",
    "part_contributions",
    "region_areas",
    "upsample_maps",
]
