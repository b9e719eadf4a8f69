"""The IVPT model: output contract on several timm ViTs, switches, determinism, user errors."""

from __future__ import annotations

import pytest
import torch

from ivpt.config import Config
from ivpt.errors import ConfigError, IVPTError
from ivpt.model import build_model, create_model

NUM_CLASSES = 7


@pytest.mark.parametrize(
    ("kind", "grid", "prefix"),
    [("vit", (4, 4), 1), ("dinov2_reg", (4, 4), 5), ("deit_distilled", (4, 4), 2), ("non_square", (4, 6), 1)],
)
def test_output_shapes_and_map_invariants(make_model, make_images, kind, grid, prefix):
    model = make_model(kind).eval()
    assert model.grid_size == grid and model.num_prefix_tokens == prefix and model.n_pro == (6, 5, 4)
    with torch.no_grad():
        out = model(make_images(kind, batch=3))
    h, w = grid
    assert out.logits.shape == (3, NUM_CLASSES)
    assert out.part_logits.shape == (3, 3, NUM_CLASSES)
    torch.testing.assert_close(out.logits, out.part_logits.mean(1))
    assert [tuple(m.shape) for m in out.concept_maps] == [(3, k, h, w) for k in (6, 5, 4)]
    assert [tuple(g.shape) for g in out.groupings] == [(3, 5, 3), (3, 4, 3)]
    assert [tuple(f.shape) for f in out.fused_maps] == [(3, 4, h, w), (3, 4, h, w)]
    assert out.fusion_targets == [2, 2]
    assert [tuple(r.shape) for r in out.region_features] == [(3, 6, 32), (3, 5, 32), (3, 4, 32)]
    assert out.part_features.shape == (3, 32, 4)
    assert [tuple(p.shape) for p in out.prompts] == [(3, 3, 32), (3, 3, 32)]
    assert out.cls_feature.shape == (3, 32)
    for maps in out.concept_maps + out.fused_maps:
        assert maps.dtype == torch.float32 and (maps >= 0).all()
        torch.testing.assert_close(maps.sum(1), torch.ones(3, h, w))
    for grouping in out.groupings:
        torch.testing.assert_close(grouping.sum(-1), torch.ones(grouping.shape[:2]))
    for stage, fused in enumerate(out.fused_maps):
        # Background stays last and is carried over untouched.
        assert torch.equal(fused[:, -1], out.concept_maps[stage][:, -1])


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg", "deit_distilled"])
def test_without_prompts_the_stock_backbone_forward_is_reproduced(make_model, make_images, kind):
    model = make_model(kind, cross_layer=False).eval()
    images = make_images(kind)
    with torch.no_grad():
        out = model(images)
        reference = model.backbone.forward_features(images)
    torch.testing.assert_close(out.cls_feature, reference[:, 0])
    patches = reference[:, model.num_prefix_tokens :]
    torch.testing.assert_close(out.concept_maps[0], model.stages[0](patches))


def test_prompts_reach_the_backbone_output(make_model, images):
    model = make_model().eval()
    with torch.no_grad():
        out = model(images)
        unprompted = model.backbone.forward_features(images)
    assert not torch.allclose(out.cls_feature, unprompted[:, 0], atol=1e-3)


def test_eval_is_deterministic_and_training_samples_gumbel_noise(make_model, images):
    model = make_model().eval()
    with torch.no_grad():
        first, second = model(images), model(images)
        assert torch.equal(first.logits, second.logits)
        for a, b in zip(first.groupings, second.groupings, strict=True):
            assert torch.equal(a, b)
        model.train()
        noisy_a, noisy_b = model(images), model(images)
    assert not torch.allclose(noisy_a.groupings[0], noisy_b.groupings[0])


