"""Maps holding NaN or infinite values are refused with a MetricError, never scored (issue 25, point 4)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ivpt.metrics import (
    ConsistencyMeter,
    ForegroundIoUMeter,
    KeypointRegressionMeter,
    MetricError,
    PartDiscoveryMeter,
    StabilityMeter,
    centroids_from_maps,
    concept_peaks,
    keypoint_part_assignments,
    keypoint_regression_error,
    part_region_masks,
)

BATCH, CHANNELS, GRID, SIZE = 3, 4, 4, 32


def _maps(bad: float) -> torch.Tensor:
    """Softmax maps with one ``bad`` value in image 1."""
    maps = torch.rand(BATCH, CHANNELS, GRID, GRID, generator=torch.Generator().manual_seed(0)).softmax(dim=1)
    maps[1, 2, 1, 3] = bad
    return maps


KEYPOINTS = torch.tensor([[[4.0, 5.0, 1.0], [20.0, 9.0, 1.0], [30.0, 30.0, 1.0]]] * BATCH)
LABELS = torch.tensor([0, 1, 1])
BOXES = torch.tensor([[0.0, 0.0, 31.0, 31.0]] * BATCH)

# Every place where maps enter a metric, as ``use(maps)``.
USES: dict[str, Callable[[torch.Tensor], object]] = {
    "concept_peaks": lambda maps: concept_peaks(maps, 16),
    "consistency": lambda maps: ConsistencyMeter(2, CHANNELS - 1, 3).update(maps, KEYPOINTS, LABELS, SIZE),
    "stability, noisy maps": lambda maps: StabilityMeter(2, CHANNELS - 1, 3).update(
        _maps(0.5), maps, KEYPOINTS, LABELS, SIZE
    ),
    "stability, clean maps": lambda maps: StabilityMeter(2, CHANNELS - 1, 3).update(
        maps, _maps(0.5), KEYPOINTS, LABELS, SIZE
    ),
    "part assignments": lambda maps: keypoint_part_assignments(maps, KEYPOINTS, SIZE),
    "part discovery": lambda maps: PartDiscoveryMeter().update(maps, KEYPOINTS, SIZE),
    "centroids": lambda maps: centroids_from_maps(maps, BOXES, SIZE),
    "kpr": lambda maps: KeypointRegressionMeter(CHANNELS - 1, 3).update(maps, KEYPOINTS, BOXES, SIZE),
    "fg_iou": lambda maps: ForegroundIoUMeter().update(maps, torch.ones(BATCH, SIZE, SIZE)),
    "faithfulness regions": lambda maps: part_region_masks(maps, torch.zeros(BATCH, dtype=torch.long), SIZE),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("use", list(USES))
def test_non_finite_maps_raise_a_metric_error_naming_the_image(use: str, bad: float) -> None:
    USES[use](_maps(0.5))  # finite maps pass
    with pytest.raises(MetricError, match=r"1 NaN or infinite values, in image\(s\) 1 of the batch"):
        USES[use](_maps(bad))


def test_kpr_refuses_non_finite_rows_with_its_own_error() -> None:
    """Rows that reach the regression some other way (a merged state) fail as a MetricError, not sklearn's."""
    meter = KeypointRegressionMeter(num_parts=2, num_keypoints=1)
    centroids = torch.rand(4, 2, 2)
    centroids[2, 1, 0] = float("nan")
    active = torch.ones(4, 2, dtype=torch.bool)
    meter.load_state_tensors([centroids, active, torch.rand(4, 1, 2), torch.ones(4, 1, dtype=torch.bool)])
    clean = KeypointRegressionMeter(num_parts=2, num_keypoints=1)
    clean.load_state_tensors([torch.rand(4, 2, 2), active, torch.rand(4, 1, 2), torch.ones(4, 1, dtype=torch.bool)])
    with pytest.raises(MetricError, match=r"the train meter's centroids are NaN or infinite in rows \[2\]"):
        keypoint_regression_error(meter, clean)
    with pytest.raises(MetricError, match=r"the test meter's centroids are NaN or infinite in rows \[2\]"):
        keypoint_regression_error(clean, meter)
