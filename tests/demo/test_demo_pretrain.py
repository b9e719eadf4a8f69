"""``ivpt pretrain-backbone`` and the cached synthetic data sets of the demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from ivpt.config import Config
from ivpt.data import load_annotations
from ivpt.demo.backbone import DEMO_ARCH
from ivpt.demo.data import ensure_synthetic
from ivpt.demo.pretrain import (
    APPEARANCE_DIMS,
    _PretrainSamples,
    appearance_targets,
    attribute_targets,
    part_cluster_nmi,
    part_shares,
    pretrain_backbone,
    probe_accuracy,
    weight_file_recipe,
)
from ivpt.errors import IVPTError


def test_ensure_synthetic_reuses_identical_sets_and_regenerates_changed_ones(tmp_path: Path) -> None:
    root = tmp_path / "data"
    settings = dict(num_classes=2, per_class=2, size=32, seed=3)
    assert ensure_synthetic(root, **settings) == (root, True)
    first_image = sorted((root / "images").rglob("*.jpg"))[0]
    stamp = first_image.stat().st_mtime_ns
    assert ensure_synthetic(root, **settings) == (root, False)
    assert first_image.stat().st_mtime_ns == stamp
    assert ensure_synthetic(root, **{**settings, "per_class": 3}) == (root, True)
    assert json.loads((root / "synthetic.json").read_text())["images"] == 6
    assert ensure_synthetic(root, **{**settings, "per_class": 3, "family": "pretrain"}) == (root, True)
    assert json.loads((root / "synthetic.json").read_text())["family"] == "pretrain"


def test_pretrain_writes_a_loadable_reproducible_backbone(tmp_path: Path) -> None:
    # 3 classes x 6 images: 9 training images, two batches of 4 per epoch.
    options = dict(seed=5, epochs=1, num_classes=3, per_class=6, batch_size=4, diagnose=False, progress=False)
    first = pretrain_backbone(tmp_path / "a.safetensors", data_dir=tmp_path / "data", **options)
    second = pretrain_backbone(tmp_path / "b.safetensors", data_dir=tmp_path / "data", **options)
    assert first == tmp_path / "a.safetensors"
    tensors_a, tensors_b = load_file(str(first)), load_file(str(second))
    assert set(tensors_a) == set(tensors_b)
    assert not any(name.startswith("head.") for name in tensors_a)
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    recipe = weight_file_recipe(first)
    assert recipe["seed"] == 5 and recipe["epochs"] == 1 and recipe["num_classes"] == 3
    assert recipe["train_images"] == 9 and recipe["test_images"] == 9
    assert recipe["command"] == "ivpt pretrain-backbone --out a.safetensors --seed 5 --epochs 1"
    # A package file: world-readable whatever the umask.
    assert first.stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "data" / "synthetic.json").read_text())["family"] == "pretrain"

    model = timm.create_model(DEMO_ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(first)))
    assert torch.equal(model.pos_embed.detach(), tensors_a["pos_embed"])
    # Training moved the weights away from a fresh initialisation with the same seed.
    torch.manual_seed(5)
    fresh = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0)
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, tensors_a["blocks.0.attn.qkv.weight"])


def test_pretrain_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(IVPTError, match=r"output '.*weights\.pt' must be a \.safetensors file"):
        pretrain_backbone(tmp_path / "weights.pt")
    with pytest.raises(IVPTError, match="--epochs must be at least 1, got 0"):
        pretrain_backbone(tmp_path / "w.safetensors", epochs=0)
    assert not any(tmp_path.iterdir())


def test_recipe_of_a_file_without_metadata_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(IVPTError, match=r"weight file '.*bare\.safetensors' has no pretraining recipe"):
        weight_file_recipe(path)


def test_attribute_targets_decode_the_class_names() -> None:
    from ivpt.data.synthetic import FAMILIES, class_definitions

    targets, sizes = attribute_targets("pretrain", 100)
    assert sizes == (5, 4, 5) and targets.shape == (100, 3)
    # All 100 attribute combinations, each once.
    assert len({tuple(row) for row in targets.tolist()}) == 100
    axes = FAMILIES["pretrain"].axes
    name, chosen = class_definitions("pretrain", 100)[17]
    decoded = {axis: list(values)[int(i)] for (axis, values), i in zip(axes.items(), targets[17], strict=True)}
    assert decoded == chosen, name


def test_pretrain_samples_flip_the_image_and_its_part_map_together(tmp_path: Path) -> None:
    root, _ = ensure_synthetic(tmp_path / "data", num_classes=2, per_class=2, size=64, seed=0, family="pretrain")
    cfg = Config()
    cfg.data.dataset, cfg.data.root = "cub", str(root)
    annotations = load_annotations(cfg.data)
    plain = _PretrainSamples(annotations, np.arange(4), flip=False)[0]
    assert plain["image"].shape == (3, 64, 64) and plain["part_ids"].shape == (64, 64)
    mask_path = root / "part_masks" / annotations.image_paths[0].relative_to(root / "images").with_suffix(".png")
    assert torch.equal(plain["part_ids"], torch.from_numpy(np.asarray(Image.open(mask_path)).astype(np.int64)))

    flipping = _PretrainSamples(annotations, np.arange(4), flip=True)
    outcomes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        sample = flipping[0]
        flipped = not torch.equal(sample["image"], plain["image"])
        if flipped:
            assert torch.equal(sample["image"], plain["image"].flip(-1))
            assert torch.equal(sample["part_ids"], plain["part_ids"].flip(-1))
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_part_shares_count_the_pixels_of_each_part_in_every_sub_cell() -> None:
    part_ids = torch.randint(0, 9, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    shares = part_shares(part_ids, num_parts=8, stride=8, split=2)
    assert shares.shape == (2, 4, 4, 9)
    torch.testing.assert_close(shares.sum(dim=-1), torch.ones(2, 4, 4))
    # Known answer: token 1 is the top-right 8 x 8 cell; its sub-cell 2 is that cell's bottom-left 4 x 4.
    counts = torch.bincount(part_ids[1, 4:8, 8:12].flatten(), minlength=9).float() / 16.0
    torch.testing.assert_close(shares[1, 1, 2], counts)
    whole = part_shares(part_ids, num_parts=8, stride=8, split=1)
    torch.testing.assert_close(whole[:, :, 0], shares.mean(dim=2))


def test_appearance_targets_are_cell_colours_spread_and_texture() -> None:
    images = torch.zeros(1, 3, 16, 8)
    images[0, 0, :8, :4] = 1.0  # token 0: red channel 1 in its left half only
    images[0, 2, 8:] = torch.tensor([0.0, 2.0]).repeat(8, 4)  # token 1: blue stripes alternating per column
    target = appearance_targets(images, stride=8, split=2)
    assert target.shape == (1, 2, APPEARANCE_DIMS)
    red, blue = target[0, 0], target[0, 1]
    # Sub-cell means, raster order, three channels each: the left sub-cells are red.
    torch.testing.assert_close(red[:12].reshape(4, 3)[:, 0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(red[12:15], torch.tensor([0.5, 0.0, 0.0]))  # std of a half-on channel
    torch.testing.assert_close(blue[12:15], torch.tensor([0.0, 0.0, 1.0]))
    # Alternating columns: horizontal difference 2 on 7 of 8 columns (the last is padded), averaged over channels.
    torch.testing.assert_close(blue[15], torch.tensor(2.0 / 3.0 * 7.0 / 8.0))
    assert blue[16] < 0.2  # rows repeat; only the cell boundary with token 0 differs


def test_part_cluster_nmi_is_100_for_features_that_name_the_part_and_low_for_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    parts = torch.randint(1, 5, (30, 16), generator=generator)
    shares = torch.nn.functional.one_hot(parts, 5).float()
    shares[:, :4] = torch.nn.functional.one_hot(torch.zeros(30, 4, dtype=torch.long), 5).float()  # background
    separable = torch.nn.functional.one_hot(parts, 5).float() * 10.0
    assert part_cluster_nmi(separable, shares, num_clusters=4) == pytest.approx(100.0)
    noise = torch.randn(30, 16, 8, generator=generator)
    assert part_cluster_nmi(noise, shares, num_clusters=4) < 10.0
    with pytest.raises(IVPTError, match="2 foreground tokens are fewer than 4 clusters"):
        part_cluster_nmi(noise[:1, :2], shares[:1, 4:6], num_clusters=4)


def test_probe_accuracy_separates_separable_classes() -> None:
    labels = torch.arange(40) % 2
    features = torch.stack([labels.float() * 4.0 - 2.0, torch.zeros(40)], dim=1)
    is_train = torch.arange(40) < 20
    assert probe_accuracy(features, labels, is_train) == 100.0


def test_centroid_logits_are_negative_squared_distances_like_concept_maps() -> None:
    from ivpt.demo.pretrain import _PretrainModel

    backbone = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0)
    model = _PretrainModel(backbone, sizes=(5, 4, 5), num_parts=8)
    tokens = torch.randn(2, 64, backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.part_centroids.copy_(tokens[0, :9])
        part_logits, centroid_logits, appearance = model.dense(tokens)
    assert part_logits.shape == (2, 64, 4, 9) and appearance.shape == (2, 64, APPEARANCE_DIMS)
    expected = -torch.cdist(tokens, model.part_centroids.detach().expand(2, -1, -1)).square()
    torch.testing.assert_close(centroid_logits, expected, rtol=1e-4, atol=1e-3)
    # Token k of image 0 is centroid k itself: its own centroid is the nearest.
    assert torch.equal(centroid_logits[0, :9].argmax(dim=-1), torch.arange(9))