def test_samples_do_not_interact_within_a_batch(make_model, make_images):
    model = make_model().eval()
    images = make_images(batch=4)
    with torch.no_grad():
        together = model(images)
        alone = model(images[2:3])
    torch.testing.assert_close(together.logits[2:3], alone.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(together.concept_maps, alone.concept_maps, strict=True):
        torch.testing.assert_close(a[2:3], b, atol=1e-5, rtol=1e-5)


def test_prototype_without_region_gets_a_uniform_grouping_row(make_model, images):
    model = make_model().eval()
    with torch.no_grad():
        model.stages[0].prototypes[2].fill_(1e3)  # so far from every feature that it wins no patch
        out = model(images)
    assert torch.count_nonzero(out.concept_maps[0][:, 2].flatten(1).argmax(0) == 2) == 0
    assert torch.equal(out.region_features[0][:, 2], torch.zeros(2, 32))
    torch.testing.assert_close(out.groupings[0][:, 2], torch.full((2, 3), 1 / 3))


def test_spatial_bias_switch_removes_only_the_bias(make_model, images):
    with_bias = make_model(spatial_bias=True).eval()
    without = make_model(spatial_bias=False).eval()
    assert not [n for n, _ in without.named_parameters() if "spatial_bias" in n]
    assert len([n for n, _ in with_bias.named_parameters() if "spatial_bias" in n]) == 3
    with torch.no_grad():
        # The bias starts at zero, so both models agree until it moves.
        torch.testing.assert_close(with_bias(images).logits, without(images).logits)
        with_bias.stages[-1].spatial_bias.normal_()
        assert not torch.allclose(with_bias(images).concept_maps[-1], without(images).concept_maps[-1])


def test_soft_pooling_changes_region_features_not_maps(make_model, images):
    ifa = make_model(pooling="ifa").eval()
    soft = make_model(pooling="soft").eval()
    with torch.no_grad():
        out_ifa, out_soft = ifa(images), soft(images)
    torch.testing.assert_close(out_ifa.concept_maps[0], out_soft.concept_maps[0])
    assert not torch.allclose(out_ifa.region_features[0], out_soft.region_features[0])


def test_soft_pooling_is_the_map_weighted_mean_of_final_patches(make_model, images):
    model = make_model(pooling="soft", cross_layer=False).eval()
    with torch.no_grad():
        out = model(images)
        patches = model.backbone.forward_features(images)[:, 1:]
    weights = out.concept_maps[0].flatten(2)
    expected = weights @ patches / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out.region_features[0], expected, atol=1e-5, rtol=1e-5)


def test_cross_layer_off_keeps_only_the_last_stage(make_model, images):
    model = make_model(cross_layer=False).eval()
    assert model.n_pro == (4,) and len(model.stages) == 1 and len(model.fusions) == 0
    with torch.no_grad():
        out = model(images)
    assert [tuple(m.shape) for m in out.concept_maps] == [(2, 4, 4, 4)]
    assert out.prompts == [] and out.groupings == [] and out.fused_maps == [] and out.fusion_targets == []
    assert out.part_logits.shape == (2, 3, NUM_CLASSES)


def test_fusion_off_uses_each_concept_as_a_prompt(make_model, images):
    model = make_model(fusion=False).eval()
    assert not [n for n, _ in model.named_parameters() if "grouping" in n]
    with torch.no_grad():
        out = model(images)
    assert [tuple(p.shape) for p in out.prompts] == [(2, 5, 32), (2, 4, 32)]
    assert out.groupings == [] and out.fused_maps == [] and out.fusion_targets == []
    assert len(out.concept_maps) == 3


def test_chain_fusion_groups_each_stage_into_the_next(make_model, images):
    model = make_model(n_pro=(7, 6, 5, 4), fusion_target="chain").eval()
    with torch.no_grad():
        out = model(images)
    assert [tuple(g.shape) for g in out.groupings] == [(2, 6, 5), (2, 5, 4), (2, 4, 3)]
    assert [tuple(f.shape) for f in out.fused_maps] == [(2, 6, 4, 4), (2, 5, 4, 4), (2, 4, 4, 4)]
    assert out.fusion_targets == [1, 2, 3]
    assert [tuple(p.shape) for p in out.prompts] == [(2, 5, 32), (2, 4, 32), (2, 3, 32)]
    for fused in out.fused_maps:
        torch.testing.assert_close(fused.sum(1), torch.ones(2, 4, 4))


def test_low_gumbel_temperature_gives_nearly_hard_groupings(make_model, images):
    model = make_model(gumbel_tau=1e-3).train()
    with torch.no_grad():
        out = model(images)
    occupied = out.region_features[0][:, :-1].abs().sum(-1) > 0
    assert occupied.any()
    assert (out.groupings[0].max(-1).values[occupied] > 0.99).all()


@pytest.mark.parametrize(
    ("freeze", "trainable_backbone"),
    [
        ("tokens", {"cls_token", "pos_embed"}),
        ("frozen", set()),
        ("full", None),
    ],
)
def test_freeze_modes(make_model, freeze, trainable_backbone):
    model = make_model(freeze=freeze)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    if trainable_backbone is None:
        assert "blocks.0.attn.qkv.weight" in trainable and "norm.weight" in trainable
        assert "patch_embed.proj.weight" in trainable
    else:
        assert trainable == trainable_backbone
    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert head_params and all(p.requires_grad for p in head_params)


