"""Classification accuracy: top-1, top-k and macro (mean per-class) accuracy, in percent."""

from __future__ import annotations

import torch
from torch import Tensor

from ivpt.metrics._base import CountMeter, MetricError, check_labels


class AccuracyMeter(CountMeter):
    """Streaming top-1 / top-k / macro accuracy.

    The state is three per-class counts (images, top-1 hits, top-k hits), so meters of different
    ranks merge by summation. With fewer than ``topk`` classes every label is within the top-k, as
    the definition of top-k accuracy says; the key keeps the requested ``k``.

    Args:
        num_classes: number of classes ``C``.
        topk: ``k`` of the top-k accuracy.
        device: where the counts live (put them beside the logits to avoid a copy per batch).

    ``compute()`` returns ``accuracy_top1``, ``accuracy_top{k}`` and ``accuracy_macro`` (mean over the
    classes that have at least one image of the per-class top-1 accuracy).
    """

    _state_names = ("images_per_class", "top1_per_class", "topk_per_class")

    def __init__(self, num_classes: int, topk: int = 5, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise MetricError(f"num_classes: expected at least 1 class, got {num_classes}")
        if topk < 1:
            raise MetricError(f"topk: expected k >= 1, got {topk}")
        super().__init__(device)
        self.num_classes = num_classes
        self.topk = topk
        self.reset()

    def reset(self) -> None:
        self.images_per_class = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
        self.top1_per_class = torch.zeros_like(self.images_per_class)
        self.topk_per_class = torch.zeros_like(self.images_per_class)

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add a batch: ``logits (B, C)`` scores (or probabilities), ``labels (B,)`` class indices."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise MetricError(f"logits: expected shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        check_labels(labels, logits.shape[0], self.num_classes)
        labels = labels.to(logits.device)
        k = min(self.topk, self.num_classes)
        ranked = logits.topk(k, dim=1).indices
        hits = ranked == labels[:, None]
        ones = torch.ones_like(labels)
        labels_here = labels.to(self.device)
        self.images_per_class.index_add_(0, labels_here, ones.to(self.device))
        self.top1_per_class.index_add_(0, labels_here, hits[:, 0].long().to(self.device))
        self.topk_per_class.index_add_(0, labels_here, hits.any(dim=1).long().to(self.device))

    def compute(self) -> dict[str, float]:
        total = int(self.images_per_class.sum())
        if total == 0:
            raise MetricError("AccuracyMeter: no images were added before compute()")
        seen = self.images_per_class > 0
        per_class = self.top1_per_class[seen].double() / self.images_per_class[seen].double()
        return {
            "accuracy_top1": 100.0 * int(self.top1_per_class.sum()) / total,
            f"accuracy_top{self.topk}": 100.0 * int(self.topk_per_class.sum()) / total,
            "accuracy_macro": 100.0 * float(per_class.mean()),
        }
