"""The authors' snapshots: parity with a plain reference forward, key errors, conversion."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from ivpt.checkpoint import payload_digest
from ivpt.config import Config
from ivpt.errors import CheckpointError
from ivpt.model import build_model, convert_official, load_official_checkpoint

N_PRO = (6, 5, 4)
NUM_CLASSES = 7


def official_key_shapes(backbone: torch.nn.Module, grid: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The official key list: timm's backbone keys plus the IVPT keys of docs/method.md §11."""
    dim = backbone.embed_dim
    parts = N_PRO[-1] - 1
    shapes = {name: tuple(t.shape) for name, t in backbone.state_dict().items()}
    for s, k in enumerate(N_PRO):
        shapes[f"p_token.{s}"] = (1, k, dim)
        shapes[f"p_bias.{s}"] = (1, k, *grid)
    for s in range(len(N_PRO) - 1):
        shapes |= {
            f"p_linear.{s}.weight": (dim, dim),
            f"p_linear.{s}.bias": (dim,),
            f"p_norm.{s}.weight": (parts, dim),
            f"p_norm.{s}.bias": (parts, dim),
            f"p_classifier.{s}.weight": (parts, dim),
            f"p_classifier.{s}.bias": (parts,),
        }
    shapes |= {
        "modulation.weight": (dim, parts + 1),
        "modulation.bias": (dim, parts + 1),
        "fc_class_landmarks.weight": (NUM_CLASSES, dim),
    }
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        # Scales chosen so that every stage has several non-empty regions and that replacing one prompt
        # layer's weights moves the logits by ~0.3 or more: the 1e-4 comparison below then sees any error
        # in the prompts, not only in the last stage.
        scale = 0.2 if name.startswith("patch_embed") else 0.3 if name.startswith("p_token") else 0.5
        state[name] = torch.randn(shape, generator=generator) * scale
    return state


def reference_forward(backbone, state, images):
    """IVPT in eval mode written plainly from docs/method.md with the official key names."""
    num_stages = len(N_PRO)
    parts = N_PRO[-1] - 1
    blocks = backbone.blocks
    prefix = backbone.num_prefix_tokens
    h, w = backbone.patch_embed.grid_size
    dim = backbone.embed_dim

    def concept_maps(z, s):
        prototypes, bias = state[f"p_token.{s}"][0], state[f"p_bias.{s}"][0]
        distances = torch.stack([((z - q) ** 2).sum(-1) for q in prototypes], dim=1)  # (B, K, n)
        return torch.softmax(-distances.reshape(z.shape[0], -1, h, w) + bias, dim=1)

    def ifa(maps, z):
        winners = maps.argmax(1)
        features = []
        for k in range(maps.shape[1]):
            weight = (maps[:, k] * (winners == k)).flatten(1)
            mass = weight.sum(1, keepdim=True)
            pooled = (weight.unsqueeze(-1) * z).sum(1)
            features.append(torch.where(mass > 0, pooled / mass.clamp_min(1e-30), torch.zeros_like(pooled)))
        return torch.stack(features, 1), winners

    x = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(images)))
    all_maps, all_fused = [], []
    for index, block in enumerate(blocks):
        s = index - (len(blocks) - (num_stages - 1))
        if s < 0:
            x = block(x)
            continue
        z = backbone.norm(x[:, prefix:])
        maps = concept_maps(z, s)
        features, winners = ifa(maps, z)
        fg = features[:, :-1]
        gamma = F.linear(fg, state[f"p_classifier.{s}.weight"], state[f"p_classifier.{s}.bias"]).softmax(-1)
        for k in range(fg.shape[1]):
            empty = ~(winners == k).flatten(1).any(1)
            gamma[empty, k] = 1.0 / parts
        prompts = torch.stack(
            [(gamma[:, :, n : n + 1] * fg).sum(1) / gamma[:, :, n : n + 1].sum(1) for n in range(parts)], 1
        )
        prompts = F.layer_norm(prompts, (parts, dim), state[f"p_norm.{s}.weight"], state[f"p_norm.{s}.bias"])
        prompts = F.linear(prompts, state[f"p_linear.{s}.weight"], state[f"p_linear.{s}.bias"])
        fused = [sum(maps[:, k] * gamma[:, k, n, None, None] for k in range(fg.shape[1])) for n in range(parts)]
        all_fused.append(torch.stack([*fused, maps[:, -1]], 1))
        all_maps.append(maps)
        x = block(torch.cat([x, prompts], 1))[:, :-parts]

    z = backbone.norm(x)[:, prefix:]
    maps = concept_maps(z, num_stages - 1)
    all_maps.append(maps)
    features, _ = ifa(maps, z)
    matrix = features.transpose(1, 2)  # (B, D, N+1)
    modulated = F.layer_norm(matrix, (dim, parts + 1), state["modulation.weight"], state["modulation.bias"])
    part_logits = [modulated[:, :, n] @ state["fc_class_landmarks.weight"].t() for n in range(parts)]
    return torch.stack(part_logits, 1).mean(1), all_maps, all_fused


