"""Part-discovery metrics of the PDiscoFormer protocol (docs/method.md section 9) and foreground IoU.

- :class:`PartDiscoveryMeter`: NMI / ARI between the part predicted at each visible keypoint and the
  keypoint's index.
- :class:`KeypointRegressionMeter` + :func:`keypoint_regression_error`: how well a linear map of the part
  centroids predicts the keypoints (KPR).
- :class:`ForegroundIoUMeter`: IoU of the predicted foreground (argmax not background) with masks.

All coordinates follow the data contract: pixel centres at integers, ``x`` in ``[0, W-1]`` of the model
input, bounding boxes ``(x_min, y_min, x_max, y_max)`` in the same frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ivpt.metrics._base import CollectMeter, CountMeter, MetricError, check_keypoints, check_maps, image_size


def keypoint_part_assignments(maps: Tensor, keypoints: Tensor, input_size: int | Sequence[int]) -> Tensor:
    """The channel that wins at each keypoint once the maps are upsampled to the input size.

    Equivalent to bilinearly upsampling ``maps`` to ``(H, W)`` (``align_corners=False``) and reading the
    argmax at the keypoint's nearest pixel, but samples only those pixels instead of materialising the
    full-size maps.

    Args:
        maps: ``(B, K, h, w)``; every channel competes, background included.
        keypoints: ``(B, P, 3)`` ``(x, y, visible)`` in the input pixel frame.
        input_size: ``S`` or ``(H, W)`` of the model input.

    Returns:
        ``(B, P)`` long channel index (also for invisible keypoints; mask them with ``visible``).
    """
    check_maps(maps)
    check_keypoints(keypoints, maps.shape[0])
    height, width = image_size(input_size)
    xy = keypoints[..., :2].to(device=maps.device, dtype=torch.float32).round()
    pixel = torch.stack([xy[..., 0].clamp(0, width - 1), xy[..., 1].clamp(0, height - 1)], dim=-1)
    # Normalised coordinates of pixel centres for grid_sample with align_corners=False; border padding
    # reproduces interpolate's clamping of source coordinates at the image edges.
    grid = (pixel + 0.5) / pixel.new_tensor([width, height]) * 2 - 1
    sampled = F.grid_sample(
        maps.float(), grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled[..., 0].argmax(dim=1)


class PartDiscoveryMeter(CollectMeter):
    """NMI and ARI (x100, sklearn) between predicted part and keypoint index over all visible keypoints.

    Stores one ``(predicted channel, keypoint index)`` pair per visible keypoint. ``compute()`` returns
    ``part_nmi`` and ``part_ari``.
    """

    _state_names = ("predicted", "keypoint_ids")

    def _empty_state(self, name: str) -> Tensor:
        return torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def update(self, maps: Tensor, keypoints: Tensor, input_size: int | Sequence[int]) -> None:
        """Add a batch: maps ``(B, K, h, w)`` (background included), keypoints ``(B, P, 3)``."""
        predicted = keypoint_part_assignments(maps, keypoints, input_size)
        visible = keypoints[..., 2].to(predicted.device) > 0.5
        keypoint_ids = torch.arange(keypoints.shape[1], device=predicted.device).expand_as(predicted)
        self._append(predicted[visible], keypoint_ids[visible])

    def compute(self) -> dict[str, float]:
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # slow import, used once

        predicted, keypoint_ids = (t.numpy() for t in self.state_tensors())
        if predicted.size == 0:
            raise MetricError("PartDiscoveryMeter: no visible keypoints were added before compute()")
        return {
            "part_nmi": 100.0 * float(normalized_mutual_info_score(keypoint_ids, predicted)),
            "part_ari": 100.0 * float(adjusted_rand_score(keypoint_ids, predicted)),
        }


def _bbox_origin_and_size(bbox: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, 1, 2)`` top-left corner and ``(B, 1, 2)`` width/height (at least one pixel) of ``(B, 4)`` boxes."""
    if bbox.dim() != 2 or bbox.shape[1] != 4:
        raise MetricError(f"bbox: expected a (B, 4) tensor of (x_min, y_min, x_max, y_max), got {tuple(bbox.shape)}")
    bbox = bbox.float()
    # A box squeezed to nothing by a crop would otherwise divide by zero; one pixel is its real extent.
    return bbox[:, None, :2], (bbox[:, None, 2:] - bbox[:, None, :2]).clamp(min=1.0)


