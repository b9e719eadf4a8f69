"""VPT's concept maps: the attention of the last block's prompt tokens over the patches."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block

from ivpt.model.baselines import prompt_attention_maps

PROMPTS = 3


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_eval_maps_have_one_channel_per_prompt_plus_background_and_sum_to_one(make_model, images, method):
    model = make_model(method=method, vpt_prompts=PROMPTS).eval()
    with torch.no_grad():
        out = model(images)
    (maps,) = out.concept_maps
    assert maps.shape == (2, PROMPTS + 1, 4, 4) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 4, 4))
    assert maps.min() >= 0.0
    # Background last: 1 minus the largest prompt attention relative to its peak, which is 1 somewhere,
    # so every image has a patch with no background at all.
    assert torch.all(maps[:, -1].flatten(1).amin(dim=1) < 1e-6)


def test_maps_are_the_last_blocks_prompt_attention(make_model, images):
    model = make_model(method="vpt_deep", vpt_prompts=PROMPTS).eval()
    seen: list[torch.Tensor] = []
    hook = model.backbone.blocks[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        maps = model(images).concept_maps[0]
        # Sequence: 1 CLS token, the prompts, then the 4 x 4 patches.
        expected = prompt_attention_maps(model.backbone.blocks[-1], seen[0], slice(1, 4), slice(4, 20), (4, 4))
    hook.remove()
    torch.testing.assert_close(maps, expected)


def test_training_forward_and_the_linear_probe_have_no_maps(make_model, images):
    vpt = make_model(method="vpt_deep", vpt_prompts=PROMPTS).train()
    assert vpt(images).concept_maps == []
    probe = make_model(method="linear_probe").eval()
    with torch.no_grad():
        assert probe(images).concept_maps == []


def _identity_attention_block(dim: int, heads: int) -> Block:
    """A block whose queries and keys are both the normalised input tokens (values are irrelevant here)."""
    block = Block(dim, heads, qkv_bias=True).eval()
    with torch.no_grad():
        block.attn.qkv.weight.zero_()
        block.attn.qkv.bias.zero_()
        block.attn.qkv.weight[:dim] = torch.eye(dim)
        block.attn.qkv.weight[dim : 2 * dim] = torch.eye(dim)
    return block


def test_a_prompt_that_copies_a_patch_puts_its_map_on_that_patch():
    dim, grid = 32, (4, 4)
    block = _identity_attention_block(dim, heads=2)
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(1, 16, dim, generator=generator)
    # Prompt 0 copies patch 5 and prompt 1 copies patch 10: q . k is |z|^2 there and near 0 elsewhere.
    prompts = torch.stack([patches[:, 5], patches[:, 10]], dim=1)
    tokens = torch.cat([torch.randn(1, 1, dim, generator=generator), prompts, patches], dim=1)
    maps = prompt_attention_maps(block, tokens, slice(1, 3), slice(3, 19), grid)
    assert maps.shape == (1, 3, 4, 4)
    winner = maps[0].flatten(1).argmax(dim=0)  # (16,) channel of each patch
    assert winner[5] == 0 and winner[10] == 1
    assert maps[0, 0].flatten().argmax() == 5 and maps[0, 1].flatten().argmax() == 10
    # Where a prompt peaks, its relative attention is 1: no background left there.
    torch.testing.assert_close(maps[0, 2].flatten()[[5, 10]], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(1, 4, 4))


def test_prompt_attention_ignores_prefix_and_prompt_keys():
    dim = 32
    block = _identity_attention_block(dim, heads=2)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 1 + 2 + 16, dim, generator=generator)
    maps = prompt_attention_maps(block, tokens, slice(1, 3), slice(3, 19), (4, 4))
    # Changing the CLS token (a key the prompts could attend to) leaves the patch-only softmax unchanged.
    tokens[:, 0] = tokens[:, 1] * 5.0
    torch.testing.assert_close(prompt_attention_maps(block, tokens, slice(1, 3), slice(3, 19), (4, 4)), maps)
