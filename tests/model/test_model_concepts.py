"""Known answers for the IVPT building blocks: concept maps, IFA / soft pooling, fusion, part head."""

from __future__ import annotations

import pytest
import torch

from ivpt.model.concepts import ConceptStage, PartHead, PooledRegions, PromptFusion, pool_regions


def test_concept_maps_are_softmax_of_negative_squared_distance_plus_bias():
    torch.manual_seed(0)
    stage = ConceptStage(num_prototypes=3, embed_dim=4, grid_size=(2, 3))
    with torch.no_grad():
        stage.spatial_bias.normal_()
    z = torch.randn(2, 6, 4)
    maps = stage(z)
    assert maps.shape == (2, 3, 2, 3)
    for b in range(2):
        for i in range(6):
            distances = ((z[b, i] - stage.prototypes) ** 2).sum(-1)
            expected = torch.softmax(-distances + stage.spatial_bias[:, i // 3, i % 3], dim=0)
            torch.testing.assert_close(maps[b, :, i // 3, i % 3], expected, atol=1e-5, rtol=1e-5)


def test_concept_maps_are_float32_under_bf16_autocast():
    stage = ConceptStage(4, 8, (2, 2))
    z = torch.randn(1, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = stage(z.bfloat16())
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, stage(z.bfloat16().float()))


def test_prototype_init_and_optional_bias():
    torch.manual_seed(0)
    stage = ConceptStage(200, 64, (3, 3))
    assert abs(stage.prototypes.std().item() - 0.05) < 0.003
    assert torch.count_nonzero(stage.spatial_bias) == 0 and stage.spatial_bias.shape == (200, 3, 3)
    assert ConceptStage(2, 4, (3, 3), spatial_bias=False).spatial_bias is None


def _two_by_two_case() -> tuple[torch.Tensor, torch.Tensor]:
    # 3 prototypes on a 2x2 grid: prototype 0 wins patches 0 and 1, prototype 1 wins patch 2 and patch 3,
    # prototype 2 (background) wins nothing.
    maps = torch.tensor([[0.6, 0.7, 0.1, 0.2], [0.3, 0.2, 0.5, 0.45], [0.1, 0.1, 0.4, 0.35]]).reshape(1, 3, 2, 2)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]).unsqueeze(0)
    return maps, features


def test_ifa_pools_argmax_regions_weighted_by_the_map_and_zeroes_empty_ones():
    maps, features = _two_by_two_case()
    pooled = pool_regions(maps, features, hard=True)
    expected_0 = (0.6 * features[0, 0] + 0.7 * features[0, 1]) / 1.3
    expected_1 = (0.5 * features[0, 2] + 0.45 * features[0, 3]) / 0.95
    torch.testing.assert_close(pooled.features[0, 0], expected_0)
    torch.testing.assert_close(pooled.features[0, 1], expected_1)
    assert torch.equal(pooled.features[0, 2], torch.zeros(2))
    torch.testing.assert_close(pooled.mass, torch.tensor([[1.3, 0.95, 0.0]]))


def test_soft_pooling_weights_every_patch_by_the_map():
    maps, features = _two_by_two_case()
    pooled = pool_regions(maps, features, hard=False)
    weights = maps.flatten(2)[0]
    expected = (weights @ features[0]) / weights.sum(1, keepdim=True)
    torch.testing.assert_close(pooled.features[0], expected)


def test_ifa_gradient_of_empty_region_is_finite():
    maps, features = _two_by_two_case()
    maps.requires_grad_(True)
    features.requires_grad_(True)
    pool_regions(maps, features).features.sum().backward()
    assert torch.isfinite(maps.grad).all() and torch.isfinite(features.grad).all()


def test_fusion_prompts_fused_maps_and_uniform_rows_in_eval():
    torch.manual_seed(0)
    fusion = PromptFusion(num_concepts=3, num_targets=2, embed_dim=4).eval()
    maps = torch.softmax(torch.randn(2, 4, 3, 3), dim=1)
    features = torch.randn(2, 4, 4)
    mass = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    result = fusion(maps, PooledRegions(features, mass))

    logits = fusion.grouping(features[:, :3])
    expected_grouping = logits.softmax(-1)
    expected_grouping[0, 1] = 0.5  # empty region of sample 0, concept 1
    torch.testing.assert_close(result.grouping, expected_grouping)

    weights = expected_grouping
    targets = torch.stack(
        [(weights[:, :, n : n + 1] * features[:, :3]).sum(1) / weights[:, :, n].sum(1, keepdim=True) for n in range(2)],
        dim=1,
    )
    torch.testing.assert_close(result.prompts, fusion.prompt_proj(fusion.prompt_norm(targets)))

    fused_parts = torch.einsum("bkhw,bkn->bnhw", maps[:, :3], expected_grouping)
    torch.testing.assert_close(result.fused_maps, torch.cat([fused_parts, maps[:, 3:]], 1))
    torch.testing.assert_close(result.fused_maps.sum(1), torch.ones(2, 3, 3))


def test_fusion_is_gumbel_in_training_and_plain_softmax_in_eval():
    torch.manual_seed(0)
    fusion = PromptFusion(3, 2, 4)
    maps = torch.softmax(torch.randn(1, 4, 2, 2), dim=1)
    regions = PooledRegions(torch.randn(1, 4, 4), torch.ones(1, 4))
    train_a, train_b = fusion(maps, regions).grouping, fusion(maps, regions).grouping
    assert not torch.allclose(train_a, train_b)
    torch.testing.assert_close(train_a.sum(-1), torch.ones(1, 3))
    fusion.eval()
    assert torch.equal(fusion(maps, regions).grouping, fusion(maps, regions).grouping)


def test_fusion_without_grouping_uses_every_concept_as_a_prompt():
    fusion = PromptFusion(3, 2, 4, grouping=False)
    features = torch.randn(2, 4, 4)
    result = fusion(torch.softmax(torch.randn(2, 4, 2, 2), 1), PooledRegions(features, torch.ones(2, 4)))
    assert fusion.grouping is None and result.grouping is None and result.fused_maps is None
    assert fusion.prompt_norm.normalized_shape == (3, 4)
    torch.testing.assert_close(result.prompts, fusion.prompt_proj(fusion.prompt_norm(features[:, :3])))


def test_part_head_layernorms_the_whole_matrix_and_averages_foreground_parts():
    torch.manual_seed(0)
    head = PartHead(embed_dim=4, num_regions=3, num_classes=5)
    with torch.no_grad():
        head.modulation.weight.normal_()
        head.modulation.bias.normal_()
    regions = torch.randn(2, 3, 4)
    out = head(regions)
    matrix = regions.transpose(1, 2)
    mean = matrix.mean(dim=(1, 2), keepdim=True)
    var = matrix.var(dim=(1, 2), unbiased=False, keepdim=True)
    normed = (matrix - mean) / torch.sqrt(var + 1e-5) * head.modulation.weight + head.modulation.bias
    torch.testing.assert_close(out.part_features, normed)
    part_logits = torch.stack([normed[:, :, n] @ head.classifier.weight.t() for n in range(2)], dim=1)
    torch.testing.assert_close(out.part_logits, part_logits)
    torch.testing.assert_close(out.logits, part_logits.mean(1))
    assert head.classifier.bias is None


@pytest.mark.parametrize("hard", [True, False])
def test_pooling_never_mixes_samples(hard: bool):
    maps = torch.softmax(torch.randn(3, 4, 2, 2), dim=1)
    features = torch.randn(3, 4, 5)
    together = pool_regions(maps, features, hard).features
    alone = pool_regions(maps[1:2], features[1:2], hard).features
    torch.testing.assert_close(together[1:2], alone)


def test_empty_regions_pool_to_zero_in_half_precision():
    """1e-12 underflows to 0 in fp16: the division must not give 0/0 for empty regions."""
    maps = torch.zeros(1, 3, 2, 2)
    maps[:, 0] = 0.7
    maps[:, 1] = 0.3  # prototype 1 never wins, prototype 2 has no mass at all
    features = torch.randn(1, 4, 5).half()
    pooled = pool_regions(maps, features, hard=True)
    assert pooled.features.dtype == torch.float16
    assert torch.isfinite(pooled.features).all()
    assert torch.equal(pooled.features[0, 1:], torch.zeros(2, 5, dtype=torch.float16))


def test_empty_regions_give_finite_gradients_in_half_precision():
    """The backward of the region mean must not scale by 1/clamp (it overflows fp16 into NaN)."""
    maps = torch.zeros(1, 3, 2, 2)
    maps[:, 0] = 0.7
    maps[:, 1] = 0.3
    maps.requires_grad_(True)
    features = torch.randn(1, 4, 5).half().requires_grad_(True)
    pooled = pool_regions(maps, features, hard=True)
    (pooled.features.float() * torch.arange(3.0).view(1, 3, 1)).sum().backward()
    assert torch.isfinite(maps.grad).all()
    assert torch.isfinite(features.grad).all()
