"""Data-set-wide concept statistics gathered in one streaming pass (what ``ivpt report`` shows).

:class:`ConceptStatisticsMeter` sees each batch once and keeps only running sums and, per concept, its
``top_k`` best candidate images (score, data-set index, patch) — never the maps — so a pass over CUB's
5,794 test images needs a few kilobytes of state per concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ivpt.errors import IVPTError
from ivpt.model.output import IVPTOutput


def typicality_scores(maps: Tensor) -> tuple[Tensor, Tensor]:
    """How strongly and where each concept shows up in each image.

    A concept's score is the maximum over patches of its map averaged over the 3x3 neighbourhood (as in
    the presence loss), so one stray confident patch ranks below a solid region.

    Args:
        maps: ``(B, K, h, w)`` concept maps.

    Returns:
        ``scores (B, K)`` and ``cells (B, K)``: the best smoothed value and its flat patch index
        ``row * w + col``.
    """
    smoothed = F.avg_pool2d(maps.float(), kernel_size=3, stride=1, padding=1, count_include_pad=False)
    scores, cells = smoothed.flatten(2).max(dim=2)
    return scores, cells


def claimed_fractions(maps: Tensor) -> Tensor:
    """``(B, K, h, w)`` maps -> ``(B, K)`` fraction of patches where each concept is the argmax."""
    num_concepts = maps.shape[1]
    winners = F.one_hot(maps.argmax(dim=1), num_concepts)  # (B, h, w, K)
    return winners.flatten(1, 2).float().mean(dim=1)


@dataclass
class ConceptStatistics:
    """What the report shows about the model's concepts over a whole data set.

    Attributes:
        num_concepts: ``K_s`` per stage (background last).
        fusion_targets: 0-based target stage of each grouped stage (``IVPTOutput.fusion_targets``).
        grid_size: ``(h, w)`` patch grid of the maps.
        num_images: images seen.
        mean_area: per stage ``(K_s,)`` mean fraction of an image each concept claims.
        presence: per stage ``(K_s,)`` fraction of images in which the concept claims at least one patch.
        mean_grouping: per grouped stage ``(K_s - 1, N_t)`` grouping weights averaged over the images
            in which the concept claims a region (a concept without a region gets a uniform row, which
            says nothing); uniform where the concept never appears.
        top_scores, top_images, top_cells: per stage ``(K_s, top_k)`` typicality score, data-set index
            and flat patch index of the concept's most typical images, best first (index -1: no image).
        class_part_usage: ``(C, N)`` mean share of each class's own logit per final part, over that
            class's images; ``None`` for models without parts.
        class_counts: ``(C,)`` images per class.
    """

    num_concepts: list[int]
    fusion_targets: list[int]
    grid_size: tuple[int, int]
    num_images: int
    mean_area: list[np.ndarray]
    presence: list[np.ndarray]
    mean_grouping: list[np.ndarray]
    top_scores: list[np.ndarray]
    top_images: list[np.ndarray]
    top_cells: list[np.ndarray]
    class_part_usage: np.ndarray | None
    class_counts: np.ndarray


class ConceptStatisticsMeter:
    """Streaming accumulator of :class:`ConceptStatistics`.

    Args:
        num_classes: C.
        top_k: typical images kept per concept.
        device: where the running state lives (the model's device avoids a copy per batch); ``None``:
            that of the first batch's output.
    """

    def __init__(self, num_classes: int, top_k: int, device: str | torch.device | None = "cpu") -> None:
        if top_k < 1:
            raise IVPTError(f"report: top_k must be at least 1, got {top_k}")
        self.num_classes = num_classes
        self.top_k = top_k
        self.device = None if device is None else torch.device(device)
        self.num_images = 0
        self._initialised = False

    def _initialise(self, output: IVPTOutput) -> None:
        maps = output.concept_maps
        if self.device is None:
            self.device = output.logits.device
        device = self.device
        self.num_concepts = [int(m.shape[1]) for m in maps]
        self.grid_size = (int(maps[0].shape[2]), int(maps[0].shape[3])) if maps else (0, 0)
        self.fusion_targets = list(output.fusion_targets) or [len(maps) - 1] * len(output.groupings)
        self.area_sum = [torch.zeros(k, dtype=torch.float64, device=device) for k in self.num_concepts]
        self.present_count = [torch.zeros(k, dtype=torch.float64, device=device) for k in self.num_concepts]
        self.grouping_sum = [torch.zeros(g.shape[1:], dtype=torch.float64, device=device) for g in output.groupings]
        self.top_scores = [torch.full((k, 0), -torch.inf, device=device) for k in self.num_concepts]
        self.top_images = [torch.full((k, 0), -1, dtype=torch.long, device=device) for k in self.num_concepts]
        self.top_cells = [torch.zeros((k, 0), dtype=torch.long, device=device) for k in self.num_concepts]
        num_parts = output.part_logits.shape[1] if output.part_logits is not None else 0
        self.usage_sum = torch.zeros(self.num_classes, num_parts, dtype=torch.float64, device=device)
        self.class_counts = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        self.has_parts = output.part_logits is not None
        self._initialised = True

    @torch.no_grad()
    def update(self, output: IVPTOutput, labels: Tensor, indices: Tensor) -> None:
        """Add one batch.

        Args:
            output: the model's output for the batch (eval mode).
            labels: ``(B,)`` true classes.
            indices: ``(B,)`` data-set positions of the images (``sample["index"]``), kept for the galleries.
        """
        if not self._initialised:
            self._initialise(output)
        labels = labels.to(self.device).long()
        indices = indices.to(self.device).long()
        self.num_images += int(labels.numel())
        self.class_counts += torch.bincount(labels, minlength=self.num_classes).double()
        if self.has_parts and output.part_logits is not None:
            part_logits = output.part_logits.to(self.device).double()
            num_parts = part_logits.shape[1]
            own_class = part_logits.gather(2, labels.view(-1, 1, 1).expand(-1, num_parts, 1))[..., 0]
            self.usage_sum.index_add_(0, labels, own_class / num_parts)

        for stage, maps in enumerate(output.concept_maps):
            maps = maps.to(self.device)
            fractions = claimed_fractions(maps)
            present = fractions > 0
            self.area_sum[stage] += fractions.double().sum(dim=0)
            self.present_count[stage] += present.double().sum(dim=0)
            if stage < len(output.groupings):
                weights = output.groupings[stage].to(self.device).double()
                self.grouping_sum[stage] += (weights * present[:, :-1, None]).sum(dim=0)
            scores, cells = typicality_scores(maps)
            pooled_scores = torch.cat([self.top_scores[stage], scores.T], dim=1)
            pooled_images = torch.cat([self.top_images[stage], indices[None].expand(scores.shape[1], -1)], dim=1)
            pooled_cells = torch.cat([self.top_cells[stage], cells.T], dim=1)
            best = pooled_scores.topk(min(self.top_k, pooled_scores.shape[1]), dim=1).indices
            self.top_scores[stage] = pooled_scores.gather(1, best)
            self.top_images[stage] = pooled_images.gather(1, best)
            self.top_cells[stage] = pooled_cells.gather(1, best)

    def observe(self, output: IVPTOutput, batch: dict[str, Any]) -> None:
        """:meth:`update` from a batch of the data set (``label``, ``index``): an ``ivpt eval`` observer."""
        self.update(output, batch["label"], batch["index"])

    def compute(self) -> ConceptStatistics:
        """The statistics of everything added so far.

        Raises:
            IVPTError: nothing was added.
        """
        if not self._initialised or self.num_images == 0:
            raise IVPTError("report: no images were seen; is the test split empty?")
        count = float(self.num_images)
        mean_grouping = []
        for stage, sums in enumerate(self.grouping_sum):
            seen = self.present_count[stage][:-1, None]
            uniform = torch.full_like(sums, 1.0 / sums.shape[1])
            mean_grouping.append(torch.where(seen > 0, sums / seen.clamp_min(1.0), uniform).cpu().numpy())

        def padded(values: list[Tensor], fill: float) -> list[np.ndarray]:
            # Fewer images than top_k: pad so that every stage has exactly top_k columns.
            out = []
            for v in values:
                missing = self.top_k - v.shape[1]
                out.append(F.pad(v, (0, missing), value=fill).cpu().numpy() if missing > 0 else v.cpu().numpy())
            return out

        usage = None
        if self.has_parts:
            usage = (self.usage_sum / self.class_counts.clamp_min(1.0)[:, None]).cpu().numpy()
        return ConceptStatistics(
            num_concepts=list(self.num_concepts),
            fusion_targets=list(self.fusion_targets),
            grid_size=self.grid_size,
            num_images=self.num_images,
            mean_area=[(s / count).cpu().numpy() for s in self.area_sum],
            presence=[(s / count).cpu().numpy() for s in self.present_count],
            mean_grouping=mean_grouping,
            top_scores=padded(self.top_scores, -float("inf")),
            top_images=padded(self.top_images, -1),
            top_cells=padded(self.top_cells, 0),
            class_part_usage=usage,
            class_counts=self.class_counts.cpu().numpy(),
        )


def concept_feeds(
    stats: ConceptStatistics, stage: int, concept: int, min_weight: float = 0.1
) -> list[tuple[int, float]]:
    """The concepts a foreground concept of a grouped stage feeds, with mean grouping weight >= ``min_weight``.

    Returns:
        ``(target concept, weight)`` pairs, strongest first, targets in stage ``stats.fusion_targets[stage]``;
        empty for an ungrouped stage or the background.
    """
    if stage >= len(stats.mean_grouping) or concept >= stats.mean_grouping[stage].shape[0]:
        return []
    weights = stats.mean_grouping[stage][concept]
    return [(int(t), float(weights[t])) for t in np.argsort(-weights, kind="stable") if weights[t] >= min_weight]


def crop_box(cell: int, grid_size: Sequence[int], image_size: Sequence[int], side: int) -> tuple[int, int, int, int]:
    """Square crop of ``side`` pixels centred on a patch, shifted to stay inside the image.

    Args:
        cell: flat patch index ``row * w + col``.
        grid_size: ``(h, w)`` patch grid.
        image_size: ``(H, W)`` image size in pixels.
        side: crop side (clipped to the image).

    Returns:
        ``(top, left, bottom, right)`` pixel bounds (bottom/right exclusive).
    """
    h, w = int(grid_size[0]), int(grid_size[1])
    height, width = int(image_size[0]), int(image_size[1])
    row, col = divmod(int(cell), w)
    centre_y, centre_x = (row + 0.5) * height / h, (col + 0.5) * width / w
    side_y, side_x = min(side, height), min(side, width)
    top = int(np.clip(round(centre_y - side_y / 2), 0, height - side_y))
    left = int(np.clip(round(centre_x - side_x / 2), 0, width - side_x))
    return top, left, top + side_y, left + side_x


__all__ = [
    "ConceptStatistics",
    "ConceptStatisticsMeter",
    "claimed_fractions",
    "concept_feeds",
    "crop_box",
    "typicality_scores",
]
