"""The eight loss terms of IVPT (docs/method.md section 8), one function each, on plain tensors.

Every function returns an fp32 scalar tensor, computes in fp32 with autocast switched off (whatever
precision its inputs come in), and never reads a value back to the host.

Concept maps are ``(B, K, h, w)`` softmax maps over ``K`` prototypes, background last. The shaping terms
(:func:`presence_loss`, :func:`background_presence_loss`, :func:`equivariance_loss`,
:func:`total_variation_loss`, :func:`entropy_loss`) accept one stage, a sequence of stages, or a
prepared :class:`StageMaps`, and return the mean of the per-stage values. They work on smoothed maps,
``A <- (A + 1e-6) / sum_k (A + 1e-6)`` (docs/method.md section 2), which keeps every entry strictly positive
so that logarithms and cosines stay finite. Stages that share one patch grid (all of them, in IVPT) are
concatenated along the channels and handled by a single kernel per term.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ParamSpec, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ivpt.losses.affine import unwarp_maps, unwarp_validity

__all__ = [
    "KL_EPS",
    "SMOOTHING_EPS",
    "StageMaps",
    "autocast_off",
    "background_presence_loss",
    "classification_loss",
    "consistency_loss",
    "entropy_loss",
    "equivariance_loss",
    "fp32_autocast_off",
    "orthogonality_loss",
    "presence_loss",
    "radial_mask",
    "smooth_maps",
    "total_variation_loss",
]

SMOOTHING_EPS = 1e-6
KL_EPS = 1e-10
# Lower clamp of the background-presence probability before its log. Smoothed maps are >= ~1e-6 at
# the corners where the radial mask is 1, so the clamp never binds there and keeps its gradient; it only
# guards log(0).
_BCE_FLOOR = 1e-12

_P = ParamSpec("_P")
_R = TypeVar("_R")


# ----------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------


@contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Switch autocast off for ``device_type`` (a no-op where torch has no autocast for it)."""
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def _first_device_type(values: Sequence[object]) -> str:
    for value in values:
        if isinstance(value, Tensor):
            return value.device.type
        if isinstance(value, StageMaps):
            return value.device.type
        if isinstance(value, (list, tuple)):
            found = _first_device_type(value)
            if found:
                return found
    return ""