@pytest.fixture(params=["deit", "dinov2_reg"])
def official_case(request, tiny_archs, tmp_path):
    kind = {"deit": "deit_distilled", "dinov2_reg": "dinov2_reg"}[request.param]
    arch, img_size, backbone_args = tiny_archs[kind]
    backbone = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, **backbone_args).eval()
    state = random_state(official_key_shapes(backbone, tuple(backbone.patch_embed.grid_size)), seed=1)
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith(("p_", "modulation", "fc_class"))})
    path = tmp_path / "snapshot.pth"
    snapshot = dict(model_state=state, optimizer_state={}, finished_epoch=3, epoch_test_accuracies=[0.5, 0.6])
    torch.save(snapshot, path)
    return dict(
        kind=kind, arch=arch, img_size=img_size, backbone_args=backbone_args, backbone=backbone, state=state, path=path
    )


def _load(case, path=None):
    return load_official_checkpoint(
        path or case["path"],
        case["arch"],
        case["img_size"],
        NUM_CLASSES,
        N_PRO,
        backbone_args=case["backbone_args"],
    )


def test_official_snapshot_matches_the_reference_forward(official_case, make_images):
    model = _load(official_case)
    assert not model.training
    images = make_images(official_case["kind"], batch=3)
    with torch.no_grad():
        out = model(images)
        logits, maps, fused = reference_forward(official_case["backbone"], official_case["state"], images)
    # The case must exercise the fusion: foreground regions at every stage, and some empty ones.
    occupied = [F.one_hot(m.argmax(1), m.shape[1]).flatten(1, 2).amax(1)[:, :-1] for m in maps]
    assert all(o.sum(1).min() >= 1 for o in occupied) and any((o == 0).any() for o in occupied)
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    assert len(out.concept_maps) == len(maps) == 3
    for ours, theirs in zip(out.concept_maps + out.fused_maps, maps + fused, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_bare_and_ddp_state_dicts_load_the_same(official_case, tmp_path, make_images):
    bare, ddp = tmp_path / "bare.pth", tmp_path / "ddp.pth"
    torch.save(official_case["state"], bare)
    torch.save({"model_state": {f"module.{k}": v for k, v in official_case["state"].items()}}, ddp)
    images = make_images(official_case["kind"])
    with torch.no_grad():
        expected = _load(official_case)(images).logits
        torch.testing.assert_close(_load(official_case, bare)(images).logits, expected)
        torch.testing.assert_close(_load(official_case, ddp)(images).logits, expected)


def test_every_key_problem_is_listed(official_case, tmp_path):
    state = dict(official_case["state"])
    del state["p_bias.1"]
    del state["p_linear.0.bias"]
    state["p_extra.weight"] = torch.zeros(2, 3)
    state["modulation.weight"] = torch.zeros(32, 9)
    path = tmp_path / "broken.pth"
    torch.save({"model_state": state}, path)
    with pytest.raises(CheckpointError) as error:
        _load(official_case, path)
    message = str(error.value)
    assert f"official checkpoint '{path}' does not fit the model" in message
    assert "missing keys: p_bias.1 (1, 5, 4, 4), p_linear.0.bias (32,)" in message
    assert "unexpected keys: p_extra.weight (2, 3)" in message
    assert "shape mismatches: modulation.weight file (32, 9) vs model (32, 4)" in message
    assert "\n" not in message


def test_unreadable_files_are_reported(tmp_path, official_case):
    with pytest.raises(CheckpointError, match="official checkpoint '.*nothing.pth' does not exist"):
        _load(official_case, tmp_path / "nothing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read by torch.load"):
        _load(official_case, garbage)
    not_a_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(CheckpointError, match="expected a dict with 'model_state'"):
        _load(official_case, not_a_state)


def test_convert_official_writes_an_ivpt_checkpoint_that_rebuilds_the_model(official_case, tmp_path, make_images):
    out = tmp_path / "converted" / "ivpt.pt"
    written = convert_official(
        official_case["path"],
        official_case["arch"],
        official_case["img_size"],
        NUM_CLASSES,
        N_PRO,
        out,
        backbone_args=official_case["backbone_args"],
    )
    assert written == out and [p.name for p in out.parent.iterdir()] == ["ivpt.pt"]
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert list(checkpoint) == ["format", "version", "config", "class_names", "part_names", "model", "frozen", "sha256"]
    assert checkpoint["format"] == "ivpt" and checkpoint["version"] == 2
    # The snapshot's backbone is the authors', so every tensor is stored; the digest covers them all.
    assert checkpoint["frozen"]["keys"] == [] and checkpoint["model"].keys() == build_model(
        Config.from_dict(checkpoint["config"]), NUM_CLASSES
    ).state_dict().keys()
    assert checkpoint["sha256"] == payload_digest(checkpoint)
    assert checkpoint["class_names"] == [str(i) for i in range(NUM_CLASSES)] and checkpoint["part_names"] == []
    cfg = Config.from_dict(checkpoint["config"])
    assert cfg.model.arch == official_case["arch"] and cfg.model.n_pro == N_PRO
    assert cfg.model.method == "ivpt" and cfg.model.pretrained is False

    rebuilt = build_model(cfg, NUM_CLASSES)
    rebuilt.load_state_dict(checkpoint["model"])
    images = make_images(official_case["kind"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images).logits, _load(official_case)(images).logits)