def normalize_to_bbox(points_xy: Tensor, bbox: Tensor) -> Tensor:
    """``(B, P, 2)`` pixel coordinates as fractions of the box: ``x`` by its width, ``y`` by its height."""
    origin, size = _bbox_origin_and_size(bbox.to(points_xy.device))
    return (points_xy.float() - origin) / size


def kpr_box(bbox_edges: Tensor, input_size: int | Sequence[int]) -> Tensor:
    """The box that KPR normalises coordinates by in the PDiscoFormer protocol (docs/method.md section 9).

    Its width and height are those of the annotated box (mapped to the input frame, not clipped to it);
    its origin is the annotated box's top-left corner moved inside the image when the crop cut it off,
    as the protocol's evaluation code does.

    Args:
        bbox_edges: ``(B, 4)`` ``(left, top, right, bottom)`` edges of the annotated boxes in the input
            frame, unclipped (the dataset's ``bbox_edges``; pixel centres at integers, so the image spans
            ``[-0.5, W - 0.5]``).
        input_size: ``S`` or ``(H, W)`` of the model input.

    Returns:
        ``(B, 4)`` ``(x_min, y_min, x_min + width, y_min + height)``, for :func:`normalize_to_bbox`.
    """
    if bbox_edges.dim() != 2 or bbox_edges.shape[1] != 4:
        raise MetricError(
            f"bbox_edges: expected a (B, 4) tensor of (left, top, right, bottom), got {tuple(bbox_edges.shape)}"
        )
    height, width = image_size(input_size)
    edges = bbox_edges.float()
    size = edges[:, 2:] - edges[:, :2]
    low = edges.new_tensor([-0.5, -0.5])
    origin = torch.minimum(torch.maximum(edges[:, :2], low), low + edges.new_tensor([width, height]))
    return torch.cat([origin, origin + size], dim=1)


