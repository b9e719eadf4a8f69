"""The baselines: output contract, prompt placement, and one training step each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ivpt.config import OptimConfig
from ivpt.errors import ConfigError
from ivpt.model import param_groups

METHODS = ["vpt_shallow", "vpt_deep", "vpt_deep_proto", "last_layer_proto", "linear_probe"]
WITH_PARTS = {"vpt_deep_proto", "last_layer_proto"}


@pytest.mark.parametrize("method", METHODS)
def test_one_cross_entropy_step_changes_exactly_the_trainable_weights(make_model, images, method):
    model = make_model(method=method, vpt_prompts=3).train()
    assert model.method == method
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(param_groups(model, OptimConfig(), "tokens"))

    out = model(images)
    assert out.logits.shape == (2, 7)
    F.cross_entropy(out.logits, torch.tensor([0, 6])).backward()
    optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert {n for n in trainable if "classifier" in n} <= changed
    if method in WITH_PARTS:
        assert {"stages.0.prototypes", "stages.0.spatial_bias", "head.modulation.weight"} <= changed
    if method.startswith("vpt"):
        assert "prompt_tokens" in changed
    if method != "linear_probe":
        assert "backbone.pos_embed" in changed


@pytest.mark.parametrize("method", METHODS)
def test_prototype_fields_are_filled_only_for_methods_with_parts(make_model, images, method):
    model = make_model(method=method, vpt_prompts=3).eval()
    with torch.no_grad():
        out = model(images)
    assert out.cls_feature.shape == (2, 32)
    assert out.prompts == [] and out.groupings == [] and out.fused_maps == [] and out.fusion_targets == []
    if method in WITH_PARTS:
        assert model.n_pro == (4,)
        assert [tuple(m.shape) for m in out.concept_maps] == [(2, 4, 4, 4)]
        torch.testing.assert_close(out.concept_maps[0].sum(1), torch.ones(2, 4, 4))
        assert out.part_logits.shape == (2, 3, 7) and out.part_features.shape == (2, 32, 4)
        assert [tuple(r.shape) for r in out.region_features] == [(2, 4, 32)]
    else:
        assert model.n_pro == ()
        assert out.part_logits is None and out.part_features is None
        assert out.region_features == []
        # VPT reports its prompts' attention as maps in eval mode (test_model_vpt_maps.py); the probe has none.
        expected_maps = [(2, 4, 4, 4)] if method.startswith("vpt") else []
        assert [tuple(m.shape) for m in out.concept_maps] == expected_maps


def _sequence_lengths(model, images) -> list[int]:
    lengths: list[int] = []
    hooks = [
        b.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1])) for b in model.backbone.blocks
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return lengths


def test_vpt_shallow_inserts_prompts_once_and_deep_replaces_them_per_block(make_model, images):
    shallow = make_model(method="vpt_shallow", vpt_prompts=3)
    deep = make_model(method="vpt_deep", vpt_prompts=3)
    assert shallow.prompt_tokens.shape == (1, 3, 32)
    assert deep.prompt_tokens.shape == (4, 3, 32)
    # 1 CLS + 3 prompts + 16 patches at every block: shallow keeps its prompts, deep swaps them.
    assert _sequence_lengths(shallow, images) == [20] * 4
    assert _sequence_lengths(deep, images) == [20] * 4


def test_vpt_deep_uses_each_blocks_own_prompts(make_model, images):
    model = make_model(method="vpt_deep", vpt_prompts=3).eval()
    seen: list[torch.Tensor] = []
    hook = model.backbone.blocks[2].register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, 1:4].clone()))
    with torch.no_grad():
        model(images)
    hook.remove()
    torch.testing.assert_close(seen[0], model.prompt_tokens[2].expand(2, -1, -1))


def test_linear_probe_is_a_linear_layer_on_the_stock_cls_token(make_model, images):
    model = make_model(method="linear_probe", freeze="full").eval()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    with torch.no_grad():
        out = model(images)
        expected = model.classifier(model.backbone.forward_features(images)[:, 0])
    torch.testing.assert_close(out.logits, expected)


def test_prompts_change_the_cls_feature(make_model, images):
    probe = make_model(method="linear_probe").eval()
    shallow = make_model(method="vpt_shallow", vpt_prompts=3).eval()
    with torch.no_grad():
        assert not torch.allclose(probe(images).cls_feature, shallow(images).cls_feature, atol=1e-4)


def test_zero_prompts_reduce_vpt_to_the_stock_backbone(make_model, images):
    model = make_model(method="vpt_deep", vpt_prompts=0).eval()
    assert model.prompt_tokens is None
    with torch.no_grad():
        torch.testing.assert_close(model(images).cls_feature, model.backbone.forward_features(images)[:, 0])


def test_cached_linear_probe_runs_the_backbone_once_per_distinct_image(make_model):
    plain = make_model(method="linear_probe").eval()
    cached = make_model(method="linear_probe", cache_features=True).eval()
    cached.load_state_dict(plain.state_dict())
    assert "feature_cache" not in " ".join(cached.state_dict())
    calls: list[int] = []
    cached.backbone.patch_embed.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    first = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    second = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # The same image twice in a batch is computed once.
    batch = torch.cat([first, first[:1]])
    out = cached(batch)
    torch.testing.assert_close(out.logits, plain(batch).logits, rtol=1e-5, atol=1e-5)
    assert calls == [3] and out.concept_maps == []
    # Seen images are read from the cache; only the new one runs.
    mixed = torch.cat([first[1:], second])
    torch.testing.assert_close(cached(mixed).logits, plain(mixed).logits, rtol=1e-5, atol=1e-5)
    assert calls == [3, 1] and len(cached.feature_cache) == 4
    # A changed pixel is a new image.
    changed = first[:1].clone()
    changed[0, 0, 0, 0] += 1e-3
    cached(changed)
    assert calls == [3, 1, 1]


def test_cached_linear_probe_trains_its_head_like_the_plain_one(make_model, images):
    plain = make_model(method="linear_probe").train()
    cached = make_model(method="linear_probe", cache_features=True).train()
    cached.load_state_dict(plain.state_dict())
    labels = torch.tensor([0, 6])
    for model in (plain, cached):
        for _ in range(2):  # the second step reads the cache
            model.zero_grad()
            F.cross_entropy(model(images).logits, labels).backward()
    torch.testing.assert_close(cached.classifier.weight.grad, plain.classifier.weight.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for n, p in cached.named_parameters() if not n.startswith("classifier"))


def test_feature_cache_is_only_for_the_linear_probe(make_model):
    with pytest.raises(ConfigError, match="model.cache_features': only a linear_probe can cache features"):
        make_model(method="vpt_deep", cache_features=True)
    with pytest.raises(ConfigError, match="model.cache_features': only a linear_probe can cache features"):
        make_model(method="ivpt", cache_features=True)
