"""Self-distillation between augmented views with masked tokens, for ``ivpt pretrain-backbone``.

Written for the demo ViT in the spirit of DINO (Caron et al., 2021: a student matches an exponential moving
average "teacher" of itself on another view of the image, the teacher's outputs centred and sharpened so
that they neither collapse to one prototype nor spread evenly over all of them) and iBOT (Zhou et al., 2022:
the same on the patch tokens, the student seeing some tokens masked and predicting what the teacher, who
sees them, makes of them). No label of any kind enters these terms.

- :func:`random_views`: each image cropped at a random scale and place, resized back and mirrored at random,
  with its part map warped alike (the renderer's dense terms follow the crop). Colours are left alone: the
  demo's classes differ in colour, and colour jitter would teach the features to ignore it.
- :func:`random_token_mask`: which patch tokens the student sees replaced by a learned mask token.
- :class:`ProjectionHead`: MLP, L2-normalised bottleneck, then a weight-normalised linear map to
  :data:`PROTOTYPES` scores; one shared by the CLS and the patch tokens.
- :class:`SelfDistillation`: the teacher (a frozen copy of backbone and head, updated by EMA), the centres
  and :meth:`SelfDistillation.losses`, the two terms ``distill_cls`` (cross-view, CLS) and ``distill_patch``
  (same view, masked patch tokens).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROTOTYPES = 512
HIDDEN = 256
BOTTLENECK = 64
STUDENT_TEMPERATURE = 0.1
TEACHER_TEMPERATURE = 0.04
CENTRE_MOMENTUM = 0.9
# The teacher's EMA momentum rises from this to 1 along a cosine over the training steps.
TEACHER_MOMENTUM = 0.992
# Area of a view's crop as a share of the image, and the range of its aspect ratio.
CROP_SCALE = (0.4, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Share of the patch tokens masked in a student view, drawn per image.
MASK_RATIO = (0.1, 0.5)


def random_views(images: Tensor, part_ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One random crop of every image, resized to its size and mirrored with probability 1/2.

    Args:
        images: ``(B, 3, S, S)`` normalised images.
        part_ids: ``(B, S, S)`` integer part ids.
        generator: the draws' source (on the CPU; the views are computed on the images' device).

    Returns:
        ``(views (B, 3, S, S), view_part_ids (B, S, S))``: bilinear for the pixels, nearest for the part ids
        (pixels from outside the image read the border's, the crop never leaves the image).
    """
    batch = images.shape[0]
    draws = torch.rand(batch, 5, generator=generator).to(images.device)
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * draws[:, 0]
    log_ratio = math.log(CROP_RATIO[0]) + (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0])) * draws[:, 1]
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)  # share of the image side
    height = (area / ratio).sqrt().clamp(max=1.0)
    centre_x = (2 * draws[:, 2] - 1) * (1 - width)  # normalised [-1, 1] coordinates, crop inside the image
    centre_y = (2 * draws[:, 3] - 1) * (1 - height)
    mirror = torch.where(draws[:, 4] < 0.5, -1.0, 1.0).to(images.dtype)
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ids = part_ids[:, None].to(images.dtype)
    ids = F.grid_sample(ids, grid, mode="nearest", padding_mode="border", align_corners=False)
    return views, ids[:, 0].round().long()