def centroids_from_maps(
    maps: Tensor,
    bbox: Tensor,
    input_size: int | Sequence[int],
    background: bool = True,
    active_threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Map-weighted centroid of every foreground part, normalised by the bounding box, and its activity.

    The centroid is computed on the native ``h x w`` grid with each cell placed at its centre in the input
    frame (``x = (j + 0.5) * W / w - 0.5``), which is what bilinear upsampling followed by a centroid gives
    up to border effects, without the upsampling. A part is active on an image when its map's maximum
    exceeds ``active_threshold``. Centroids are returned for every part, active or not: the KPR protocol
    standardises them all and only then sets the inactive ones to zero (see
    :func:`keypoint_regression_error`).

    Args:
        maps: ``(B, K, h, w)`` soft maps; with ``background`` the last channel is dropped.
        bbox: ``(B, 4)`` ``(x_min, y_min, x_max, y_max)`` box to normalise by, in the input frame (see
            :func:`normalize_to_bbox` and :func:`kpr_box`).
        input_size: ``S`` or ``(H, W)`` of the model input.

    Returns:
        ``(B, N, 2)`` ``(x, y)`` centroids and ``(B, N)`` bool activity, with ``N = K - 1`` (or ``K``
        without background).
    """
    check_maps(maps)
    if bbox.shape[:1] != maps.shape[:1]:
        raise MetricError(f"bbox: expected {maps.shape[0]} boxes, got shape {tuple(bbox.shape)}")
    height, width = image_size(input_size)
    parts = maps[:, : maps.shape[1] - int(background)].float()
    grid_h, grid_w = parts.shape[-2:]
    xs = (torch.arange(grid_w, device=parts.device) + 0.5) * (width / grid_w) - 0.5
    ys = (torch.arange(grid_h, device=parts.device) + 0.5) * (height / grid_h) - 0.5
    mass = parts.sum(dim=(2, 3)).clamp(min=1e-12)
    centre_x = (parts.sum(dim=2) * xs).sum(dim=2) / mass
    centre_y = (parts.sum(dim=3) * ys).sum(dim=2) / mass
    centroids = normalize_to_bbox(torch.stack([centre_x, centre_y], dim=-1), bbox)
    return centroids, parts.amax(dim=(2, 3)) > active_threshold


class KeypointRegressionMeter(CollectMeter):
    """Collects, per image, the part centroids and the keypoints, both normalised by a box.

    Feed one meter with the training split (under the test transform) and one with the test split, then
    call :func:`keypoint_regression_error`. Rows: ``centroids (M, N, 2)`` (of every part, active or not),
    ``active (M, N)``, ``keypoints (M, P, 2)``, ``visible (M, P)``.

    Args:
        num_parts: ``N`` foreground parts.
        num_keypoints: ``P``.
        background: the maps carry a trailing background channel.
    """

    _state_names = ("centroids", "active", "keypoints", "visible")

    def __init__(self, num_parts: int, num_keypoints: int, background: bool = True) -> None:
        if num_parts < 1 or num_keypoints < 1:
            raise MetricError(
                f"KeypointRegressionMeter: expected at least one part and one keypoint, got "
                f"num_parts={num_parts}, num_keypoints={num_keypoints}"
            )
        self.num_parts = num_parts
        self.num_keypoints = num_keypoints
        self.background = background
        super().__init__()

    def _empty_state(self, name: str) -> Tensor:
        if name == "centroids":
            return torch.zeros(0, self.num_parts, 2)
        if name == "active":
            return torch.zeros(0, self.num_parts, dtype=torch.bool)
        if name == "keypoints":
            return torch.zeros(0, self.num_keypoints, 2)
        return torch.zeros(0, self.num_keypoints, dtype=torch.bool)

    @torch.no_grad()
    def update(self, maps: Tensor, keypoints: Tensor, bbox: Tensor, input_size: int | Sequence[int]) -> None:
        """Add a batch: maps ``(B, K, h, w)``, keypoints ``(B, P, 3)`` in the input frame.

        ``bbox (B, 4)``: the box to normalise by, ``(x_min, y_min)`` its origin and
        ``(x_max - x_min, y_max - y_min)`` its size. The protocol's is :func:`kpr_box` of the data set's
        ``bbox_edges``; ``ivpt eval`` passes that unless ``eval.kpr_box=clipped``.
        """
        check_maps(maps, "maps", self.num_parts + int(self.background))
        check_keypoints(keypoints, maps.shape[0], self.num_keypoints)
        centroids, active = centroids_from_maps(maps, bbox, input_size, self.background)
        points = normalize_to_bbox(keypoints[..., :2], bbox)
        self._append(centroids, active, points, keypoints[..., 2] > 0.5)


def keypoint_regression_error(train: KeypointRegressionMeter, test: KeypointRegressionMeter) -> float:
    """Keypoint regression error (KPR), in percent of the bounding-box size.

    Follows the protocol of Huang & Li (CVPR 2020) as used by PDiscoFormer: for each keypoint separately,
    on the training images where that keypoint is visible (so invisible keypoints never enter a target),
    a ``StandardScaler`` is fitted on the centroids of all parts (``2N`` features) and one on the
    keypoint's ``(x, y)``; the standardised centroids of inactive parts are then set to 0 (the feature's
    training mean: an absent part carries no information) and a ``LinearRegression(fit_intercept=False)``
    is fitted. Test centroids go through the same scaler and zeroing. On the test images where the
    keypoint is visible, the error is the Euclidean distance between prediction and truth in
    box-normalised units (``x`` divided by the box width, ``y`` by its height). The result is the mean
    over all visible test keypoints, x100.

    Raises:
        MetricError: a keypoint visible in the test data was never visible in the training data, no test
            keypoint is visible, or a meter holds non-finite values.
    """
    if (train.num_parts, train.num_keypoints) != (test.num_parts, test.num_keypoints):
        raise MetricError(
            f"keypoint_regression_error: train and test meters differ: {train.num_parts} parts / "
            f"{train.num_keypoints} keypoints vs {test.num_parts} / {test.num_keypoints}"
        )
    from sklearn.linear_model import LinearRegression  # slow imports, used once per evaluation
    from sklearn.preprocessing import StandardScaler

    train_features, train_active, train_points, train_visible = _as_numpy(train, "train")
    test_features, test_active, test_points, test_visible = _as_numpy(test, "test")
    if not test_visible.any():
        raise MetricError("keypoint_regression_error: no visible keypoint in the test data")
    distances: list[np.ndarray] = []
    for keypoint in range(train.num_keypoints):
        fit_rows, eval_rows = train_visible[:, keypoint], test_visible[:, keypoint]
        if not eval_rows.any():
            continue
        if not fit_rows.any():
            raise MetricError(
                f"keypoint_regression_error: keypoint {keypoint} is visible in {int(eval_rows.sum())} test "
                "images but in no training image; cannot fit its regressor"
            )
        feature_scaler = StandardScaler().fit(train_features[fit_rows])
        target_scaler = StandardScaler().fit(train_points[fit_rows, keypoint])
        fit_features = np.where(train_active[fit_rows], feature_scaler.transform(train_features[fit_rows]), 0.0)
        regressor = LinearRegression(fit_intercept=False).fit(
            fit_features, target_scaler.transform(train_points[fit_rows, keypoint])
        )
        eval_features = np.where(test_active[eval_rows], feature_scaler.transform(test_features[eval_rows]), 0.0)
        predicted = target_scaler.inverse_transform(regressor.predict(eval_features))
        distances.append(np.linalg.norm(predicted - test_points[eval_rows, keypoint], axis=1))
    return 100.0 * float(np.concatenate(distances).mean())


def _as_numpy(meter: KeypointRegressionMeter, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(M, 2N)`` float64 features and their ``(M, 2N)`` activity, ``(M, P, 2)`` float64 keypoints,
    ``(M, P)`` bool visibility."""
    centroids, active, points, visible = meter.state_tensors()
    for name, values in (("centroids", centroids), ("keypoints", points)):
        if not bool(values.isfinite().all()):
            rows = (~values.isfinite()).flatten(1).any(dim=1).nonzero().flatten().tolist()
            raise MetricError(
                f"keypoint_regression_error: the {split} meter's {name} are NaN or infinite in rows "
                f"{rows[:5]}{' ...' if len(rows) > 5 else ''}"
            )
    features = centroids.double().flatten(1).numpy()
    # (x, y) of each part side by side, as in the features.
    feature_active = active.repeat_interleave(2, dim=1).numpy()
    return features, feature_active, points.double().numpy(), visible.numpy()