def fp32_autocast_off(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with autocast off on the device of its first tensor argument.

    Under autocast, matmuls and poolings would silently drop to bf16/fp16 even on fp32 inputs; the
    losses are small and numerically delicate (logs of probabilities near 0), so they stay in fp32.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        device_type = _first_device_type([*args, *kwargs.values()]) or "cpu"
        with autocast_off(device_type):
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------------
# Stacked, smoothed maps of several stages
# ----------------------------------------------------------------------------------------------------


def smooth_maps(maps: Tensor, eps: float = SMOOTHING_EPS) -> Tensor:
    """``(B, K, h, w)`` -> fp32 ``(B, K, h, w)``: ``(A + eps) / sum_k (A + eps)``."""
    shifted = maps.float() + eps
    return shifted / shifted.sum(dim=1, keepdim=True)


@functools.lru_cache(maxsize=64)
def _foreground_weights(channels: tuple[int, ...], device: torch.device) -> Tensor:
    """``(sum K_s,)``: ``1 / (K_s - 1)`` on the foreground channels of each stage, 0 on its background.

    A weighted sum with it turns per-channel values into the sum over stages of the foreground mean.
    Cached because the same stage layout recurs every step, and building it on the host would need a
    host-to-device copy.
    """
    parts = []
    for k in channels:
        parts.append(torch.full((k - 1,), 1.0 / (k - 1), device=device))
        parts.append(torch.zeros(1, device=device))
    return torch.cat(parts)


@functools.lru_cache(maxsize=16)
def radial_mask(height: int, width: int, device: torch.device) -> Tensor:
    """``(h, w)`` ``m = (x^2 + y^2) / max(x^2 + y^2)`` on an ``x, y in [-1, 1]`` grid: 0 at the centre
    (for odd sizes), 1 at the four corners."""
    ys = torch.linspace(-1.0, 1.0, height, device=device)
    xs = torch.linspace(-1.0, 1.0, width, device=device)
    squared_radius = ys[:, None] ** 2 + xs[None, :] ** 2
    return squared_radius / squared_radius.max()


class _StageGroup:
    """Stages that share one ``h x w`` grid, smoothed and concatenated along the channels.

    Attributes:
        maps: ``(B, sum K_s, h, w)`` fp32 smoothed maps.
        num_stages: stages in the group.
        foreground_weight: ``(sum K_s,)`` see :func:`_foreground_weights`.
    """

    def __init__(self, stages: list[Tensor]) -> None:
        self.num_stages = len(stages)
        self.channels = tuple(int(m.shape[1]) for m in stages)
        self.maps = torch.cat([smooth_maps(m) for m in stages], dim=1)
        self.foreground_weight = _foreground_weights(self.channels, self.maps.device)

    @property
    def background(self) -> Tensor:
        """``(B, S_group, h, w)`` the background channel of each stage."""
        ends = itertools.accumulate(self.channels)
        return torch.stack([self.maps[:, end - 1] for end in ends], dim=1)


MapsLike = Union[Tensor, Sequence[Tensor], "StageMaps"]


class StageMaps:
    """Concept maps of ``S`` stages prepared once for all shaping terms (smoothed, stacked by grid).

    Args:
        maps: one ``(B, K, h, w)`` tensor or a sequence of ``S`` of them (``K`` may differ per stage,
            ``K >= 2``, background last, same ``B``).
    """

    def __init__(self, maps: Tensor | Sequence[Tensor]) -> None:
        stages = [maps] if isinstance(maps, Tensor) else list(maps)
        if not stages:
            raise ValueError("concept maps: expected at least one stage, got none")
        for index, stage in enumerate(stages):
            if stage.dim() != 4 or stage.shape[1] < 2:
                raise ValueError(
                    f"concept maps of stage {index}: expected (B, K, h, w) with K >= 2 (>= 1 foreground + "
                    f"background), got shape {tuple(stage.shape)}"
                )
            if stage.shape[0] != stages[0].shape[0]:
                raise ValueError(
                    f"concept maps of stage {index}: batch {stage.shape[0]} differs from stage 0's {stages[0].shape[0]}"
                )
        by_grid: dict[tuple[int, int], list[Tensor]] = {}
        for stage in stages:
            by_grid.setdefault((int(stage.shape[-2]), int(stage.shape[-1])), []).append(stage)
        self.num_stages = len(stages)
        self.shapes = [tuple(stage.shape) for stage in stages]
        self.groups = [_StageGroup(group) for group in by_grid.values()]
        self.device = stages[0].device

    @classmethod
    def of(cls, maps: MapsLike) -> StageMaps:
        """``maps`` itself if already prepared, else a new :class:`StageMaps`."""
        return maps if isinstance(maps, StageMaps) else cls(maps)

    def mean_over_stages(self, per_group: Callable[[_StageGroup], Tensor]) -> Tensor:
        """Mean over stages, given a function that returns the *sum* over a group's stages."""
        return torch.stack([per_group(group) for group in self.groups]).sum() / self.num_stages


# ----------------------------------------------------------------------------------------------------
# The terms
# ----------------------------------------------------------------------------------------------------


@fp32_autocast_off
def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of ``logits`` ``(B, C)`` (IVPT: the mean of the part logits) against ``labels`` ``(B,)``."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


@fp32_autocast_off
def consistency_loss(fused_maps: Tensor | Sequence[Tensor], target_maps: Tensor | Sequence[Tensor]) -> Tensor:
    """``KL(T || F)`` between each stage's fused maps ``F`` and the maps ``T`` of the stage they group into.

    ``T`` is detached (stop-gradient: the deep stage teaches the shallow one, not the reverse) and
    ``eps = 1e-10`` is added to both before the log. Per pair: sum over channels, mean over batch and
    pixels of ``T_c log(T_c / F_c)``; with several pairs, their mean.

    Args:
        fused_maps: ``(B, C, h, w)`` or a sequence of them, one per fused stage.
        target_maps: the matching ``(B, C, h, w)`` target maps (same count and shapes).
    """
    fused = [fused_maps] if isinstance(fused_maps, Tensor) else list(fused_maps)
    targets = [target_maps] if isinstance(target_maps, Tensor) else list(target_maps)
    if not fused or len(fused) != len(targets):
        raise ValueError(
            f"consistency loss: expected one target per fused map (at least one), got {len(fused)} fused "
            f"and {len(targets)} target maps"
        )
    for index, (f, t) in enumerate(zip(fused, targets, strict=True)):
        if f.shape != t.shape:
            raise ValueError(
                f"consistency loss, fused stage {index}: fused maps {tuple(f.shape)} and target maps "
                f"{tuple(t.shape)} differ in shape"
            )
    pairs_by_shape: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}
    for pair in zip(fused, targets, strict=True):
        pairs_by_shape.setdefault(tuple(pair[0].shape), []).append(pair)

    total = []
    for pairs in pairs_by_shape.values():
        fused_stack = torch.stack([f.float() for f, _ in pairs])  # (n, B, C, h, w)
        group_targets = [t for _, t in pairs]
        # In the default 'final' fusion every stage targets the same maps: broadcast them, don't copy.
        if all(t is group_targets[0] for t in group_targets):
            target = group_targets[0].detach().float().unsqueeze(0) + KL_EPS
        else:
            target = torch.stack([t.detach().float() for t in group_targets]) + KL_EPS
        pointwise = target * (target.log() - (fused_stack + KL_EPS).log())
        # Sum over channels, mean over batch and pixels, summed over the group's pairs.
        total.append(pointwise.sum(dim=2).mean(dim=(1, 2, 3)).sum())
    return torch.stack(total).sum() / len(fused)


