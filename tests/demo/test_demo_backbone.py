"""The ``ivpt_demo_vit`` timm registration and the shipped weight file."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

import ivpt.model.demo_vit as demo_backbone
from ivpt.demo.pretrain import token_stride, weight_file_recipe
from ivpt.demo.recipe import TOKEN_STRIDES, PretrainRecipe
from ivpt.errors import IVPTError
from ivpt.model.demo_vit import DEMO_ARCH, DEMO_VIT_ARGS, STEM_CHANNELS, TOKEN_STRIDE, WEIGHTS_FILE, stem_strides

MAX_WEIGHTS_BYTES = 10 * 1024 * 1024


def test_weights_file_is_small_safetensors_without_classifier() -> None:
    assert WEIGHTS_FILE.is_file()
    assert WEIGHTS_FILE.stat().st_size <= MAX_WEIGHTS_BYTES
    with safe_open(str(WEIGHTS_FILE), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.metadata()["arch"] == DEMO_ARCH
    assert "pos_embed" in names and "blocks.0.attn.qkv.weight" in names
    assert not any(name.startswith("head.") for name in names)
    recipe = weight_file_recipe(WEIGHTS_FILE)
    assert recipe["command"].startswith("ivpt pretrain-backbone --out ")
    # The generic family has no classes, hence no pretraining task to score.
    assert recipe["family"] == "generic" and recipe["test_accuracy"] is None


def test_registered_model_is_a_stock_vit_with_the_documented_shape() -> None:
    assert timm.is_model(DEMO_ARCH)
    model = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0)
    assert type(model) is VisionTransformer
    assert tuple(model.patch_embed.grid_size) == (16, 16)
    assert model.embed_dim == DEMO_VIT_ARGS["embed_dim"]
    assert len(model.blocks) == DEMO_VIT_ARGS["depth"]
    assert model.blocks[0].attn.num_heads == DEMO_VIT_ARGS["num_heads"]
    tokens = model.forward_features(torch.zeros(2, 3, 64, 64))
    assert tokens.shape == (2, 1 + 256, DEMO_VIT_ARGS["embed_dim"])


# Pixels a token's window reaches on either side of its cell's first pixel: each 3 x 3 convolution widens
# it by one pixel of its input's resolution, 1 + 2 + 2 + 4 + 4 + 4 at stride 4 and 1 + 2 + 2 + 4 + 4 + 8 at 8.
@pytest.mark.parametrize(("stride", "reach"), [(4, 17), (8, 21)])
def test_stem_token_window_and_no_running_statistics(stride: int, reach: int) -> None:
    model = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0, token_stride=stride).eval()
    assert len(STEM_CHANNELS) == 6
    # A frozen backbone must not change in training mode: no batch norm in the stem.
    assert not any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())
    # Column ``reach`` still changes token (0, 0); the next column does not.
    images = torch.zeros(1, 3, 64, 64)
    base = model.patch_embed(images)[0, 0]
    far, near = images.clone(), images.clone()
    far[..., 4, reach + 1] = 5.0
    near[..., 4, reach] = 5.0
    torch.testing.assert_close(model.patch_embed(far)[0, 0], base)
    assert not torch.allclose(model.patch_embed(near)[0, 0], base)


@pytest.mark.parametrize(("stride", "grid"), [(8, 8), (4, 16), (2, 32)])
def test_token_stride_changes_the_grid_not_the_weights(stride: int, grid: int) -> None:
    model = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0, token_stride=stride)
    assert tuple(model.patch_embed.grid_size) == (grid, grid) and token_stride(model) == stride
    assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 1 + grid * grid, DEMO_VIT_ARGS["embed_dim"])
    # Only the position embedding depends on the grid: a file trained at one stride loads at another.
    reference = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0).state_dict()
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    assert {name for name in shapes if shapes[name] != tuple(reference[name].shape)} == (
        set() if stride == TOKEN_STRIDE else {"pos_embed"}
    )
    assert stem_strides(stride).count(2) == {8: 3, 4: 2, 2: 1}[stride]
    loaded = timm.create_model(DEMO_ARCH, pretrained=True, num_classes=0, token_stride=stride)
    assert loaded.pos_embed.shape == (1, 1 + grid * grid, DEMO_VIT_ARGS["embed_dim"])


def test_shipped_weights_were_written_by_the_default_recipe() -> None:
    from ivpt.demo.pretrain import compute_multiple, training_steps

    # ``ivpt pretrain-backbone --out FILE`` with no other option is the command that reproduces them.
    recorded = weight_file_recipe(WEIGHTS_FILE)
    recorded["snapshots"] = tuple(recorded["snapshots"])  # a JSON list in the file
    default = PretrainRecipe()
    for field in fields(PretrainRecipe):
        assert recorded[field.name] == getattr(default, field.name), field.name
    # The whole run: the steps that spend the default compute, on the default recipe's training images.
    steps = training_steps(default, recorded["train_images"] // default.batch_size)
    assert recorded["steps"] == steps
    assert recorded["compute"] == pytest.approx(compute_multiple(default, steps), abs=1e-3)


def test_default_token_stride_is_the_shipped_one_and_others_are_rejected() -> None:
    assert PretrainRecipe().token_stride == TOKEN_STRIDE == weight_file_recipe(WEIGHTS_FILE)["token_stride"] == 4
    assert stem_strides() == demo_backbone.STEM_STRIDES == (2, 1, 2, 1, 1, 1)
    # The command line's torch-free copy of the strides the stem can give.
    assert demo_backbone.TOKEN_STRIDES == TOKEN_STRIDES == (2, 4, 8)
    with pytest.raises(IVPTError, match="ivpt_demo_vit: token_stride must be one of 2, 4, 8, got 3"):
        timm.create_model(DEMO_ARCH, pretrained=False, token_stride=3)


def test_pretrained_loads_exactly_the_shipped_tensors() -> None:
    shipped = load_file(str(WEIGHTS_FILE))
    model = timm.create_model(DEMO_ARCH, pretrained=True, num_classes=0).eval()
    state = model.state_dict()
    assert set(shipped) == set(state)
    for name, tensor in shipped.items():
        torch.testing.assert_close(state[name], tensor.float(), rtol=0, atol=0, msg=name)
    with torch.no_grad():
        features = model(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert features.shape == (3, DEMO_VIT_ARGS["embed_dim"])
    assert torch.isfinite(features).all()


def test_pretrained_with_classes_gets_a_fresh_head_and_same_trunk() -> None:
    model = timm.create_model(DEMO_ARCH, pretrained=True, num_classes=7)
    shipped = load_file(str(WEIGHTS_FILE))
    assert model.head.weight.shape == (7, DEMO_VIT_ARGS["embed_dim"])
    torch.testing.assert_close(model.cls_token, shipped["cls_token"].float(), rtol=0, atol=0)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_larger_img_size_resamples_the_position_embedding() -> None:
    model = timm.create_model(DEMO_ARCH, pretrained=True, num_classes=0, img_size=96)
    shipped = load_file(str(WEIGHTS_FILE))
    assert model.pos_embed.shape == (1, 1 + 24 * 24, DEMO_VIT_ARGS["embed_dim"])
    # The CLS position is a prefix token: carried over, not interpolated.
    torch.testing.assert_close(model.pos_embed[:, :1], shipped["pos_embed"][:, :1].float(), rtol=0, atol=0)
    torch.testing.assert_close(model.patch_embed.proj.weight, shipped["patch_embed.proj.weight"].float())


def test_pretrained_file_overlay_loads_another_file(tmp_path: Path) -> None:
    other = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0)
    torch.nn.init.constant_(other.cls_token, 0.25)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    model = timm.create_model(DEMO_ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.cls_token, torch.full_like(model.cls_token, 0.25))


def test_missing_weights_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "gone.safetensors"
    monkeypatch.setattr(demo_backbone, "WEIGHTS_FILE", missing)
    with pytest.raises(IVPTError, match=r"ivpt_demo_vit: the pretrained weight file '.*gone\.safetensors' is missing"):
        timm.create_model(DEMO_ARCH, pretrained=True)
    # Without pretrained weights nothing is read.
    assert isinstance(timm.create_model(DEMO_ARCH, pretrained=False), VisionTransformer)


def test_project_models_accept_the_demo_backbone() -> None:
    """``model.arch=ivpt_demo_vit model.pretrained=true`` works for every config (the model package imports
    the registration)."""
    from ivpt.model import create_model

    model = create_model(DEMO_ARCH, num_classes=4, img_size=64, n_pro=(6, 5, 4), pretrained=True)
    shipped = load_file(str(WEIGHTS_FILE))
    torch.testing.assert_close(model.backbone.pos_embed, shipped["pos_embed"].float(), rtol=0, atol=0)
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.logits.shape == (2, 4)
    assert [maps.shape for maps in out.concept_maps] == [(2, k, 16, 16) for k in (6, 5, 4)]
