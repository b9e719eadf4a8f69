"""IVPTCriterion: term selection, weighting, applicability, precision and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ivpt.config import LossConfig
from ivpt.errors import ConfigError
from ivpt.losses import (
    TERM_NAMES,
    IVPTCriterion,
    affine_matrix,
    background_presence_loss,
    classification_loss,
    consistency_loss,
    entropy_loss,
    equivariance_loss,
    orthogonality_loss,
    presence_loss,
    sample_affine,
    total_variation_loss,
    warp_images,
)
from ivpt.losses import terms as terms_module
from ivpt.model.output import IVPTOutput

BATCH, CLASSES, DIM, GRID = 2, 6, 8, 6
N_PRO = (5, 4, 3)  # three stages, N = 2 final foreground parts


def _softmax(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.softmax(2.0 * torch.randn(*shape, generator=generator), dim=1)


def _output(seed: int = 0, requires_grad: bool = False) -> IVPTOutput:
    """A hand-made IVPT output: three stages on a 6x6 grid, two fused into the last ('final' mode)."""
    generator = torch.Generator().manual_seed(seed)
    concept_maps = [_softmax(BATCH, k, GRID, GRID, generator=generator) for k in N_PRO]
    fused_maps = [_softmax(BATCH, N_PRO[-1], GRID, GRID, generator=generator) for _ in N_PRO[:-1]]
    output = IVPTOutput(
        logits=torch.randn(BATCH, CLASSES, generator=generator),
        concept_maps=concept_maps,
        fused_maps=fused_maps,
        fusion_targets=[len(N_PRO) - 1] * (len(N_PRO) - 1),
        part_features=torch.randn(BATCH, DIM, N_PRO[-1], generator=generator),
    )
    if requires_grad:
        output.logits.requires_grad_()
        output.part_features.requires_grad_()
        for tensor in [*output.concept_maps, *output.fused_maps]:
            tensor.requires_grad_()
    return output


def _transformed(output: IVPTOutput, theta: torch.Tensor) -> IVPTOutput:
    """The output a perfectly equivariant model would give on the transformed batch."""
    return dataclasses.replace(output, concept_maps=[warp_images(m.detach(), theta) for m in output.concept_maps])


LABELS = torch.tensor([1, 4])
THETA = affine_matrix(torch.tensor(0.7), torch.tensor([0.1, -0.05]), torch.tensor(1.2))


def _expected_terms(output: IVPTOutput, transformed: IVPTOutput) -> dict[str, torch.Tensor]:
    maps = output.concept_maps
    return {
        "classification": classification_loss(output.logits, LABELS),
        "consistency": consistency_loss(output.fused_maps, [maps[-1]] * len(output.fused_maps)),
        "presence": torch.stack([presence_loss(m) for m in maps]).mean(),
        "bg_presence": torch.stack([background_presence_loss(m) for m in maps]).mean(),
        "equivariance": torch.stack(
            [equivariance_loss(m, t, THETA) for m, t in zip(maps, transformed.concept_maps, strict=True)]
        ).mean(),
        "orthogonality": orthogonality_loss(output.part_features),
        "total_variation": torch.stack([total_variation_loss(m) for m in maps]).mean(),
        "entropy": torch.stack([entropy_loss(m) for m in maps]).mean(),
    }


def test_returns_every_term_unweighted_and_the_weighted_total() -> None:
    weights = dict(zip(TERM_NAMES, (1.0, 0.5, 2.0, 0.25, 3.0, 1.5, 0.1, 0.7), strict=True))
    criterion = IVPTCriterion(LossConfig(**weights))
    output = _output()
    # A non-equivariant second view, so that every term is clearly non-zero.
    transformed = _output(seed=1)
    result = criterion(output, LABELS, transformed=transformed, affine=THETA)

    assert list(result) == [*TERM_NAMES, "total"]
    expected = _expected_terms(output, transformed)
    for name in TERM_NAMES:
        assert result[name].dtype == torch.float32 and result[name].shape == ()
        assert result[name] > 1e-3, name
        torch.testing.assert_close(result[name], expected[name], msg=name)
    weighted = sum(weights[name] * expected[name] for name in TERM_NAMES)
    torch.testing.assert_close(result["total"], weighted)


def test_a_zero_weight_skips_its_term(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a term with weight 0 was computed")

    for name in ("presence_loss", "equivariance_loss", "consistency_loss", "orthogonality_loss"):
        monkeypatch.setattr(terms_module, name, must_not_run)
    criterion = IVPTCriterion(LossConfig(presence=0.0, equivariance=0.0, consistency=0.0, orthogonality=0.0))
    output = _output()
    result = criterion(output, LABELS, transformed=_transformed(output, THETA), affine=THETA)
    for name in ("presence", "equivariance", "consistency", "orthogonality"):
        assert result[name] == 0
    on = ("classification", "bg_presence", "total_variation", "entropy")
    torch.testing.assert_close(result["total"], sum(result[name] for name in on))


def test_the_criterion_calls_the_patched_term_when_its_weight_is_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards the test above: the patch point is the one the criterion really uses.
    monkeypatch.setattr(terms_module, "presence_loss", lambda maps: torch.tensor(42.0))
    result = IVPTCriterion(LossConfig())(_output(), LABELS)
    assert result["presence"] == 42.0


def test_a_baseline_output_gets_only_the_classification_term() -> None:
    output = IVPTOutput(logits=torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(0)))
    result = IVPTCriterion(LossConfig())(output, LABELS)
    torch.testing.assert_close(result["classification"], classification_loss(output.logits, LABELS))
    torch.testing.assert_close(result["total"], result["classification"])
    assert all(result[name] == 0 for name in TERM_NAMES if name != "classification")


def test_terms_the_output_cannot_support_are_zero() -> None:
    output = dataclasses.replace(_output(), fused_maps=[], fusion_targets=[], part_features=None)
    result = IVPTCriterion(LossConfig())(output, LABELS)  # no transformed batch either
    for name in ("consistency", "equivariance", "orthogonality"):
        assert result[name] == 0, name
    for name in ("classification", "presence", "bg_presence", "total_variation", "entropy"):
        assert result[name] > 0, name


def test_equivariance_of_an_equivariant_output_is_near_zero() -> None:
    # Smooth maps on a 16x16 grid (bilinear resampling of rough random 6x6 maps is far from exact).
    generator = torch.Generator().manual_seed(0)
    coarse_logits = [3.0 * torch.randn(BATCH, k, 3, 3, generator=generator) for k in N_PRO]
    smooth = [torch.softmax(F.interpolate(x, size=16, mode="bicubic"), dim=1) for x in coarse_logits]
    output = dataclasses.replace(_output(), concept_maps=smooth, fused_maps=[], fusion_targets=[])
    theta = sample_affine(torch.Generator().manual_seed(0))
    criterion = IVPTCriterion(LossConfig())
    result = criterion(output, LABELS, transformed=_transformed(output, theta), affine=theta)
    assert result["equivariance"] < 0.01
    ignores_transform = criterion(output, LABELS, transformed=output, affine=theta)
    assert ignores_transform["equivariance"] > 0.1


def test_chain_fusion_compares_each_fused_stage_with_its_own_target() -> None:
    generator = torch.Generator().manual_seed(3)
    output = _output()
    # Chain mode: stage 0 (5 prototypes) groups into stage 1's 4, stage 1 into stage 2's 3.
    output.fused_maps = [
        _softmax(BATCH, 4, GRID, GRID, generator=generator),
        _softmax(BATCH, 3, GRID, GRID, generator=generator),
    ]
    output.fusion_targets = [1, 2]
    result = IVPTCriterion(LossConfig())(output, LABELS)
    expected = (
        consistency_loss(output.fused_maps[0], output.concept_maps[1])
        + consistency_loss(output.fused_maps[1], output.concept_maps[2])
    ) / 2
    torch.testing.assert_close(result["consistency"], expected)


def test_bad_inputs_are_reported() -> None:
    output = _output()
    with pytest.raises(ValueError, match="'transformed' was given without the 'affine'"):
        IVPTCriterion(LossConfig())(output, LABELS, transformed=output)
    output.fusion_targets = [2]
    with pytest.raises(ValueError, match="2 fused maps but 1 fusion targets"):
        IVPTCriterion(LossConfig())(output, LABELS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"presence": -1.0}, r"config key 'loss.presence': expected a finite weight >= 0, got -1.0"),
        ({"entropy": float("nan")}, r"config key 'loss.entropy': expected a finite weight >= 0, got nan"),
        ({"label_smoothing": 1.0}, r"config key 'loss.label_smoothing': expected a value in \[0, 1\), got 1.0"),
    ],
)
def test_invalid_weights_raise_config_errors(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IVPTCriterion(LossConfig(**overrides))


def test_label_smoothing_reaches_the_classification_term() -> None:
    output = _output()
    result = IVPTCriterion(LossConfig(label_smoothing=0.2))(output, LABELS)
    torch.testing.assert_close(result["classification"], classification_loss(output.logits, LABELS, 0.2))


def _to_bf16(output: IVPTOutput) -> IVPTOutput:
    return dataclasses.replace(
        output,
        logits=output.logits.bfloat16(),
        concept_maps=[m.bfloat16() for m in output.concept_maps],
        fused_maps=[m.bfloat16() for m in output.fused_maps],
        part_features=output.part_features.bfloat16(),
    )


def test_every_term_is_fp32_under_bf16_autocast_and_matches_fp32() -> None:
    criterion = IVPTCriterion(LossConfig())
    output, transformed = _output(), _output(seed=1)
    reference = criterion(output, LABELS, transformed=transformed, affine=THETA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_inputs = criterion(output, LABELS, transformed=transformed, affine=THETA)
        low = criterion(_to_bf16(output), LABELS, transformed=_to_bf16(transformed), affine=THETA.bfloat16())
    for name in [*TERM_NAMES, "total"]:
        assert low[name].dtype == torch.float32 and torch.isfinite(low[name]), name
        torch.testing.assert_close(same_inputs[name], reference[name], msg=name)
        torch.testing.assert_close(low[name], reference[name], atol=5e-2, rtol=3e-2, msg=name)


def test_gradients_reach_the_maps_and_features_but_not_through_the_consistency_target() -> None:
    output = _output(requires_grad=True)
    IVPTCriterion(LossConfig())(output, LABELS)["total"].backward()
    for tensor in [output.logits, output.part_features, *output.concept_maps, *output.fused_maps]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0

    # The final stage is the consistency target: with only that term on, it receives nothing.
    only_consistency = {name: 0.0 for name in TERM_NAMES} | {"consistency": 1.0}
    output = _output(requires_grad=True)
    IVPTCriterion(LossConfig(**only_consistency))(output, LABELS)["total"].backward()
    assert output.concept_maps[-1].grad is None
    assert all(m.grad.abs().sum() > 0 for m in output.fused_maps)
