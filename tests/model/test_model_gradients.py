"""Which parameters each part of the IVPT output can train (the stop-gradients of docs/method.md §2-§4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

LABELS = torch.tensor([1, 4])


def _gradients(model, loss) -> dict[str, bool]:
    """Backpropagate ``loss``; map every parameter name to whether it received a non-zero gradient."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


def _weighted(tensors: list[torch.Tensor]) -> torch.Tensor:
    # Maps sum to one over channels, so an unweighted sum would have a zero gradient by construction.
    generator = torch.Generator().manual_seed(0)
    return sum((t * torch.rand(t.shape, generator=generator)).sum() for t in tensors)


@pytest.fixture
def model_and_output(make_model, images):
    model = make_model().train()
    return model, model(images)


def test_classification_loss_reaches_final_stage_tokens_and_prompt_layers(model_and_output):
    model, out = model_and_output
    got = _gradients(model, F.cross_entropy(out.logits, LABELS))
    expected_trained = {
        "backbone.cls_token",
        "backbone.pos_embed",
        "stages.2.prototypes",
        "stages.2.spatial_bias",
        "head.modulation.weight",
        "head.modulation.bias",
        "head.classifier.weight",
    } | {
        f"fusions.{s}.{layer}.{w}"
        for s in (0, 1)
        for layer in ("prompt_norm", "prompt_proj")
        for w in ("weight", "bias")
    }
    assert {n for n, g in got.items() if g} == expected_trained


def test_classification_loss_gives_no_gradient_to_groupings_or_intermediate_prototypes(model_and_output):
    model, out = model_and_output
    F.cross_entropy(out.logits, LABELS).backward()
    for stage in (0, 1):
        assert model.fusions[stage].grouping.weight.grad is None
        assert model.stages[stage].prototypes.grad is None
        assert model.stages[stage].spatial_bias.grad is None


def test_frozen_blocks_receive_no_weight_gradient(model_and_output):
    model, out = model_and_output
    F.cross_entropy(out.logits, LABELS).backward()
    for name, parameter in model.backbone.named_parameters():
        if name not in ("cls_token", "pos_embed"):
            assert not parameter.requires_grad and parameter.grad is None, name


def test_intermediate_maps_train_only_their_own_prototypes(model_and_output):
    model, out = model_and_output
    got = _gradients(model, _weighted(out.concept_maps[:2]))
    assert {n for n, g in got.items() if g} == {
        f"stages.{s}.{p}" for s in (0, 1) for p in ("prototypes", "spatial_bias")
    }


def test_final_maps_do_not_reach_the_tokens(model_and_output):
    model, out = model_and_output
    got = _gradients(model, _weighted(out.concept_maps[2:]))
    assert {n for n, g in got.items() if g} == {"stages.2.prototypes", "stages.2.spatial_bias"}


def test_fused_maps_train_grouping_and_intermediate_prototypes(model_and_output):
    model, out = model_and_output
    got = _gradients(model, _weighted(out.fused_maps))
    assert {n for n, g in got.items() if g} == {
        f"{module}.{s}.{p}"
        for s in (0, 1)
        for module, p in (
            ("stages", "prototypes"),
            ("stages", "spatial_bias"),
            ("fusions", "grouping.weight"),
            ("fusions", "grouping.bias"),
        )
    }


def test_part_features_reach_the_tokens_through_ifa(make_model, images):
    model = make_model(cross_layer=False).train()
    out = model(images)
    got = _gradients(model, _weighted([out.part_features]))
    assert got["backbone.pos_embed"] and got["stages.0.prototypes"] and got["head.modulation.weight"]
    assert not got["head.classifier.weight"]


def test_full_freeze_mode_trains_blocks(make_model, images):
    model = make_model(freeze="full").train()
    got = _gradients(model, F.cross_entropy(model(images).logits, LABELS))
    assert got["backbone.blocks.3.mlp.fc2.weight"] and got["backbone.patch_embed.proj.weight"]
    assert got["backbone.blocks.0.attn.qkv.weight"]
