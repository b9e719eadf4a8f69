"""Concept intervention: switching final parts and stage concepts off in the forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ivpt.errors import IVPTError
from ivpt.model import Intervention
from ivpt.model.concepts import PooledRegions, PromptFusion, classify_parts, pool_regions
from ivpt.model.output import IVPTOutput

N_PRO = (6, 5, 4)
NUM_PARTS = N_PRO[-1] - 1


def _tensors(out: IVPTOutput) -> dict[str, torch.Tensor]:
    found = {"logits": out.logits, "part_logits": out.part_logits, "part_features": out.part_features}
    for name in ("concept_maps", "groupings", "fused_maps", "region_features", "prompts"):
        for i, value in enumerate(getattr(out, name)):
            found[f"{name}[{i}]"] = value
    return found


@pytest.mark.parametrize("options", [{}, {"fusion": False}, {"fusion_target": "chain"}, {"pooling": "soft"}])
def test_disabling_nothing_changes_nothing_bit_for_bit(make_model, images, options):
    model = make_model(**options).eval()
    with torch.no_grad():
        plain = _tensors(model(images))
        for intervention in (Intervention(), Intervention.from_disable({"parts": [], "stage1": []}, N_PRO)):
            assert intervention.is_empty
            intervened = _tensors(model(images, intervention=intervention))
            assert plain.keys() == intervened.keys()
            for name, value in plain.items():
                assert torch.equal(value, intervened[name]), name


@pytest.mark.parametrize("disabled", [[0], [2], [0, 2], [0, 1, 2]])
def test_disabling_parts_lowers_every_logit_by_exactly_their_share(make_model, images, disabled):
    model = make_model().eval()
    with torch.no_grad():
        before = model(images)
        after = model(images, intervention=Intervention.from_disable({"parts": disabled}, N_PRO))
    shares = before.part_logits / NUM_PARTS  # (B, N, C): what each part adds to each class logit
    expected = before.logits.double() - shares[:, disabled].double().sum(dim=1)
    torch.testing.assert_close(after.logits.double(), expected, rtol=0.0, atol=1e-6)
    # Only the logits move: the parts' own scores and every map are those of the plain forward.
    assert torch.equal(after.part_logits, before.part_logits)
    for stage in range(len(N_PRO)):
        assert torch.equal(after.concept_maps[stage], before.concept_maps[stage])


def test_part_intervention_works_on_a_part_head_baseline(make_model, images):
    model = make_model(method="last_layer_proto").eval()
    with torch.no_grad():
        before = model(images)
        after = model(images, intervention=Intervention(parts=frozenset({1})))
    num_parts = before.part_logits.shape[1]
    torch.testing.assert_close(after.logits, before.logits - before.part_logits[:, 1] / num_parts, rtol=0, atol=1e-6)


def test_a_cls_head_has_nothing_to_disable(make_model, images):
    model = make_model(method="vpt_deep").eval()
    with pytest.raises(IVPTError, match="no concepts or parts"):
        model(images, intervention=Intervention(parts=frozenset({0})))


def _all_concepts(n_pro: tuple[int, ...], stages: list[int]) -> Intervention:
    return Intervention.from_disable({f"stage{s + 1}": range(n_pro[s] - 1) for s in stages}, n_pro)


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg"])
def test_disabling_every_concept_of_every_stage_runs_the_stock_backbone(make_model, make_images, kind):
    """No prompt left anywhere: timm's own forward_features is the reference."""
    model = make_model(kind).eval()
    images = make_images(kind)
    with torch.no_grad():
        out = model(images, intervention=_all_concepts(N_PRO, [0, 1]))
        reference = model.backbone.forward_features(images)
    assert [tuple(p.shape) for p in out.prompts] == [(2, 0, 32), (2, 0, 32)]
    torch.testing.assert_close(out.cls_feature, reference[:, 0])
    patches = reference[:, model.num_prefix_tokens :]
    maps, regions, parts = classify_parts(model.stages[-1], model.head, patches, hard=True)
    torch.testing.assert_close(out.concept_maps[-1], maps)
    torch.testing.assert_close(out.logits, parts.logits)


@pytest.mark.parametrize("options", [{}, {"fusion": False}])
@pytest.mark.parametrize("off_stage", [0, 1])
def test_disabling_every_concept_of_a_stage_runs_its_block_without_prompts(make_model, images, options, off_stage):
    """A hand-written forward in which the block of ``off_stage`` gets no prompts, the other blocks theirs."""
    model = make_model(**options).eval()
    with torch.no_grad():
        out = model(images, intervention=_all_concepts(N_PRO, [off_stage]))

        tokens = model.embed(images)
        for index in range(model.first_prompted_block):
            tokens = model.backbone.blocks[index](tokens)
        for stage in range(len(N_PRO) - 1):
            block = model.backbone.blocks[model.first_prompted_block + stage]
            features = model.backbone.norm(model.patch_tokens(tokens))
            maps = model.stages[stage](features)
            torch.testing.assert_close(out.concept_maps[stage], maps)
            if stage == off_stage:
                tokens = block(tokens)
            else:
                prompts = model.fusions[stage](maps, pool_regions(maps, features)).prompts
                tokens = block(torch.cat([tokens, prompts], dim=1))[:, : tokens.shape[1]]
        features = model.backbone.norm(tokens)
        maps, _, parts = classify_parts(model.stages[-1], model.head, model.patch_tokens(features), hard=True)
    assert out.prompts[off_stage].shape[1] == 0
    torch.testing.assert_close(out.concept_maps[-1], maps)
    torch.testing.assert_close(out.logits, parts.logits)
    torch.testing.assert_close(out.cls_feature, features[:, 0])


