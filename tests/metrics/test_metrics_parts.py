"""Part discovery (NMI / ARI), keypoint regression (KPR) and foreground IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ivpt.metrics import (
    ForegroundIoUMeter,
    KeypointRegressionMeter,
    MetricError,
    PartDiscoveryMeter,
    centroids_from_maps,
    keypoint_part_assignments,
    keypoint_regression_error,
    kpr_box,
    normalize_to_bbox,
)


def _random_keypoints(generator: torch.Generator, batch: int, count: int, height: int, width: int) -> torch.Tensor:
    xy = torch.rand(batch, count, 2, generator=generator) * torch.tensor([width - 1, height - 1])
    visible = (torch.rand(batch, count, 1, generator=generator) > 0.25).float()
    return torch.cat([xy, visible], dim=-1)


def test_assignments_equal_full_bilinear_upsampling() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 5, 4, 6, generator=generator)
    keypoints = _random_keypoints(generator, 3, 40, height=32, width=24)
    keypoints[0, :4, :2] = torch.tensor([[0.0, 0.0], [23.0, 31.0], [23.4, 0.2], [0.0, 31.0]])
    upsampled = F.interpolate(maps, size=(32, 24), mode="bilinear", align_corners=False).argmax(dim=1)
    x, y = keypoints[..., 0].round().long(), keypoints[..., 1].round().long()
    expected = upsampled[torch.arange(3)[:, None], y, x]
    assert torch.equal(keypoint_part_assignments(maps, keypoints, (32, 24)), expected)


def _peaked_scene(batch: int, parts: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Part k dominates the 8x8-pixel cell of keypoint k (cells differ within an image); background elsewhere."""
    cells = torch.stack([torch.randperm(16, generator=generator)[:parts] for _ in range(batch)])
    logits = torch.zeros(batch, parts + 1, 4, 4)
    logits[:, parts] = 2.0
    for k in range(parts):
        logits[torch.arange(batch), k, cells[:, k] // 4, cells[:, k] % 4] = 8.0
    xy = torch.stack([cells % 4, cells // 4], dim=-1) * 8 + 3.5 + torch.rand(batch, parts, 2, generator=generator) - 0.5
    return logits.softmax(dim=1), torch.cat([xy, torch.ones(batch, parts, 1)], dim=-1)


def test_parts_that_sit_on_their_keypoints_score_100() -> None:
    maps, keypoints = _peaked_scene(10, 4, torch.Generator().manual_seed(1))
    meter = PartDiscoveryMeter()
    meter.update(maps, keypoints, input_size=32)
    result = meter.compute()
    assert result["part_nmi"] == pytest.approx(100.0)
    assert result["part_ari"] == pytest.approx(100.0)
    predicted, keypoint_ids = meter.state_tensors()
    assert torch.equal(predicted, keypoint_ids)


def test_part_discovery_matches_sklearn_and_skips_invisible_keypoints() -> None:
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(6, 4, 4, 4, generator=generator)
    keypoints = _random_keypoints(generator, 6, 5, 32, 32)
    meter = PartDiscoveryMeter()
    meter.update(maps[:2], keypoints[:2], 32)
    meter.update(maps[2:], keypoints[2:], 32)
    visible = keypoints[..., 2] > 0.5
    predicted = keypoint_part_assignments(maps, keypoints, 32)[visible].numpy()
    truth = torch.arange(5).expand(6, 5)[visible].numpy()
    assert meter.num_rows == int(visible.sum()) < 30
    result = meter.compute()
    assert result["part_nmi"] == pytest.approx(100 * normalized_mutual_info_score(truth, predicted))
    assert result["part_ari"] == pytest.approx(100 * adjusted_rand_score(truth, predicted))


def test_part_discovery_merge_concatenates() -> None:
    maps, keypoints = _peaked_scene(6, 3, torch.Generator().manual_seed(3))
    whole, first, second = PartDiscoveryMeter(), PartDiscoveryMeter(), PartDiscoveryMeter()
    whole.update(maps, keypoints, 32)
    first.update(maps[:4], keypoints[:4], 32)
    second.update(maps[4:], keypoints[4:], 32)
    merged = first.merge(second)
    for a, b in zip(merged.state_tensors(), whole.state_tensors(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(MetricError, match="no visible keypoints were added"):
        PartDiscoveryMeter().compute()


def test_centroids_known_answers() -> None:
    maps = torch.zeros(1, 4, 4, 4)
    maps[0, 0, 2, 1] = 1.0  # one cell: centre (1.5 * 4 - 0.5, 2.5 * 4 - 0.5) = (5.5, 9.5)
    maps[0, 1, 0, 0] = maps[0, 1, 0, 3] = 0.6  # two cells of one row: centres x 1.5 and 13.5
    maps[0, 2, 3, 3] = 0.4  # never above 0.5: inactive, its centroid (13.5, 13.5) is kept all the same
    maps[0, 3] = 1.0  # background, ignored
    bbox = torch.tensor([[1.5, 1.5, 11.5, 21.5]])  # width 10, height 20
    centroids, active = centroids_from_maps(maps, bbox, input_size=16)
    assert centroids.shape == (1, 3, 2)
    assert torch.allclose(centroids[0], torch.tensor([[0.4, 0.4], [0.6, 0.0], [1.2, 0.6]]))
    assert active.tolist() == [[True, True, False]]


def test_normalize_to_bbox_divides_each_axis_by_its_side() -> None:
    points = torch.tensor([[[10.0, 20.0], [0.0, 0.0]]])
    bbox = torch.tensor([[0.0, 10.0, 40.0, 30.0]])
    assert torch.allclose(normalize_to_bbox(points, bbox), torch.tensor([[[0.25, 0.5], [0.0, -0.5]]]))


def _loaded_meter(
    centroids: torch.Tensor, points: torch.Tensor, visible: torch.Tensor, active: torch.Tensor | None = None
) -> KeypointRegressionMeter:
    meter = KeypointRegressionMeter(num_parts=centroids.shape[1], num_keypoints=points.shape[1])
    if active is None:
        active = torch.ones(centroids.shape[:2], dtype=torch.bool)
    meter.load_state_tensors([centroids, active, points, visible])
    return meter


def test_kpr_is_zero_when_keypoints_are_affine_in_the_centroids() -> None:
    generator = torch.Generator().manual_seed(4)
    weights = torch.randn(3 * 2, 2 * 2, generator=generator, dtype=torch.float64)
    offset = torch.randn(2 * 2, generator=generator, dtype=torch.float64)

    def split(count: int) -> KeypointRegressionMeter:
        centroids = torch.rand(count, 3, 2, generator=generator, dtype=torch.float64)
        points = (centroids.flatten(1) @ weights + offset).view(count, 2, 2)
        visible = torch.rand(count, 2, generator=generator) > 0.3
        return _loaded_meter(centroids.float(), points.float(), visible)

    assert keypoint_regression_error(split(40), split(25)) < 1e-3


def test_kpr_without_information_predicts_the_training_mean() -> None:
    # All parts inactive -> constant features -> the regressor returns the mean training keypoint.
    train_points = torch.tensor([[[0.2, 0.2], [9.0, 9.0]], [[0.4, 0.4], [5.0, 5.0]], [[7.0, 7.0], [1.0, 1.0]]])
    train_visible = torch.tensor([[True, False], [True, True], [False, True]])
    test_points = torch.tensor([[[0.6, 0.7], [3.0, 3.0]], [[0.0, 0.0], [2.0, 3.0]]])
    test_visible = torch.tensor([[True, False], [False, True]])
    inactive = torch.zeros(3, 2, dtype=torch.bool)
    train = _loaded_meter(torch.rand(3, 2, 2), train_points, train_visible, inactive)
    test = _loaded_meter(torch.rand(2, 2, 2), test_points, test_visible, inactive[:2])
    # Keypoint 0: mean (0.3, 0.3) vs (0.6, 0.7) -> 0.5; keypoint 1: mean (3, 3) vs (2, 3) -> 1.0.
    assert keypoint_regression_error(train, test) == pytest.approx(100 * (0.5 + 1.0) / 2)


def test_kpr_meter_stores_bbox_normalised_rows() -> None:
    maps = torch.zeros(2, 3, 4, 4)
    maps[:, 0, 1, 2] = 1.0
    maps[:, 1, 3, 0] = 1.0
    keypoints = torch.tensor([[[6.0, 8.0, 1.0]], [[2.0, 2.0, 0.0]]])
    bbox = torch.tensor([[0.0, 0.0, 16.0, 16.0], [2.0, 2.0, 10.0, 18.0]])
    meter = KeypointRegressionMeter(num_parts=2, num_keypoints=1)
    meter.update(maps[:1], keypoints[:1], bbox[:1], 16)
    meter.update(maps[1:], keypoints[1:], bbox[1:], 16)
    centroids, active, points, visible = meter.state_tensors()
    assert torch.allclose(centroids[0], torch.tensor([[9.5 / 16, 5.5 / 16], [1.5 / 16, 13.5 / 16]]))
    assert torch.allclose(centroids[1], torch.tensor([[7.5 / 8, 3.5 / 16], [-0.5 / 8, 11.5 / 16]]))
    assert active.all()
    assert torch.allclose(points[:, 0], torch.tensor([[6 / 16, 8 / 16], [0.0, 0.0]]))
    assert visible.tolist() == [[True], [False]]


def test_kpr_refuses_a_keypoint_never_seen_in_training() -> None:
    train = _loaded_meter(torch.rand(3, 2, 2), torch.rand(3, 2, 2), torch.tensor([[True, False]] * 3))
    test = _loaded_meter(torch.rand(2, 2, 2), torch.rand(2, 2, 2), torch.tensor([[True, True]] * 2))
    with pytest.raises(MetricError, match="keypoint 1 is visible in 2 test images but in no training image"):
        keypoint_regression_error(train, test)
    with pytest.raises(MetricError, match="train and test meters differ"):
        keypoint_regression_error(train, KeypointRegressionMeter(num_parts=3, num_keypoints=2))


def test_kpr_meter_rejects_foreign_states() -> None:
    meter = KeypointRegressionMeter(num_parts=2, num_keypoints=3)
    active = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(MetricError, match=r"rows of 'centroids' have shape \(2, 2\) here, got \(4, 2\)"):
        meter.load_state_tensors(
            [torch.zeros(1, 4, 2), active, torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool)]
        )
    with pytest.raises(MetricError, match="equal row counts, got 1, 1, 2, 1"):
        meter.load_state_tensors(
            [torch.zeros(1, 2, 2), active, torch.zeros(2, 3, 2), torch.zeros(1, 3, dtype=torch.bool)]
        )
    with pytest.raises(MetricError, match="rows of 'keypoints' have shape"):
        meter.merge(KeypointRegressionMeter(num_parts=2, num_keypoints=5))
    with pytest.raises(MetricError, match="cannot merge a PartDiscoveryMeter into a KeypointRegressionMeter"):
        meter.merge(PartDiscoveryMeter())


def test_foreground_iou_on_hand_masks() -> None:
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 0, :, :2] = 1.0  # image 0: foreground predicted in columns 0-1
    maps[0, 1, :, 2:] = 1.0
    maps[1, 1] = 1.0  # image 1: all background
    masks = torch.zeros(2, 4, 4)
    masks[0, :, 1:3] = 0.9  # image 0: true foreground in columns 1-2
    masks[1, 0, 0] = 0.4  # below 0.5: background
    meter = ForegroundIoUMeter()
    meter.update(maps[:1], masks[:1])
    meter.update(maps[1:], masks[1:, None])
    # Intersection: column 1 (4 px); union: columns 0-2 (12 px).
    # Of the 8 true foreground pixels (columns 1-2), the 4 in column 2 are predicted background.
    assert meter.compute() == pytest.approx({"fg_iou": 100 / 3, "fg_missed": 50.0})
    assert (int(meter.intersection), int(meter.union), int(meter.foreground), int(meter.pixels)) == (4, 12, 8, 32)

    upsampled = ForegroundIoUMeter()
    upsampled.update(maps[:1], F.interpolate(masks[:1, None], scale_factor=4, mode="nearest")[:, 0])
    assert upsampled.compute()["fg_iou"] == pytest.approx(100 / 3)


def test_foreground_iou_edge_cases() -> None:
    meter = ForegroundIoUMeter()
    with pytest.raises(MetricError, match="no masks were added"):
        meter.compute()
    background_only = torch.zeros(1, 3, 2, 2)
    background_only[:, 2] = 1.0
    meter.update(background_only, torch.zeros(1, 2, 2))
    assert meter.compute() == {"fg_iou": 100.0, "fg_missed": 0.0}
    with pytest.raises(MetricError, match=r"masks: expected a \(1, H, W\) tensor, got shape \(2, 2, 2\)"):
        meter.update(background_only, torch.zeros(2, 2, 2))
    assert meter.merge(meter.empty_like()).state_tensors()[-1].item() == 4  # pixels


def test_foreground_is_where_the_first_maximum_is_not_the_background() -> None:
    generator = torch.Generator().manual_seed(0)
    # Ties (a foreground channel equal to the background wins, as argmax takes the first maximum) and a
    # background-only map.
    maps = torch.randint(0, 3, (4, 4, 6, 6), generator=generator).float()
    masks = torch.rand(4, 6, 6, generator=generator)
    for channels in (maps, maps[:, -1:]):
        meter = ForegroundIoUMeter()
        meter.update(channels, masks)
        upsampled = F.interpolate(channels, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        predicted = upsampled.argmax(dim=1) != channels.shape[1] - 1
        truth = masks > 0.5
        assert int(meter.intersection) == int((predicted & truth).sum())
        assert int(meter.union) == int((predicted | truth).sum())


def test_fg_missed_tells_a_background_that_took_the_object_from_spilling_concepts() -> None:
    masks = torch.zeros(1, 4, 4)
    masks[0, 1:3, 1:3] = 1.0  # a 2 x 2 object in the middle
    # The roles swapped: the background channel (last) covers the object, a concept covers the rest.
    swapped = torch.zeros(1, 2, 4, 4)
    swapped[0, 0] = 1.0 - masks[0]
    swapped[0, 1] = masks[0]
    # A concept that spills from the object over the whole image: a poor IoU, but nothing missed.
    spilling = torch.zeros(1, 2, 4, 4)
    spilling[0, 0] = 1.0
    results = {}
    for name, maps in (("swapped", swapped), ("spilling", spilling)):
        meter = ForegroundIoUMeter()
        meter.update(maps, masks)
        results[name] = meter.compute()
    assert results["swapped"] == pytest.approx({"fg_iou": 0.0, "fg_missed": 100.0})
    assert results["spilling"] == pytest.approx({"fg_iou": 25.0, "fg_missed": 0.0})


def _protocol_kpr_reference(
    train: tuple[np.ndarray, ...], test: tuple[np.ndarray, ...], zero_first: bool = False
) -> float:
    """KPR written out with numpy alone: per keypoint, standardise the centroids of the training images
    where it is visible, set inactive parts to 0, least squares without intercept, un-standardise.

    ``zero_first`` zeroes the inactive centroids before the standardisation instead (ivpt's old order).
    Inputs per split: centroids ``(M, N, 2)``, active ``(M, N)``, keypoints ``(M, P, 2)``, visible ``(M, P)``.
    """

    def standardiser(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = values.std(axis=0)
        return values.mean(axis=0), np.where(scale > 0, scale, 1.0)

    def features(centroids: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = np.repeat(active, 2, axis=1)
        flat = centroids.reshape(len(centroids), -1)
        return (np.where(mask, flat, 0.0) if zero_first else flat), mask

    errors = []
    for keypoint in range(train[2].shape[1]):
        fit, held = train[3][:, keypoint], test[3][:, keypoint]
        x_fit, active_fit = features(train[0][fit], train[1][fit])
        x_held, active_held = features(test[0][held], test[1][held])
        mean_x, scale_x = standardiser(x_fit)
        y_fit = train[2][fit, keypoint]
        mean_y, scale_y = standardiser(y_fit)
        z_fit, z_held = (x_fit - mean_x) / scale_x, (x_held - mean_x) / scale_x
        if not zero_first:
            z_fit, z_held = np.where(active_fit, z_fit, 0.0), np.where(active_held, z_held, 0.0)
        weights = np.linalg.lstsq(z_fit, (y_fit - mean_y) / scale_y, rcond=None)[0]
        predicted = z_held @ weights * scale_y + mean_y
        errors.append(np.linalg.norm(predicted - test[2][held, keypoint], axis=1))
    return 100.0 * float(np.concatenate(errors).mean())


def _regression_scene(generator: torch.Generator, images: int, inactive: float):
    """Maps of 4 parts on an 8 x 8 grid (input 32 px): an active part peaks on one cell, an inactive one is
    flat below 0.5. Keypoints follow the active parts' peaks; every box is the whole image (0..32)."""
    parts, keypoints = 4, 3
    cells = torch.randint(0, 64, (images, parts), generator=generator)
    active = torch.rand(images, parts, generator=generator) >= inactive
    logits = torch.zeros(images, parts + 1, 8, 8)
    logits[:, parts] = 1.0
    rows = torch.arange(images)
    for k in range(parts):
        peak = torch.where(active[:, k], 8.0, 0.5)
        logits[rows, k, cells[:, k] // 8, cells[:, k] % 8] = peak
    maps = logits.softmax(dim=1)
    centre = torch.stack([cells % 8, cells // 8], dim=-1).float() * 4 + 1.5  # (images, parts, 2) pixels
    mixing = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.2, 0.0, 0.3, 0.5]])
    xy = torch.einsum("pk,bkc->bpc", mixing, centre) + torch.randn(images, keypoints, 2, generator=generator)
    visible = torch.rand(images, keypoints, 1, generator=generator) > 0.2
    return maps, torch.cat([xy.clamp(0, 31), visible.float()], dim=-1), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * images)


def test_kpr_standardises_all_centroids_before_zeroing_the_inactive_parts() -> None:
    """docs/method.md section 9: an absent part contributes its feature's mean (0 once standardised)."""
    generator = torch.Generator().manual_seed(11)
    meters, arrays = [], []
    for images in (120, 60):
        maps, keypoints, bbox = _regression_scene(generator, images, inactive=0.3)
        meter = KeypointRegressionMeter(num_parts=4, num_keypoints=3)
        meter.update(maps[: images // 2], keypoints[: images // 2], bbox[: images // 2], 32)
        meter.update(maps[images // 2 :], keypoints[images // 2 :], bbox[images // 2 :], 32)
        meters.append(meter)
        # The reference's own centroids: each cell's weight at its centre, (j + 0.5) * 4 - 0.5 pixels.
        parts = maps[:, :4].double()
        centre = torch.arange(8, dtype=torch.float64) * 4 + 1.5
        centroids = torch.stack(
            [(parts.sum(2) * centre).sum(2), (parts.sum(3) * centre).sum(2)], dim=-1
        ) / parts.sum((2, 3))[..., None]
        arrays.append(
            (
                (centroids / 32).numpy(),
                (parts.amax(dim=(2, 3)) > 0.5).numpy(),
                (keypoints[..., :2].double() / 32).numpy(),
                (keypoints[..., 2] > 0.5).numpy(),
            )
        )
    assert 0.2 < 1 - arrays[0][1].mean() < 0.4  # about 30 % of the parts are inactive
    expected = _protocol_kpr_reference(arrays[0], arrays[1])
    assert keypoint_regression_error(meters[0], meters[1]) == pytest.approx(expected, rel=1e-6)
    # Zeroing first (ivpt before issue 25) gives another number: the order matters.
    assert abs(_protocol_kpr_reference(arrays[0], arrays[1], zero_first=True) - expected) > 1.0


def test_kpr_box_keeps_the_annotated_size_and_moves_the_corner_into_the_image() -> None:
    # Edges in a 24 x 24 input: the first box starts 10 px left of the image, the second lies inside.
    edges = torch.tensor([[-10.5, 3.0, 29.5, 23.0], [2.0, -0.5, 12.0, 4.5]])
    box = kpr_box(edges, 24)
    # Widths 40 and 10, heights 20 and 5 stay; the first corner moves to the image's left edge, -0.5.
    assert box.tolist() == [[-0.5, 3.0, 39.5, 23.0], [2.0, -0.5, 12.0, 4.5]]
    points = torch.tensor([[[9.5, 13.0]], [[7.0, 2.0]]])
    assert normalize_to_bbox(points, box).tolist() == [[[0.25, 0.5]], [[0.5, 0.5]]]
    with pytest.raises(MetricError, match=r"bbox_edges: expected a \(B, 4\) tensor"):
        kpr_box(torch.zeros(2, 3), 24)
