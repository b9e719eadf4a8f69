"""Consistency and stability of concepts (Huang et al., ICCV 2023; docs/method.md section 9).

A concept "hits" a keypoint on an image when the keypoint lies in the box around the concept's peak:

1. the concept map ``(h, w)`` is upsampled (bicubic, ``align_corners=False``) to ``map_size x map_size``
   and its peak is the first flat argmax ``(cx, cy)`` (integer pixel of that frame);
2. keypoints given in the model-input pixel frame (pixel centres at integers, ``x`` in ``[0, W-1]``) are
   carried to the map frame with the same pixel-centre convention as the upsampling:
   ``x' = (x + 0.5) * map_size / W - 0.5`` (and likewise ``y`` with ``H``);
3. the box is ``[cx - half, cx + half] x [cy - half, cy + half]`` clipped to ``[0, map_size - 1]``, both
   ends inclusive, as in the reference implementation (a 73-pixel wide box before clipping); a visible
   keypoint (``visible > 0.5``) inside it is a hit. Invisible keypoints are never hits.

The maps must come from images cropped to their bounding box (the engine feeds the bbox-crop loader).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ivpt.metrics._base import CountMeter, MetricError, check_keypoints, check_labels, check_maps, image_size


def keypoints_to_frame(points_xy: Tensor, input_size: int | Sequence[int], frame_size: int | Sequence[int]) -> Tensor:
    """Carry pixel coordinates ``(..., 2)`` (x, y) from an ``input_size`` image to a resized ``frame_size`` one.

    Pixel centres sit at integers in both frames, so the map is ``x' = (x + 0.5) * W' / W - 0.5``.
    """
    in_h, in_w = image_size(input_size)
    out_h, out_w = image_size(frame_size, "frame_size")
    scale = points_xy.new_tensor([out_w / in_w, out_h / in_h])
    return (points_xy.float() + 0.5) * scale - 0.5


# Upsampled values within this distance of a map's maximum count as possible peaks, in units of the map's
# largest absolute value (plus the smallest normal float, for maps of denormals). The products of
# :func:`concept_peaks` differ from torch's 2-D bicubic kernel by a few 1e-7 of that (float32 rounding of
# 16 weighted terms); a margin well above twice that makes "a single candidate" proof that both kernels
# have the same argmax. Relative, because a map of a concept that is nowhere (all values near 1e-6, say)
# still has one clear peak.
_PEAK_MARGIN = 1e-5
# Maps searched at a time: about this many bytes of intermediate values, so that they stay in the CPU's
# cache between the products that write them and the reductions that read them.
_PEAK_CHUNK_BYTES = 4 << 20


@functools.lru_cache(maxsize=16)
def _bicubic_matrix(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """``(size_out, size_in)`` weights of torch's 1-D bicubic resampling (``align_corners=False``).

    Read off torch's own kernel by resampling the unit vectors, so the border handling and the cubic
    coefficient are exactly torch's.
    """
    basis = torch.eye(size_in, device=device).view(size_in, 1, 1, size_in)
    rows = F.interpolate(basis, size=(1, size_out), mode="bicubic", align_corners=False)
    return rows.view(size_in, size_out).t().contiguous()


@functools.lru_cache(maxsize=16)
def _row_bound_weights(size_in: int, size_out: int, device: torch.device) -> tuple[int, Tensor, Tensor]:
    """What :func:`_flat_peaks` needs to bound each upsampled row's maximum from the row's taps.

    The output columns of :func:`_bicubic_matrix` fall into ``G`` groups that read the same source
    pixels (taps).

    Returns:
        ``window``, the most taps a group reads; ``pick (size_in - window + 1, G)``, which takes for
        each group the sliding maximum of ``window`` source values that covers its taps, times
        ``1 - sum_q lowest[q, g]``; and ``lowest (size_in, G)``, the smallest weight a member of the
        group gives each source pixel (0 outside its taps).
    """
    matrix = _bicubic_matrix(size_in, size_out, torch.device("cpu"))
    supports: list[list[int]] = []
    members: list[list[int]] = []
    for out_index, weights in enumerate(matrix):
        support = weights.nonzero().flatten().tolist()
        if not supports or supports[-1] != support:
            supports.append(support)
            members.append([])
        members[-1].append(out_index)
    window = max(support[-1] - support[0] + 1 for support in supports)
    lowest = torch.stack([matrix[group].amin(dim=0) for group in members], dim=1)  # (size_in, G)
    pick = torch.zeros(size_in - window + 1, len(supports))
    for group, support in enumerate(supports):
        pick[max(support[-1] - window + 1, 0), group] = 1 - lowest[:, group].sum()
    return window, pick.to(device), lowest.to(device)


def _sliding_max(values: Tensor, window: int) -> Tensor:
    """``(N, w)`` -> ``(N, w - window + 1)``: entry ``p`` is the maximum of ``values[:, p : p + window]``."""
    span = 1
    while 2 * span <= window:
        values = torch.maximum(values[:, :-span], values[:, span:])
        span *= 2
    rest = window - span
    return torch.maximum(values[:, :-rest], values[:, rest:]) if rest else values


def _flat_peaks(maps: Tensor, rows: Tensor, columns: Tensor, map_size: int) -> Tensor:
    """``(M, h, w)`` maps -> ``(M,)`` flat index of the first maximum of each upsampled map.

    Each map is upsampled along the height (one small product), and along the width only in the rows
    that can hold its maximum. The output columns of one group read the same taps with weights that
    sum to 1, so for a row signal ``v`` and any ``r >= max(v)`` over those taps, each of their values
    ``r + sum_q C[j, q] (v[q] - r)`` is at most ``r + sum_q min_j C[j, q] (v[q] - r)``: the largest tap
    plus the kernel's overshoot. A row whose bound falls below a value already found (the maximum of
    the best-bounded row) by more than twice the margin (:data:`_PEAK_MARGIN`) holds no pixel within
    the margin of the maximum.
    """
    count, height, width = maps.shape
    device = maps.device
    window, pick, lowest = _row_bound_weights(width, map_size, device)
    # (map_size, M, w): the maps upsampled along the height, in one product.
    half = (rows @ maps.transpose(0, 1).reshape(height, count * width)).view(map_size, count, width)
    signals = half.view(map_size * count, width)
    bound = torch.addmm(signals @ lowest, _sliding_max(signals, window), pick)
    bound = bound.amax(dim=1).view(map_size, count).t()
    margin = _PEAK_MARGIN * maps.flatten(1).abs().amax(dim=1) + torch.finfo(maps.dtype).tiny  # (M,)
    best_row = half[bound.argmax(dim=1), torch.arange(count, device=device)]  # (M, w)
    found = (best_row @ columns.t()).amax(dim=1)
    map_index, row_index = (bound >= (found - 2 * margin)[:, None]).nonzero(as_tuple=True)
    values = half[row_index, map_index] @ columns.t()  # (N, map_size): the candidate rows, upsampled
    peak = torch.full((count,), -torch.inf, device=device)
    peak = peak.scatter_reduce(0, map_index, values.amax(dim=1), reduce="amax")
    near = values >= (peak - margin)[map_index, None]
    near_count = torch.zeros(count, dtype=torch.long, device=device).index_add_(0, map_index, near.sum(dim=1))
    hit, column = near.nonzero(as_tuple=True)
    flat_index = torch.zeros(count, dtype=torch.long, device=device)
    flat_index[map_index[hit]] = row_index[hit] * map_size + column
    # A margin that is not finite (maps near the float range) also leaves the choice to torch's kernel.
    (ambiguous,) = ((near_count > 1) | ~margin.isfinite()).nonzero(as_tuple=True)
    if ambiguous.numel():
        exact = F.interpolate(maps[ambiguous, None], size=(map_size, map_size), mode="bicubic", align_corners=False)
        flat_index[ambiguous] = exact.flatten(1).argmax(dim=1)
    return flat_index


def concept_peaks(maps: Tensor, map_size: int = 224) -> Tensor:
    """Peak of each map after bicubic upsampling to ``map_size x map_size``.

    The peaks are exactly those of ``F.interpolate(maps, mode="bicubic", align_corners=False)``, computed
    faster: bicubic resampling is separable, so each map is upsampled along the height by one small
    matrix product, and along the width only in the rows that a bound shows can hold its maximum, a
    cache-sized group of maps at a time. Where more than one pixel lies within :data:`_PEAK_MARGIN` of
    the maximum (flat or saturated maps, whose argmax float rounding decides), that map is upsampled
    again by ``F.interpolate`` itself.

    Args:
        maps: ``(B, K, h, w)`` concept maps.
        map_size: side of the square frame the maps are upsampled to.

    Returns:
        ``(B, K, 2)`` integer ``(x, y)`` of the first maximum in that frame.
    """
    check_maps(maps)
    batch, channels, height, width = maps.shape
    flat = maps.float().reshape(batch * channels, height, width)
    rows = _bicubic_matrix(height, map_size, flat.device)
    columns = _bicubic_matrix(width, map_size, flat.device)
    chunk = max(1, _PEAK_CHUNK_BYTES // (4 * map_size * width))
    flat_index = torch.cat(
        [_flat_peaks(flat[start : start + chunk], rows, columns, map_size) for start in range(0, len(flat), chunk)]
    ).view(batch, channels)
    return torch.stack([flat_index % map_size, flat_index // map_size], dim=-1)


def keypoint_hits(
    maps: Tensor,
    keypoints: Tensor,
    input_size: int | Sequence[int],
    map_size: int = 224,
    box_half_size: int = 36,
) -> Tensor:
    """Which visible keypoints fall in the box around each concept's peak (see the module docstring).

    Args:
        maps: ``(B, K, h, w)`` maps of the concepts to score (drop the background channel first).
        keypoints: ``(B, P, 3)`` ``(x, y, visible)`` in the pixel frame of the ``input_size`` model input.
        input_size: model input size ``S`` or ``(H, W)``.
        map_size: side of the frame the maps are upsampled to.
        box_half_size: half side of the box around the peak, in ``map_size`` pixels.

    Returns:
        ``(B, K, P)`` bool hits.
    """
    check_maps(maps)
    check_keypoints(keypoints, maps.shape[0])
    peaks = concept_peaks(maps, map_size).float()  # (B, K, 2)
    points = keypoints_to_frame(keypoints[..., :2].to(peaks.device), input_size, map_size)  # (B, P, 2)
    visible = keypoints[..., 2].to(peaks.device) > 0.5  # (B, P)
    low = (peaks - box_half_size).clamp(min=0)[:, :, None, :]  # (B, K, 1, 2)
    high = (peaks + box_half_size).clamp(max=map_size - 1)[:, :, None, :]
    inside = ((points[:, None] >= low) & (points[:, None] <= high)).all(dim=-1)  # (B, K, P)
    return inside & visible[:, None, :]


def add_stability_noise(
    images: Tensor, generator: torch.Generator | None = None, std: float = 0.2, clip: float = 0.25
) -> Tensor:
    """Add the stability protocol's noise to NORMALISED images ``(B, 3, H, W)``.

    Gaussian noise of standard deviation ``std`` clipped to ``[-clip, clip]``. It is drawn on the
    generator's device (the CPU when ``generator`` is None) and then moved to the images, so a seeded
    CPU generator gives the same noise whatever device the model runs on.
    """
    noise_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(images.shape, generator=generator, device=noise_device, dtype=torch.float32)
    noise = (noise * std).clamp_(-clip, clip)
    return images + noise.to(device=images.device, dtype=images.dtype)


class _HitMeter(CountMeter):
    """Settings and input checks shared by the consistency and stability meters."""

    def __init__(
        self,
        num_concepts: int,
        num_keypoints: int,
        map_size: int,
        box_half_size: int,
        background: bool,
        device: torch.device | str,
    ) -> None:
        if num_concepts < 1 or num_keypoints < 1:
            raise MetricError(
                f"{type(self).__name__}: expected at least one concept and one keypoint, got "
                f"num_concepts={num_concepts}, num_keypoints={num_keypoints}"
            )
        if map_size < 1 or box_half_size < 0:
            raise MetricError(
                f"{type(self).__name__}: expected map_size >= 1 and box_half_size >= 0, got "
                f"map_size={map_size}, box_half_size={box_half_size}"
            )
        super().__init__(device)
        self.num_concepts = num_concepts
        self.num_keypoints = num_keypoints
        self.map_size = map_size
        self.box_half_size = box_half_size
        self.background = background

    def _hits(self, maps: Tensor, keypoints: Tensor, input_size: int | Sequence[int], name: str) -> Tensor:
        """``(B, num_concepts, P)`` hits of the foreground concepts, on ``self.device``."""
        channels = self.num_concepts + int(self.background)
        check_maps(maps, name, channels)
        check_keypoints(keypoints, maps.shape[0], self.num_keypoints)
        foreground = maps[:, : self.num_concepts]
        hits = keypoint_hits(foreground, keypoints, input_size, self.map_size, self.box_half_size)
        return hits.to(self.device)


class ConsistencyMeter(_HitMeter):
    """Streaming consistency score: % of (class, concept) pairs that keep hitting one keypoint.

    For class ``c``, concept ``k`` and keypoint ``p`` the hit frequency is
    ``hits[c, k, p] / visible[c, p]``: the images of class ``c`` where concept ``k`` hits ``p`` over the
    images of class ``c`` where ``p`` is visible (0 when ``p`` is never visible in that class). The pair
    is consistent when some keypoint reaches ``threshold`` (inclusive). The score is the percentage of
    consistent pairs among the classes that have at least one image (classes absent from the
    evaluated data do not count as inconsistent).

    Args:
        num_classes: ``C``.
        num_concepts: number of FOREGROUND concepts scored.
        num_keypoints: ``P``.
        map_size, box_half_size: see :func:`keypoint_hits`.
        threshold: frequency a keypoint must reach for the pair to be consistent.
        background: the maps carry a trailing background channel (dropped before scoring).
        device: where the counts live.

    State: ``hits (C, K, P)``, ``visible (C, P)``, ``images (C,)`` counts.
    """

    _state_names = ("hits", "visible", "images")

    def __init__(
        self,
        num_classes: int,
        num_concepts: int,
        num_keypoints: int,
        map_size: int = 224,
        box_half_size: int = 36,
        threshold: float = 0.8,
        background: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise MetricError(f"ConsistencyMeter: num_classes must be at least 1, got {num_classes}")
        super().__init__(num_concepts, num_keypoints, map_size, box_half_size, background, device)
        self.num_classes = num_classes
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        shape = (self.num_classes, self.num_concepts, self.num_keypoints)
        self.hits = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.visible = torch.zeros(shape[0], shape[2], dtype=torch.long, device=self.device)
        self.images = torch.zeros(shape[0], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(self, maps: Tensor, keypoints: Tensor, labels: Tensor, input_size: int | Sequence[int]) -> Tensor:
        """Add a batch of bbox-cropped images.

        Args:
            maps: ``(B, K, h, w)`` concept maps (``K = num_concepts + 1`` with background).
            keypoints: ``(B, P, 3)`` in the model-input pixel frame.
            labels: ``(B,)`` class indices.
            input_size: model input size ``S`` or ``(H, W)``.

        Returns:
            ``(B, num_concepts, P)`` bool: the batch's keypoint hits, which a :class:`StabilityMeter` of
            the same ``map_size`` and ``box_half_size`` can take as ``clean_hits`` instead of computing
            them again (the upsampling behind them is most of the evaluation's cost).
        """
        hits = self._hits(maps, keypoints, input_size, "maps")
        check_labels(labels, maps.shape[0], self.num_classes)
        labels = labels.to(self.device)
        visible = (keypoints[..., 2] > 0.5).long().to(self.device)
        self.hits.index_add_(0, labels, hits.long())
        self.visible.index_add_(0, labels, visible)
        self.images.index_add_(0, labels, torch.ones_like(labels))
        return hits

    def frequencies(self) -> Tensor:
        """``(C, K, P)`` float64 hit frequency of each keypoint for each (class, concept) pair."""
        return self.hits.double() / self.visible.clamp(min=1).double()[:, None, :]

    def compute(self) -> dict[str, float]:
        seen = self.images > 0
        if not bool(seen.any()):
            raise MetricError("ConsistencyMeter: no images were added before compute()")
        consistent = (self.frequencies() >= self.threshold).any(dim=2)  # (C, K)
        return {"consistency": 100.0 * float(consistent[seen].double().mean())}


class StabilityMeter(_HitMeter):
    """Streaming stability score: how often a concept's keypoint hits survive input noise.

    For every image and concept, the ``P``-dim hit vector on the clean image is compared with the one on
    the noisy image (:func:`add_stability_noise`); the concept is stable on that image when the two are
    identical. As in Huang et al.'s protocol, the fraction of stable images is taken per class first,
    then averaged over the (class, concept) pairs of the classes that have at least one image, x100.
    Classes of different sizes therefore weigh the same, unlike a plain average over all images.

    Args:
        num_classes, num_concepts, num_keypoints, map_size, box_half_size, background, device: as for
            :class:`ConsistencyMeter`.

    State: ``stable (C, K)`` count of the images of each class where each concept is stable,
    ``images (C,)`` image count per class.
    """

    _state_names = ("stable", "images")

    def __init__(
        self,
        num_classes: int,
        num_concepts: int,
        num_keypoints: int,
        map_size: int = 224,
        box_half_size: int = 36,
        background: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise MetricError(f"StabilityMeter: num_classes must be at least 1, got {num_classes}")
        super().__init__(num_concepts, num_keypoints, map_size, box_half_size, background, device)
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.stable = torch.zeros(self.num_classes, self.num_concepts, dtype=torch.long, device=self.device)
        self.images = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(
        self,
        clean_maps: Tensor,
        noisy_maps: Tensor,
        keypoints: Tensor,
        labels: Tensor,
        input_size: int | Sequence[int],
        clean_hits: Tensor | None = None,
    ) -> None:
        """Add a batch: maps ``(B, K, h, w)`` of the clean and the noisy images, keypoints ``(B, P, 3)``,
        labels ``(B,)``.

        ``clean_hits``: the ``(B, num_concepts, P)`` hits of ``clean_maps`` when they are already known
        (what :meth:`ConsistencyMeter.update` returns for the same maps and geometry); computed otherwise.
        """
        if clean_maps.shape != noisy_maps.shape:
            raise MetricError(
                f"noisy_maps: expected the shape of clean_maps {tuple(clean_maps.shape)}, got {tuple(noisy_maps.shape)}"
            )
        check_labels(labels, clean_maps.shape[0], self.num_classes)
        noisy = self._hits(noisy_maps, keypoints, input_size, "noisy_maps")
        if clean_hits is None:
            clean = self._hits(clean_maps, keypoints, input_size, "clean_maps")
        elif clean_hits.shape != noisy.shape:
            raise MetricError(
                f"clean_hits: expected shape {tuple(noisy.shape)} (images, concepts, keypoints), "
                f"got {tuple(clean_hits.shape)}"
            )
        else:
            clean = clean_hits.to(self.device)
        labels = labels.to(self.device)
        self.stable.index_add_(0, labels, (clean == noisy).all(dim=2).long())
        self.images.index_add_(0, labels, torch.ones_like(labels))

    def compute(self) -> dict[str, float]:
        seen = self.images > 0
        if not bool(seen.any()):
            raise MetricError("StabilityMeter: no images were added before compute()")
        per_pair = self.stable[seen].double() / self.images[seen, None].double()  # (classes seen, K)
        return {"stability": 100.0 * float(per_pair.mean())}