def test_freeze_tokens_trains_register_and_distillation_tokens(make_model):
    dino = {n for n, p in make_model("dinov2_reg").backbone.named_parameters() if p.requires_grad}
    deit = {n for n, p in make_model("deit_distilled").backbone.named_parameters() if p.requires_grad}
    assert dino == {"cls_token", "reg_token", "pos_embed"}
    assert deit == {"cls_token", "dist_token", "pos_embed"}


def test_grad_checkpointing_gives_the_same_outputs_and_gradients(make_model, images):
    grads = []
    for flag in (False, True):
        model = make_model(grad_checkpointing=flag).train()
        torch.manual_seed(5)
        out = model(images)
        out.logits.logsumexp(-1).sum().backward()
        grads.append((out.logits.detach(), model.backbone.pos_embed.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_build_model_maps_the_config(tiny_archs):
    arch, img_size, backbone_args = tiny_archs["vit"]
    cfg = Config()
    cfg.model.arch, cfg.model.img_size, cfg.model.backbone_args = arch, img_size, backbone_args
    cfg.model.pretrained = False
    cfg.model.n_pro = (5, 4, 3)
    cfg.model.spatial_bias = False
    cfg.model.fusion_target = "chain"
    cfg.model.gumbel_tau = 0.5
    cfg.model.freeze = "frozen"
    model = build_model(cfg, num_classes=3)
    assert model.method == "ivpt" and model.n_pro == (5, 4, 3) and model.num_classes == 3
    assert model.stages[0].spatial_bias is None and model.fusion_target == "chain"
    assert model.fusions[0].gumbel_tau == 0.5 and model.fusions[0].num_targets == 3
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_non_vit_arch_is_rejected():
    message = "model.arch 'resnet18' is a timm 'resnet' model, not a timm Vision Transformer"
    with pytest.raises(IVPTError, match=message):
        create_model("resnet18", 3, 32, (3, 2), backbone_args={})


def test_unknown_arch_is_rejected():
    with pytest.raises(ConfigError, match="config key 'model.arch': 'vit_nonexistent' is not a timm model name"):
        create_model("vit_nonexistent", 3, 32)


def test_too_many_stages_for_the_blocks(make_model):
    with pytest.raises(ConfigError, match="5 stages need at least 5 transformer blocks, the backbone has 4"):
        make_model(n_pro=(6, 5, 4, 3, 2))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "vpt_huge"}, "config key 'model.method': expected one of ivpt, vpt_shallow"),
        ({"pooling": "max"}, "config key 'model.pooling': expected one of ifa, soft, got 'max'"),
        ({"fusion_target": "tree"}, "config key 'model.fusion_target': expected one of final, chain, got 'tree'"),
        ({"freeze": "blocks"}, "config key 'model.freeze': expected one of tokens, frozen, full, got 'blocks'"),
        ({"gumbel_tau": 0.0}, "config key 'model.gumbel_tau': must be positive, got 0.0"),
        ({"n_pro": (6, 1)}, r"config key 'model.n_pro': every stage needs at least 2 prototypes .* got \[6, 1\]"),
        ({"backbone_args": {"depht": 2}}, "config key 'model.backbone_args'.*does not fit"),
    ],
)
def test_bad_options_raise_config_errors(tiny_archs, options, message):
    arch, img_size, backbone_args = tiny_archs["vit"]
    kwargs = dict(n_pro=(6, 5, 4), backbone_args=backbone_args) | options
    with pytest.raises(ConfigError, match=message):
        create_model(arch, NUM_CLASSES, img_size, **kwargs)


def test_missing_pretrained_file_is_reported(tiny_archs, tmp_path):
    arch, img_size, backbone_args = tiny_archs["vit"]
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(ConfigError, match=f"'model.pretrained_file': file '{missing}' does not exist"):
        create_model(arch, 3, img_size, pretrained=True, pretrained_file=str(missing), backbone_args=backbone_args)


def test_wrong_image_size_is_reported(make_model):
    with pytest.raises(IVPTError, match=r"expected images of shape \(B, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        make_model()(torch.zeros(1, 3, 64, 64))


def test_uint8_images_are_refused_with_a_pointer_to_normalize(make_model):
    """A data set's samples are uint8 pixels: fed unnormalised, the model says what to do."""
    with pytest.raises(IVPTError, match=r"expected normalised float images, got torch.uint8 .*transform.normalize"):
        make_model()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_maps_stay_float32_and_normalised_under_bf16_autocast(make_model, images):
    model = make_model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.logits.shape == (2, NUM_CLASSES)
    for maps in out.concept_maps + out.fused_maps + out.groupings:
        assert maps.dtype == torch.float32
    for maps in out.concept_maps + out.fused_maps:
        torch.testing.assert_close(maps.sum(1), torch.ones_like(maps[:, 0]), atol=1e-6, rtol=0)