class ForegroundIoUMeter(CountMeter):
    """IoU (x100) of the predicted foreground with ground-truth masks, accumulated over the data set.

    Predicted foreground: pixels whose argmax over the maps, bilinearly upsampled to the mask size, is
    not the background (last) channel. Ground truth: ``mask > 0.5``. The score is
    ``sum(intersection) / sum(union)`` over all images (not a mean of per-image IoUs). When neither the
    prediction nor the masks contain any foreground pixel the two agree everywhere and the score is 100.

    ``fg_missed`` is the share (x100) of ground-truth foreground pixels whose argmax is the background
    channel. It tells a background prototype that has taken the object (near 100) from foreground
    concepts that spill into the background (near 0), two failures that both give a low ``fg_iou``; 0
    when the masks hold no foreground.

    State: ``intersection ()``, ``union ()``, ``foreground ()`` (ground-truth foreground pixels) and
    ``pixels ()`` counts.
    """

    _state_names = ("intersection", "union", "foreground", "pixels")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.reset()

    def reset(self) -> None:
        self.intersection = torch.zeros((), dtype=torch.long, device=self.device)
        self.union = torch.zeros_like(self.intersection)
        self.foreground = torch.zeros_like(self.intersection)
        self.pixels = torch.zeros_like(self.intersection)

    @torch.no_grad()
    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch: maps ``(B, K, h, w)`` (background last), masks ``(B, H, W)`` or ``(B, 1, H, W)``."""
        check_maps(maps)
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() != 3 or masks.shape[0] != maps.shape[0]:
            raise MetricError(f"masks: expected a ({maps.shape[0]}, H, W) tensor, got shape {tuple(masks.shape)}")
        upsampled = F.interpolate(maps.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        # "The argmax is not the background (last) channel", without an argmax along the strided channel
        # dimension (50x slower): the first maximum is a foreground channel exactly when the foreground
        # maximum reaches the background value (the maps are finite, see check_maps).
        if maps.shape[1] > 1:
            predicted = upsampled[:, :-1].amax(dim=1) >= upsampled[:, -1]
        else:  # the background alone
            predicted = torch.zeros_like(upsampled[:, 0], dtype=torch.bool)
        truth = masks.to(predicted.device) > 0.5
        self.intersection += (predicted & truth).sum().to(self.device)
        self.union += (predicted | truth).sum().to(self.device)
        self.foreground += truth.sum().to(self.device)
        self.pixels += truth.numel()

    def compute(self) -> dict[str, float]:
        if int(self.pixels) == 0:
            raise MetricError("ForegroundIoUMeter: no masks were added before compute()")
        union, foreground = int(self.union), int(self.foreground)
        missed = foreground - int(self.intersection)
        return {
            "fg_iou": 100.0 * int(self.intersection) / union if union else 100.0,
            "fg_missed": 100.0 * missed / foreground if foreground else 0.0,
        }
