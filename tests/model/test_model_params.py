"""Optimizer parameter groups and parameter counts."""

from __future__ import annotations

import pytest
import torch

from ivpt.config import OptimConfig
from ivpt.errors import ConfigError
from ivpt.model import param_groups, parameter_counts

OPTIM = OptimConfig(lr_head=1e-2, lr_prototypes=2e-4, lr_tokens=3e-4, lr_backbone=1e-5)
LRS = {"head": 1e-2, "prototypes": 2e-4, "vpt_prompts": 2e-4, "tokens": 3e-4, "backbone": 1e-5}


def _names_by_group(model, groups) -> dict[str, set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}


@pytest.mark.parametrize("method", ["ivpt", "last_layer_proto", "vpt_shallow", "vpt_deep", "vpt_deep_proto"])
@pytest.mark.parametrize("freeze", ["tokens", "frozen", "full"])
def test_every_trainable_parameter_is_in_exactly_one_group(make_model, method, freeze):
    model = make_model(method=method, freeze=freeze)
    groups = param_groups(model, OPTIM, freeze)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    for group in groups:
        assert group["lr"] == LRS[group["name"]] and group["params"]
    names = {g["name"] for g in groups}
    assert ("tokens" in names) == (freeze != "frozen")
    assert ("backbone" in names) == (freeze == "full")
    assert ("vpt_prompts" in names) == method.startswith("vpt")


def test_ivpt_groups_follow_the_official_recipe(make_model):
    model = make_model()
    by_group = _names_by_group(model, param_groups(model, OPTIM, "tokens"))
    assert by_group["tokens"] == {"backbone.cls_token", "backbone.pos_embed"}
    assert by_group["prototypes"] == {f"stages.{s}.{p}" for s in range(3) for p in ("prototypes", "spatial_bias")}
    assert by_group["head"] == {
        "head.modulation.weight",
        "head.modulation.bias",
        "head.classifier.weight",
        *(
            f"fusions.{s}.{m}.{w}"
            for s in (0, 1)
            for m in ("grouping", "prompt_norm", "prompt_proj")
            for w in ("weight", "bias")
        ),
    }
    assert set(by_group) == {"head", "prototypes", "tokens"}


def test_register_and_distillation_tokens_use_the_token_rate(make_model):
    dino = make_model("dinov2_reg")
    deit = make_model("deit_distilled")
    assert "backbone.reg_token" in _names_by_group(dino, param_groups(dino, OPTIM, "tokens"))["tokens"]
    assert "backbone.dist_token" in _names_by_group(deit, param_groups(deit, OPTIM, "tokens"))["tokens"]


def test_linear_probe_trains_only_its_classifier(make_model):
    model = make_model(method="linear_probe")
    groups = param_groups(model, OPTIM, "tokens")
    assert _names_by_group(model, groups) == {"head": {"classifier.weight", "classifier.bias"}}


def test_freeze_mismatch_is_reported(make_model):
    model = make_model(freeze="full")
    with pytest.raises(ConfigError, match="'model.freeze' is 'tokens', but the model trains .* 'backbone' parameters"):
        param_groups(model, OPTIM, "tokens")


def test_groups_drive_an_optimizer(make_model, images):
    model = make_model()
    optimizer = torch.optim.Adam(param_groups(model, OPTIM, "tokens"))
    assert [g["name"] for g in optimizer.param_groups] == ["head", "prototypes", "tokens"]


def test_parameter_counts_add_up(make_model):
    model = make_model()
    counts = parameter_counts(model)
    dim, grid = 32, 16
    assert counts["prototypes"] == (6 + 5 + 4) * (dim + grid)
    assert counts["tokens"] == dim + (grid + 1) * dim
    # per fusion: grouping D->3, LayerNorm (3, D), Linear D->D; head: LayerNorm (D, 4) and Linear D->7
    fusion = (dim * 3 + 3) + 2 * 3 * dim + (dim * dim + dim)
    assert counts["head"] == 2 * fusion + 2 * dim * 4 + dim * 7
    assert counts["backbone"] == counts["vpt_prompts"] == 0
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["trainable"] + counts["frozen"] == counts["total"] == sum(p.numel() for p in model.parameters())
