"""Consistency and stability (Huang et al. 2023) on maps with known peaks."""

from __future__ import annotations

import pytest
import torch

from ivpt.metrics import (
    ConsistencyMeter,
    MetricError,
    StabilityMeter,
    add_stability_noise,
    concept_peaks,
    keypoint_hits,
    keypoints_to_frame,
)

# With maps, model input and scoring frame all SIZE x SIZE the bicubic resize is the identity, so peaks
# and keypoints are exact pixels and box boundaries can be tested to the pixel.
SIZE = 20


def _delta_maps(peaks: list[list[tuple[int, int]]], size: int = SIZE) -> torch.Tensor:
    """``(B, K + 1, size, size)`` maps: concept k of image b is 1 at ``peaks[b][k]`` (x, y); empty background."""
    maps = torch.zeros(len(peaks), len(peaks[0]) + 1, size, size)
    for b, image_peaks in enumerate(peaks):
        for k, (x, y) in enumerate(image_peaks):
            maps[b, k, y, x] = 1.0
    return maps


def _keypoints(points: list[list[tuple[float, float, float]]]) -> torch.Tensor:
    return torch.tensor(points, dtype=torch.float32)


def _grid_scene(generator: torch.Generator, batch: int, concepts: int, grid: int = 8, cell: int = 8):
    """Images where concept k peaks on the grid cell that holds keypoint k (distinct cells per image)."""
    cells = torch.stack([torch.randperm(grid * grid, generator=generator)[:concepts] for _ in range(batch)])
    logits = torch.zeros(batch, concepts + 1, grid, grid)
    cell_x, cell_y = cells % grid, cells // grid
    for k in range(concepts):
        logits[torch.arange(batch), k, cell_y[:, k], cell_x[:, k]] = 6.0
    maps = logits.softmax(dim=1)
    jitter = torch.rand(batch, concepts, 2, generator=generator) * 2 - 1
    xy = torch.stack([cell_x, cell_y], dim=-1) * cell + (cell - 1) / 2 + jitter
    keypoints = torch.cat([xy, torch.ones(batch, concepts, 1)], dim=-1)
    return maps, keypoints


def test_keypoints_to_frame_uses_pixel_centres() -> None:
    points = torch.tensor([[0.0, 63.0], [31.5, 10.0]])
    carried = keypoints_to_frame(points, 64, 224)
    assert torch.allclose(carried, torch.tensor([[1.25, 221.75], [111.5, 36.25]]))
    assert torch.equal(keypoints_to_frame(points, (64, 64), 64), points)
    # Non-square input: x follows the width, y the height.
    assert torch.allclose(
        keypoints_to_frame(torch.tensor([[15.0, 15.0]]), (32, 16), 224), torch.tensor([[216.5, 108.0]])
    )


def test_concept_peaks_find_the_upsampled_maximum() -> None:
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, 2, 5] = 1.0
    maps[0, 1, 7, 0] = 1.0
    assert concept_peaks(maps, map_size=8).tolist() == [[[5, 2], [0, 7]]]
    peaks = concept_peaks(maps, map_size=16).float()
    # Cell (5, 2) has its centre at (10.5, 4.5) in the 16-pixel frame.
    assert (peaks[0, 0] - torch.tensor([10.5, 4.5])).abs().max() <= 0.5