def _presence(group: _StageGroup) -> Tensor:
    # Stride 1, padding 1 and count_include_pad=False: every pixel averages over its in-frame 3x3
    # neighbours, so a solid part touching the border scores as high as one in the middle.
    pooled = F.avg_pool2d(group.maps, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    # Max over the batch too: a concept must appear somewhere in the batch, not in every image.
    peak = pooled.amax(dim=(0, 2, 3))  # (sum K_s,)
    return group.num_stages - (peak * group.foreground_weight).sum()


@fp32_autocast_off
def presence_loss(maps: MapsLike) -> Tensor:
    """``1 - mean_{k fg} max_{b, i, j} AvgPool3x3(A)[b, k, i, j]``, averaged over stages.

    0 when every foreground prototype fills a 3 x 3 patch (2 x 2 at a corner) in at least one image.
    The pool has stride 1, padding 1 and averages only over in-frame pixels (``count_include_pad=False``).

    Args:
        maps: ``(B, K, h, w)`` concept maps, a sequence of stages, or :class:`StageMaps`.
    """
    return StageMaps.of(maps).mean_over_stages(_presence)


def _background_presence(group: _StageGroup) -> Tensor:
    background = group.background  # (B, S_group, h, w)
    pooled = F.avg_pool2d(background, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    weighted = pooled * radial_mask(background.shape[-2], background.shape[-1], background.device)
    peak = weighted.amax(dim=(2, 3)).clamp(min=_BCE_FLOOR, max=1.0)  # (B, S_group)
    # BCE against a target of 1 is -log(p); written out so it is safe under any autocast setting.
    return -peak.log().mean(dim=0).sum()


@fp32_autocast_off
def background_presence_loss(maps: MapsLike) -> Tensor:
    """``BCE(max_{i,j} AvgPool3x3(A_bg) * m, 1)`` per image, mean over the batch and the stages.

    ``m`` is :func:`radial_mask`, so the loss asks the background to occupy some region towards the
    border of every image: ~0 when the background fills a corner, ``-log(1e-6) ~ 13.8`` when it is
    absent. The pooling is the same as :func:`presence_loss`'s.

    Args:
        maps: ``(B, K, h, w)`` concept maps (background last), a sequence of stages, or :class:`StageMaps`.
    """
    return StageMaps.of(maps).mean_over_stages(_background_presence)


@fp32_autocast_off
def equivariance_loss(
    maps: MapsLike, maps_of_transformed: MapsLike, theta: Tensor, *, mask_outside: bool = True
) -> Tensor:
    """``1 - mean_{b, k fg} cos(A(x)_k, T^-1[A(Tx)]_k)`` over flattened pixels, averaged over stages.

    Args:
        maps: concept maps of the original batch ``x``: ``(B, K, h, w)``, a sequence, or :class:`StageMaps`.
        maps_of_transformed: the same stages computed on ``warp_images(x, theta)``.
        theta: ``(2, 3)`` the batch's transform (:func:`ivpt.losses.sample_affine`).
        mask_outside: compare only what both views saw. ``T^-1[A(Tx)]`` is 0 where the content left the
            transformed frame; without the mask the original maps are still compared there, so even
            perfectly equivariant maps score above 0 and the gradient pushes parts away from whatever
            the random transform cut off (the official behaviour, ``mask_outside=False``). With it, the
            original maps are weighted by :func:`ivpt.losses.affine.unwarp_validity`.
    """
    original = StageMaps.of(maps)
    transformed = StageMaps.of(maps_of_transformed)
    if original.shapes != transformed.shapes:
        raise ValueError(
            f"equivariance loss: maps of the transformed batch {transformed.shapes} do not match the "
            f"original maps {original.shapes}"
        )

    theta = theta.float()
    per_group = []
    for group, group_t in zip(original.groups, transformed.groups, strict=True):
        aligned = unwarp_maps(group_t.maps, theta)
        reference = group.maps
        if mask_outside:
            reference = reference * unwarp_validity(theta, tuple(reference.shape[-2:]), reference.device)
        cosine = F.cosine_similarity(reference.flatten(2), aligned.flatten(2), dim=2)  # (B, sum K_s)
        per_group.append(group.num_stages - (cosine.mean(dim=0) * group.foreground_weight).sum())
    return torch.stack(per_group).sum() / original.num_stages


@fp32_autocast_off
def orthogonality_loss(part_features: Tensor) -> Tensor:
    """``mean((F^T F - I)^2)`` for the column-normalised ``(D, N + 1)`` feature matrix of each sample.

    Args:
        part_features: ``(B, D, N + 1)`` modulated final region features, background included.
    """
    columns = F.normalize(part_features.float(), dim=1)
    gram = columns.transpose(1, 2) @ columns  # (B, N + 1, N + 1)
    identity = torch.eye(gram.shape[-1], device=gram.device)
    return (gram - identity).square().mean()


def _total_variation(group: _StageGroup) -> Tensor:
    maps = group.maps
    batch, _, height, width = maps.shape
    vertical = (maps[:, :, 1:] - maps[:, :, :-1]).abs().sum()
    horizontal = (maps[:, :, :, 1:] - maps[:, :, :, :-1]).abs().sum()
    # Summing over the concatenated channels of all stages gives the sum of the per-stage values.
    return (vertical + horizontal) / (batch * height * width)


@fp32_autocast_off
def total_variation_loss(maps: MapsLike) -> Tensor:
    """``sum(|A[i+1, j] - A[i, j]| + |A[i, j+1] - A[i, j]|) / (B h w)``, summed over channels, mean over
    stages.

    Args:
        maps: ``(B, K, h, w)`` concept maps, a sequence of stages, or :class:`StageMaps`.
    """
    return StageMaps.of(maps).mean_over_stages(_total_variation)


def _entropy(group: _StageGroup) -> Tensor:
    maps = group.maps
    batch, _, height, width = maps.shape
    return -(maps * maps.log()).sum() / (batch * height * width)


@fp32_autocast_off
def entropy_loss(maps: MapsLike) -> Tensor:
    """Mean over pixels of the entropy ``-sum_k A_k log A_k`` of each pixel's assignment, mean over stages.

    0 for one-hot maps, ``log K`` for uniform ones. The smoothing of the module docstring plays the role
    of the usual "clamp at 1e-6 and renormalise": every entry is positive and each pixel sums to 1.

    Args:
        maps: ``(B, K, h, w)`` concept maps, a sequence of stages, or :class:`StageMaps`.
    """
    return StageMaps.of(maps).mean_over_stages(_entropy)