def _fusion_case(grouping: bool) -> tuple[PromptFusion, torch.Tensor, PooledRegions]:
    """A fusion of 5 concepts into 3 targets (width 8) and its inputs: ``(B=2, 6, 3, 3)`` maps, regions."""
    torch.manual_seed(0)
    fusion = PromptFusion(num_concepts=5, num_targets=3, embed_dim=8, grouping=grouping).eval()
    with torch.no_grad():  # non-trivial affine parameters, so that row selection would show
        fusion.prompt_norm.weight.normal_()
        fusion.prompt_norm.bias.normal_()
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 6, 3, 3, generator=generator).softmax(dim=1)
    features = torch.randn(2, 6, 8, generator=generator)
    return fusion, maps, PooledRegions(features, torch.ones(2, 6))


def test_a_disabled_concept_leaves_the_grouped_prompts():
    fusion, maps, regions = _fusion_case(grouping=True)
    disabled = torch.tensor([False, True, False, False, True])
    with torch.no_grad():
        out = fusion(maps, regions, disabled)
        # By hand, in float64: the grouping-weighted mean of the enabled concepts' features only.
        grouping = fusion.group(regions.features[:, :-1], regions.mass[:, :-1]).double()
        features = regions.features[:, :-1].double()
        targets = torch.zeros(2, 3, 8, dtype=torch.float64)
        for b in range(2):
            for n in range(3):
                enabled = [k for k in range(5) if not disabled[k]]
                weights = grouping[b, enabled, n]
                targets[b, n] = (weights[:, None] * features[b, enabled]).sum(0) / weights.sum()
        expected = fusion.prompt_proj(fusion.prompt_norm(targets.float()))
        torch.testing.assert_close(out.prompts, expected)
        # The disabled concepts' features have no say at all in the prompts.
        changed = regions.features.clone()
        changed[:, [1, 4]] = torch.randn(2, 2, 8) * 10
        again = fusion(maps, PooledRegions(changed, regions.mass), disabled)
    torch.testing.assert_close(again.prompts, out.prompts)
    assert torch.equal(out.grouping, fusion(maps, regions).grouping)  # the stage's grouping is reported whole


def test_without_grouping_a_disabled_concept_loses_its_prompt():
    fusion, maps, regions = _fusion_case(grouping=False)
    disabled = torch.tensor([False, False, True, False, False])
    with torch.no_grad():
        out = fusion(maps, regions, disabled)
        rows = regions.features[:, [0, 1, 3, 4]].double()
        mean = rows.mean(dim=(1, 2), keepdim=True)
        variance = rows.var(dim=(1, 2), keepdim=True, unbiased=False)
        normed = (rows - mean) / torch.sqrt(variance + fusion.prompt_norm.eps)
        affine = normed * fusion.prompt_norm.weight[[0, 1, 3, 4]].double() + fusion.prompt_norm.bias[[0, 1, 3, 4]]
        expected = F.linear(affine.float(), fusion.prompt_proj.weight, fusion.prompt_proj.bias)
    assert out.prompts.shape == (2, 4, 8)
    torch.testing.assert_close(out.prompts, expected)


@pytest.mark.parametrize(
    ("disable", "message"),
    [
        ({"parts": [3]}, r"parts \[3\] do not exist.*part 3 is the background"),
        ({"parts": [-1]}, r"parts \[-1\] do not exist"),
        ({"stage1": [5]}, r"stage1 concepts \[5\] do not exist.*concept 5 is the background"),
        ({"stage2": [0, 9]}, r"stage2 concepts \[9\] do not exist; it has concepts 0..3"),
        ({"stage3": [0]}, "'stage3' is the final stage; its concepts are the parts: use 'parts'"),
        ({"stage4": [0]}, "stage4 is not an intermediate stage; this model has stage1..stage2"),
        ({"stage0": [0]}, "stage0 is not an intermediate stage"),
        ({"layer1": [0]}, "unknown key 'layer1'; expected 'parts' or 'stage<s>' with s = 1..2"),
        ({"parts": 2}, "'parts' must map to a list of integer indices, got 2"),
        ({"parts": [1.5]}, "'parts' holds 1.5; indices must be integers"),
        ({"parts": [True]}, "'parts' holds True"),
    ],
)
def test_bad_disable_requests_name_what_is_wrong(disable, message):
    with pytest.raises(IVPTError, match=message):
        Intervention.from_disable(disable, N_PRO)


def test_the_user_form_round_trips():
    intervention = Intervention.from_disable({"stage2": (3, 1), "parts": [2, 0, 2], "stage1": []}, N_PRO)
    assert intervention.parts == {0, 2} and dict(intervention.stage_concepts) == {1: {1, 3}}
    assert intervention.to_disable() == {"parts": [0, 2], "stage2": [1, 3]}
    assert Intervention.from_disable(intervention.to_disable(), N_PRO) == intervention
    assert intervention.kept_parts(3, "cpu").tolist() == [False, True, False]
    assert intervention.disabled_concepts(1, 4, "cpu").tolist() == [False, True, False, True]
    assert intervention.disabled_concepts(0, 5, "cpu") is None
