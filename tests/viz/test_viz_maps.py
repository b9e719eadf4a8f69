"""Pure map/score functions of ivpt.viz on hand-made inputs with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ivpt.errors import IVPTError
from ivpt.viz.maps import MIN_OPACITY_SHARE, FlowEdge, grouping_flow, overlay_maps, part_contributions, region_areas
from ivpt.viz.palette import BACKGROUND_RGB, concept_palette, to_hex


def _halves_maps() -> torch.Tensor:
    """3 concepts on a 4x4 grid: concept 0 owns the left half, concept 1 the top right, bg the rest."""
    maps = torch.zeros(3, 4, 4)
    maps[0, :, :2] = 1.0
    maps[1, :2, 2:] = 1.0
    maps[2, 2:, 2:] = 1.0
    return maps


def test_palette_is_deterministic_and_background_grey() -> None:
    first = concept_palette([17, 14, 11, 8, 5])
    second = concept_palette((17, 14, 11, 8, 5))
    assert [p.shape for p in first] == [(17, 3), (14, 3), (11, 3), (8, 3), (5, 3)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a[-1], BACKGROUND_RGB)
        assert a.min() >= 0.0 and a.max() <= 1.0


@pytest.mark.parametrize("count", [2, 5, 9, 10, 17, 21])
def test_palette_colours_are_distinct_within_a_stage(count: int) -> None:
    colours = concept_palette([count])[0]
    closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2))
    assert closest > 0.12


def test_palette_does_not_depend_on_later_stages() -> None:
    np.testing.assert_array_equal(concept_palette([8, 5])[0], concept_palette([8, 7, 6, 5])[0])
    assert not np.allclose(concept_palette([5, 5])[0][:-1], concept_palette([5, 5])[1][:-1])


def test_palette_rejects_stage_without_foreground() -> None:
    with pytest.raises(IVPTError, match="stage 1 has 1 prototypes"):
        concept_palette([5, 1])


def test_to_hex() -> None:
    assert to_hex((1.0, 0.0, 0.5)) == "#ff0080"
    assert to_hex(np.array([0.0, 1.2, -0.1])) == "#00ff00"


def _stripe_maps() -> torch.Tensor:
    """3 concepts on a 4x4 grid in vertical stripes: concept 0 columns 0-1, concept 1 column 2, bg column 3."""
    maps = torch.zeros(3, 4, 4)
    maps[0, :, :2] = 1.0
    maps[1, :, 2] = 1.0
    maps[2, :, 3] = 1.0
    return maps


def test_overlay_colours_each_argmax_region_with_its_concept_colour() -> None:
    palette = concept_palette([3])[0]
    image = np.full((32, 32, 3), 40, dtype=np.uint8)
    out = overlay_maps(image, _stripe_maps(), palette, alpha=1.0)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # away from the stripe borders the maps are certain: pure concept colours, background untouched
    assert (out[:, :12] == np.rint(palette[0] * 255).astype(np.uint8)).all()
    assert (out[:, 28:] == 40).all()
    # pixel column 15 sits at grid x = 1.4375: 56.25 % concept 0, so it shows concept 0's colour at the
    # opacity of that confidence; column 20 (grid x = 2.0625) is 93.75 % concept 1
    for column, concept, confidence in [(15, 0, 0.5625), (20, 1, 0.9375)]:
        opacity = MIN_OPACITY_SHARE + (1 - MIN_OPACITY_SHARE) * confidence
        expected = (1 - opacity) * 40 + opacity * palette[concept] * 255
        assert np.abs(out[:, column] - expected).max() <= 0.5 + 1e-3


def test_overlay_blends_with_confidence() -> None:
    palette = concept_palette([3])[0]
    maps = torch.tensor([0.5, 0.3, 0.2]).view(3, 1, 1).expand(3, 2, 2)
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    out = overlay_maps(image, maps, palette, alpha=0.8)
    expected = 0.8 * (MIN_OPACITY_SHARE + (1 - MIN_OPACITY_SHARE) * 0.5) * palette[0] * 255
    assert np.abs(out - expected).max() <= 0.5 + 1e-3


def test_overlay_rejects_mismatched_palette() -> None:
    with pytest.raises(IVPTError, match=r"palette has shape \(5, 3\), expected \(3, 3\)"):
        overlay_maps(np.zeros((8, 8, 3), np.uint8), _halves_maps(), concept_palette([5])[0])


def test_region_areas_on_grid_and_upsampled() -> None:
    np.testing.assert_allclose(region_areas(_halves_maps()), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(region_areas(_stripe_maps().numpy(), size=(40, 40)), [0.5, 0.25, 0.25])


def test_part_contributions_add_up_to_the_logit() -> None:
    generator = torch.Generator().manual_seed(0)
    part_logits = torch.randn(4, 7, generator=generator)
    logits = part_logits.mean(dim=0)
    for class_index in range(7):
        shares = part_contributions(part_logits, class_index)
        assert shares.shape == (4,)
        assert shares.sum() == pytest.approx(float(logits[class_index]), abs=1e-6)
        np.testing.assert_allclose(shares, part_logits[:, class_index].double().numpy() / 4)


def test_part_contributions_rejects_bad_class() -> None:
    with pytest.raises(IVPTError, match=r"class index 7 is outside 0..6"):
        part_contributions(np.zeros((4, 7)), 7)


def test_grouping_flow_final_mode_points_every_stage_at_the_last() -> None:
    g0 = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    g1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    edges = grouping_flow([g0, g1])
    assert len(edges) == 3 * 2 + 2 * 2
    assert {e.target_stage for e in edges} == {2}
    assert edges[0] == FlowEdge(0, 0, 2, 0, pytest.approx(0.9))
    light = grouping_flow([g0, g1], min_weight=0.3)
    assert [(e.source_stage, e.source_concept, e.target_concept) for e in light] == [
        (0, 0, 0),
        (0, 1, 1),
        (0, 2, 0),
        (0, 2, 1),
        (1, 0, 0),
        (1, 1, 1),
    ]


def test_grouping_flow_chain_mode_and_validation() -> None:
    edges = grouping_flow([np.full((4, 3), 1 / 3), np.full((3, 2), 0.5)], targets=[1, 2])
    assert {(e.source_stage, e.target_stage) for e in edges} == {(0, 1), (1, 2)}
    with pytest.raises(IVPTError, match="2 groupings but 1 target stages"):
        grouping_flow([np.ones((2, 2)), np.ones((2, 2))], targets=[2])
    with pytest.raises(IVPTError, match="stage 1 groups into stage 1"):
        grouping_flow([np.ones((2, 2)), np.ones((2, 2))], targets=[1, 1])