def random_token_mask(batch: int, tokens: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``(B, tokens)`` bool: per image, a random :data:`MASK_RATIO` share of the tokens (at least one)."""
    ratio = MASK_RATIO[0] + (MASK_RATIO[1] - MASK_RATIO[0]) * torch.rand(batch, 1, generator=generator)
    scores = torch.rand(batch, tokens, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < (ratio * tokens).ceil()).to(device)


class ProjectionHead(nn.Module):
    """``(..., D)`` -> ``(..., PROTOTYPES)`` scores: an MLP to an L2-normalised bottleneck, then cosine-like
    scores against weight-normalised prototypes (the prototypes' norm fixed at 1, as DINO does)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, BOTTLENECK)
        )
        self.prototypes = nn.Parameter(torch.randn(PROTOTYPES, BOTTLENECK) * BOTTLENECK**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.mlp(tokens), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()


class SelfDistillation(nn.Module):
    """The student's projection head and mask token, the EMA teacher and the centres of its outputs.

    Args:
        backbone: the student's ViT (trained by the caller's optimizer with :attr:`head` and
            :attr:`mask_token`); the teacher starts as a copy of it.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.head = ProjectionHead(dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        # The teacher is not a submodule: the optimizer and state_dict of the student must not see it.
        self._teacher = [copy.deepcopy(backbone).requires_grad_(False), copy.deepcopy(self.head).requires_grad_(False)]
        self.register_buffer("centre_cls", torch.zeros(PROTOTYPES))
        self.register_buffer("centre_patch", torch.zeros(PROTOTYPES))

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> SelfDistillation:
        # Moves and casts of the student (``.to(device)`` on any parent) move the teacher too.
        for part in self._teacher:
            part._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def update_teacher(self, backbone: nn.Module, progress: float) -> None:
        """EMA step of the teacher towards the student; ``progress`` in ``[0, 1]`` is the share of training done."""
        momentum = 1 - (1 - TEACHER_MOMENTUM) * (math.cos(math.pi * progress) + 1) / 2
        for teacher, student in zip(self._teacher, (backbone, self.head), strict=True):
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)

    @torch.no_grad()
    def teacher_outputs(self, views: Tensor, forward: Callable[[nn.Module, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Teacher scores ``(cls (B, K), patches (B, n, K))`` of unmasked views; ``forward(backbone, images)``
        gives a backbone's final normalised sequence ``(B, T, D)``."""
        backbone, head = self._teacher
        backbone.eval()
        sequence = forward(backbone, views)
        scores = head(sequence.float())
        return scores[:, 0], scores[:, backbone.num_prefix_tokens :]

    def losses(
        self,
        student_cls: tuple[Tensor, Tensor],
        student_patches: tuple[Tensor, Tensor],
        masks: tuple[Tensor, Tensor],
        teacher_cls: tuple[Tensor, Tensor],
        teacher_patches: tuple[Tensor, Tensor],
    ) -> dict[str, Tensor]:
        """The two distillation terms of two views (each argument: one tensor per view).

        Args:
            student_cls: ``(B, D)`` the student's final CLS token of each (masked) view.
            student_patches: ``(B, n, D)`` its final patch tokens.
            masks: ``(B, n)`` bool, the tokens masked in each student view.
            teacher_cls, teacher_patches: :meth:`teacher_outputs` of each unmasked view.

        Returns:
            ``distill_cls``: cross-entropy of the student's CLS distribution of one view against the
            teacher's of the other, both ways; ``distill_patch``: that of the student's masked tokens against
            the teacher's tokens at the same places of the same view.
        """
        teacher_cls_p = [((t - self.centre_cls) / TEACHER_TEMPERATURE).softmax(-1) for t in teacher_cls]
        teacher_patch_p = [((t - self.centre_patch) / TEACHER_TEMPERATURE).softmax(-1) for t in teacher_patches]
        student_cls_log = [(self.head(s.float()) / STUDENT_TEMPERATURE).log_softmax(-1) for s in student_cls]
        cls_term = sum(-(teacher_cls_p[1 - view] * student_cls_log[view]).sum(-1).mean() for view in range(2)) / 2
        patch_term = student_cls_log[0].new_zeros(())
        for view in range(2):
            masked = masks[view]
            student = (self.head(student_patches[view][masked].float()) / STUDENT_TEMPERATURE).log_softmax(-1)
            patch_term = patch_term - (teacher_patch_p[view][masked] * student).sum(-1).mean() / 2
        with torch.no_grad():
            batch_cls = torch.cat(teacher_cls).mean(0)
            batch_patch = torch.cat([t.flatten(0, 1) for t in teacher_patches]).mean(0)
            self.centre_cls.mul_(CENTRE_MOMENTUM).add_(batch_cls, alpha=1 - CENTRE_MOMENTUM)
            self.centre_patch.mul_(CENTRE_MOMENTUM).add_(batch_patch, alpha=1 - CENTRE_MOMENTUM)
        return {"distill_cls": cls_term, "distill_patch": patch_term}


__all__ = [
    "PROTOTYPES",
    "ProjectionHead",
    "SelfDistillation",
    "random_token_mask",
    "random_views",
]