@pytest.mark.parametrize("map_size", [224, 37, 5])
def test_concept_peaks_are_those_of_torchs_bicubic_upsampling(map_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F

    from ivpt.metrics import consistency

    generator = torch.Generator().manual_seed(0)
    # Soft, nearly hard (plateaus of rounded 1.0: ties only float rounding decides), flat and non-square maps.
    cases = [(torch.randn(6, 9, 16, 16, generator=generator) * scale).softmax(dim=1) for scale in (0.5, 5.0, 500.0)]
    cases += [torch.zeros(2, 3, 16, 16), torch.full((1, 2, 7, 9), 0.25), torch.rand(3, 4, 5, 11, generator=generator)]
    # A concept that is nowhere (tiny values with one clear peak), large and negative values, and noise-like
    # maps with many near-peaks. (Non-finite maps are refused: tests/metrics/test_metrics_nonfinite.py.)
    soft = (torch.randn(4, 6, 16, 16, generator=generator) * 2.0).softmax(dim=1)
    cases += [soft * 1e-6, soft * 1e3 - 200.0, 1.0 + 1e-3 * torch.rand(4, 6, 16, 16, generator=generator)]
    # Small groups of maps, so that groups end in the middle of an image's maps.
    monkeypatch.setattr(consistency, "_PEAK_CHUNK_BYTES", 5 * 4 * map_size * map_size)
    for maps in cases:
        upsampled = F.interpolate(maps, size=(map_size, map_size), mode="bicubic", align_corners=False)
        flat = upsampled.flatten(2).argmax(dim=2)
        expected = torch.stack([flat % map_size, flat // map_size], dim=-1)
        assert torch.equal(concept_peaks(maps, map_size=map_size), expected), tuple(maps.shape)


def test_concept_peaks_resolve_faint_maps_without_torchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F

    from ivpt.metrics import consistency

    generator = torch.Generator().manual_seed(1)
    # The maps of concepts that are absent from an image: every value near 1e-7, one peak all the same.
    faint = (torch.randn(8, 5, 16, 16, generator=generator) * 3.0).softmax(dim=1) * 1e-6
    upsampled = F.interpolate(faint, size=(224, 224), mode="bicubic", align_corners=False)
    flat = upsampled.flatten(2).argmax(dim=2)
    expected = torch.stack([flat % 224, flat // 224], dim=-1)
    consistency.concept_peaks(faint[:1])  # fills the caches of weights, which F.interpolate reads off
    calls: list[int] = []
    real_interpolate = F.interpolate

    def counting_interpolate(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real_interpolate(*args, **kwargs)

    monkeypatch.setattr(consistency.F, "interpolate", counting_interpolate)
    assert torch.equal(consistency.concept_peaks(faint), expected)
    assert not calls


def test_hit_box_is_inclusive_and_needs_visibility() -> None:
    maps = _delta_maps([[(10, 10)]])[:, :1]
    keypoints = _keypoints([[(13, 10, 1), (14, 10, 1), (7, 13, 1), (10, 10, 0), (6.9, 10, 1)]])
    hits = keypoint_hits(maps, keypoints, SIZE, map_size=SIZE, box_half_size=3)
    assert hits.tolist() == [[[True, False, True, False, False]]]


def test_hit_box_is_clipped_to_the_frame() -> None:
    maps = _delta_maps([[(0, 0)]])[:, :1]
    keypoints = _keypoints([[(2, 2, 1), (-1, 0, 1)]])
    hits = keypoint_hits(maps, keypoints, SIZE, map_size=SIZE, box_half_size=3)
    assert hits.tolist() == [[[True, False]]]


def test_concepts_always_on_their_keypoint_are_fully_consistent() -> None:
    generator = torch.Generator().manual_seed(0)
    maps, keypoints = _grid_scene(generator, batch=12, concepts=4)
    labels = torch.arange(12) % 3
    meter = ConsistencyMeter(num_classes=3, num_concepts=4, num_keypoints=4)
    meter.update(maps, keypoints, labels, input_size=64)
    assert meter.compute() == {"consistency": 100.0}
    frequencies = meter.frequencies()
    assert torch.equal(frequencies.diagonal(dim1=1, dim2=2), torch.ones(3, 4, dtype=torch.float64))


def test_peaks_far_from_every_keypoint_are_never_consistent() -> None:
    generator = torch.Generator().manual_seed(1)
    batch = 10
    maps = torch.zeros(batch, 4, 8, 8)
    maps[:, :3, :, 7] = torch.rand(batch, 3, 8, generator=generator) + 1  # peaks in the last column
    keypoints = torch.cat([torch.rand(batch, 5, 2, generator=generator) * 10, torch.ones(batch, 5, 1)], dim=-1)
    meter = ConsistencyMeter(num_classes=2, num_concepts=3, num_keypoints=5)
    meter.update(maps, keypoints, torch.arange(batch) % 2, input_size=64)
    assert meter.compute()["consistency"] == 0.0
    assert int(meter.hits.sum()) == 0


def test_uniformly_random_maps_are_rarely_consistent() -> None:
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(60, 6, 8, 8, generator=generator).softmax(dim=1)
    keypoints = torch.cat([torch.rand(60, 6, 2, generator=generator) * 63, torch.ones(60, 6, 1)], dim=-1)
    meter = ConsistencyMeter(num_classes=4, num_concepts=5, num_keypoints=6)
    meter.update(maps, keypoints, torch.arange(60) % 4, input_size=64)
    assert meter.compute()["consistency"] < 10.0


def test_hand_computed_fractional_frequencies_around_the_threshold() -> None:
    # Keypoint 0 at (2, 2), keypoint 1 at (15, 15); a missing concept sits at (10, 10), far from both.
    kp0, kp1, away = (2, 2), (15, 15), (10, 10)
    both = [(2, 2, 1), (15, 15, 1)]
    kp0_hidden = [(2, 2, 0), (15, 15, 1)]
    # Class 0, five images: concept 0 hits kp0 4/5 = 0.8 (consistent, threshold inclusive);
    # concept 1 hits kp1 2/5.
    class0 = [[kp0, kp1], [kp0, kp1], [kp0, away], [kp0, away], [away, away]]
    # Class 1, four images: concept 0 hits kp0 on 3 images, kp0 is hidden on the fourth -> 3/3 (consistent,
    # 3/4 if the hidden keypoint counted); concept 1 hits kp1 3/4 = 0.75 (not consistent).
    class1 = [[kp0, kp1], [kp0, kp1], [kp0, kp1], [away, away]]
    maps = _delta_maps(class0 + class1)
    keypoints = _keypoints([both] * 5 + [both] * 3 + [kp0_hidden])
    labels = torch.tensor([0] * 5 + [1] * 4)
    meter = ConsistencyMeter(num_classes=3, num_concepts=2, num_keypoints=2, map_size=SIZE, box_half_size=2)
    meter.update(maps, keypoints, labels, input_size=SIZE)
    expected = torch.tensor([[[0.8, 0.0], [0.0, 0.4]], [[1.0, 0.0], [0.0, 0.75]], [[0.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(meter.frequencies(), expected.double())
    assert meter.visible.tolist() == [[5, 5], [3, 4], [0, 0]]
    # Class 2 has no image: it is left out rather than counted as two inconsistent pairs.
    assert meter.compute() == {"consistency": 50.0}
    meter.threshold = 0.81
    assert meter.compute() == {"consistency": 25.0}


def test_consistency_streaming_and_merging_equal_one_pass() -> None:
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(12, 4, 4, 4, generator=generator)
    keypoints = torch.cat([torch.rand(12, 3, 2, generator=generator) * 31, torch.rand(12, 3, 1) > 0.3], dim=-1)
    labels = torch.randint(0, 3, (12,), generator=generator)
    settings = dict(num_classes=3, num_concepts=3, num_keypoints=3, map_size=32, box_half_size=6)
    whole = ConsistencyMeter(**settings)
    whole.update(maps, keypoints, labels, input_size=32)
    streamed = ConsistencyMeter(**settings)
    for chunk in range(3):
        part = slice(4 * chunk, 4 * chunk + 4)
        streamed.update(maps[part], keypoints[part], labels[part], input_size=32)
    first, second = ConsistencyMeter(**settings), ConsistencyMeter(**settings)
    first.update(maps[:5], keypoints[:5], labels[:5], input_size=32)
    second.update(maps[5:], keypoints[5:], labels[5:], input_size=32)
    first.merge(second)
    for meter in (streamed, first):
        for a, b in zip(meter.state_tensors(), whole.state_tensors(), strict=True):
            assert torch.equal(a, b)
    assert int(whole.hits.sum()) > 0


def test_identical_clean_and_noisy_maps_are_fully_stable() -> None:
    generator = torch.Generator().manual_seed(5)
    maps, keypoints = _grid_scene(generator, batch=6, concepts=3)
    meter = StabilityMeter(num_classes=2, num_concepts=3, num_keypoints=3)
    meter.update(maps, maps.clone(), keypoints, torch.tensor([0, 1, 0, 1, 0, 0]), input_size=64)
    assert meter.compute() == {"stability": 100.0}


def test_peaks_that_move_far_are_unstable() -> None:
    keypoints = _keypoints([[(2, 2, 1), (15, 15, 1)]] * 4)
    clean = _delta_maps([[(2, 2), (15, 15)]] * 4)
    # Concept 0 leaves keypoint 0 for the empty middle; concept 1 moves one pixel, inside its box.
    noisy = _delta_maps([[(10, 10), (16, 15)]] * 4)
    labels = torch.tensor([0, 0, 0, 0])
    meter = StabilityMeter(num_classes=1, num_concepts=2, num_keypoints=2, map_size=SIZE, box_half_size=2)
    meter.update(clean, noisy, keypoints, labels, input_size=SIZE)
    assert meter.stable.tolist() == [[0, 4]]
    assert meter.compute() == {"stability": 50.0}

    far = StabilityMeter(num_classes=1, num_concepts=2, num_keypoints=2, map_size=SIZE, box_half_size=2)
    far.update(clean, _delta_maps([[(15, 15), (2, 2)]] * 4), keypoints, labels, input_size=SIZE)
    assert far.compute() == {"stability": 0.0}


def test_stability_averages_each_class_first_then_the_class_concept_pairs() -> None:
    """Huang et al.'s weighting: a class of one image weighs as much as a class of three."""
    keypoints = _keypoints([[(2, 2, 1), (15, 15, 1)]] * 4)
    clean = _delta_maps([[(2, 2), (15, 15)]] * 4)
    # Concept 0 leaves its keypoint on the three images of class 1 only; concept 1 never moves.
    noisy = _delta_maps([[(2, 2), (15, 15)]] + [[(10, 10), (15, 15)]] * 3)
    labels = torch.tensor([0, 1, 1, 1])
    meter = StabilityMeter(num_classes=3, num_concepts=2, num_keypoints=2, map_size=SIZE, box_half_size=2)
    meter.update(clean, noisy, keypoints, labels, input_size=SIZE)
    # By hand, over the (class, concept) pairs of the two classes with images (class 2 has none):
    # class 0: concept 0 1/1, concept 1 1/1; class 1: concept 0 0/3, concept 1 3/3 -> (1 + 1 + 0 + 1) / 4.
    # (An average over all images per concept would give (1/4 + 4/4) / 2 = 62.5.)
    assert meter.compute() == {"stability": 75.0}
    assert meter.stable.tolist() == [[1, 1], [0, 3], [0, 0]] and meter.images.tolist() == [1, 3, 0]


def test_stability_reuses_the_consistency_meters_clean_hits_with_the_same_result() -> None:
    generator = torch.Generator().manual_seed(9)
    maps, keypoints = _grid_scene(generator, batch=6, concepts=3)
    # Noise as large as the maps moves some peaks off their keypoints, not all.
    noisy = maps + maps.amax() * torch.rand(maps.shape, generator=generator)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    clean_hits = ConsistencyMeter(2, 3, 3).update(maps, keypoints, labels, 64)
    assert clean_hits.dtype == torch.bool and torch.equal(clean_hits, keypoint_hits(maps[:, :3], keypoints, 64))
    computed, reused = StabilityMeter(2, 3, 3), StabilityMeter(2, 3, 3)
    computed.update(maps, noisy, keypoints, labels, 64)
    reused.update(maps, noisy, keypoints, labels, 64, clean_hits=clean_hits)
    assert torch.equal(reused.stable, computed.stable) and 0 < int(computed.stable.sum()) < 18
    # The hits are taken as given: hits of other maps change the score.
    other = StabilityMeter(2, 3, 3)
    other.update(maps, noisy, keypoints, labels, 64, clean_hits=~clean_hits)
    assert not torch.equal(other.stable, computed.stable)
    with pytest.raises(MetricError, match=r"clean_hits: expected shape \(6, 3, 3\) \(images, concepts, keypoints\)"):
        StabilityMeter(2, 3, 3).update(maps, noisy, keypoints, labels, 64, clean_hits=clean_hits[:, :2])


def test_stability_merge_and_state_roundtrip() -> None:
    generator = torch.Generator().manual_seed(7)
    maps, keypoints = _grid_scene(generator, batch=8, concepts=2)
    noisy = maps + 0.3 * torch.rand(maps.shape, generator=generator)
    labels = torch.tensor([0, 2, 2, 0, 1, 2, 0, 0])
    whole = StabilityMeter(3, 2, 2)
    whole.update(maps, noisy, keypoints, labels, 64)
    first, second = StabilityMeter(3, 2, 2), StabilityMeter(3, 2, 2)
    first.update(maps[:3], noisy[:3], keypoints[:3], labels[:3], 64)
    second.update(maps[3:], noisy[3:], keypoints[3:], labels[3:], 64)
    restored = StabilityMeter(3, 2, 2)
    restored.load_state_tensors(first.merge(second).state_tensors())
    assert restored.compute() == whole.compute()
    assert restored.images.tolist() == [4, 1, 3]


def test_stability_noise_is_clipped_gaussian_and_reproducible() -> None:
    images = torch.zeros(4, 3, 32, 32)
    noisy = add_stability_noise(images, torch.Generator().manual_seed(0))
    again = add_stability_noise(images, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    assert noisy.abs().max() <= 0.25
    # |N(0, 0.2)| exceeds 0.25 with probability 2 * (1 - Phi(1.25)) = 0.211.
    clipped_fraction = (noisy.abs() == 0.25).float().mean()
    assert 0.19 < clipped_fraction < 0.23
    assert add_stability_noise(images + 1, torch.Generator().manual_seed(0), std=0.01, clip=1.0).std() < 0.02


def test_bad_inputs_raise_clear_errors() -> None:
    meter = ConsistencyMeter(num_classes=2, num_concepts=3, num_keypoints=2)
    keypoints = torch.zeros(1, 2, 3)
    with pytest.raises(MetricError, match=r"maps: expected 4 channels, got shape \(1, 3, 4, 4\)"):
        meter.update(torch.rand(1, 3, 4, 4), keypoints, torch.tensor([0]), 32)
    with pytest.raises(MetricError, match=r"keypoints: expected 2 keypoints per image, got shape \(1, 5, 3\)"):
        meter.update(torch.rand(1, 4, 4, 4), torch.zeros(1, 5, 3), torch.tensor([0]), 32)
    with pytest.raises(MetricError, match=r"labels: expected class indices in \[0, 1\]"):
        meter.update(torch.rand(1, 4, 4, 4), keypoints, torch.tensor([2]), 32)
    with pytest.raises(MetricError, match="input_size: expected an int or a pair"):
        meter.update(torch.rand(1, 4, 4, 4), keypoints, torch.tensor([0]), (32, 32, 3))
    with pytest.raises(MetricError, match="no images were added"):
        meter.compute()
    with pytest.raises(MetricError, match="noisy_maps: expected the shape of clean_maps"):
        StabilityMeter(2, 3, 2).update(torch.rand(1, 4, 4, 4), torch.rand(1, 4, 2, 2), keypoints, torch.tensor([0]), 32)
    with pytest.raises(MetricError, match=r"labels: expected class indices in \[0, 1\]"):
        StabilityMeter(2, 3, 2).update(torch.rand(1, 4, 4, 4), torch.rand(1, 4, 4, 4), keypoints, torch.tensor([2]), 32)
    with pytest.raises(MetricError, match="StabilityMeter: no images were added"):
        StabilityMeter(2, 3, 2).compute()
