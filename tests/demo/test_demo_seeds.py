"""The demo's targets over seeds: means and checks on hand-made results."""

from __future__ import annotations

import pytest

from ivpt.demo.seeds import check_targets, format_seeds, mean_rows


def _results(ivpt: tuple, vpt: tuple, oracle_consistency: float, grid_consistency: float) -> dict:
    """results.json rows: (accuracy, consistency, nmi, ari) for IVPT and VPT-Deep."""

    def row(accuracy: float | None, consistency: float | None, nmi=None, ari=None) -> dict:
        return dict(
            accuracy=accuracy, consistency=consistency, stability=None, nmi=nmi, ari=ari, kpr=None, faithfulness=None
        )

    return {
        "ivpt": row(*ivpt),
        "vpt_deep": row(*vpt),
        "linear_probe": row(20.0, None),
        "oracle": row(80.0, oracle_consistency),
        "fixed_parts": row(None, 40.0),
        "fixed_grid": row(None, grid_consistency),
    }


def test_targets_read_the_mean_and_consistency_every_seed() -> None:
    per_seed = {
        42: _results((90.0, 40.0, 62.0, 41.0), (70.0, 10.0), 76.0, 2.0),
        1: _results((84.0, 38.0, 60.0, 40.0), (74.0, 20.0), 74.0, 2.0),
    }
    mean = mean_rows(per_seed)
    assert mean["ivpt"]["accuracy"] == pytest.approx(87.0) and mean["vpt_deep"]["accuracy"] == pytest.approx(72.0)
    assert mean["fixed_parts"]["accuracy"] is None and mean["oracle"]["consistency"] == pytest.approx(75.0)
    held = {target.name: target.holds for target in check_targets(per_seed)}
    assert held == {
        "IVPT top-1 >= 85": True,  # 87 on average although seed 1 gives 84
        "IVPT top-1 >= VPT-Deep + 10": True,  # 87 >= 82
        "IVPT NMI >= 60": True,
        "IVPT ARI >= 40": True,
        "IVPT consistency >= 2 x VPT-Deep's on every seed": False,  # seed 1: 38 < 40
        "IVPT consistency >= half the oracle's": True,  # 39 >= 37.5
        "IVPT consistency above fixed_grid's": True,
    }
    text = format_seeds(per_seed)
    assert "[ ] IVPT consistency >= 2 x VPT-Deep's on every seed: seed 42: 40 vs 10, seed 1: 38 vs 20" in text
    assert text.count("mean  ") == 6  # one mean line per row
