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
from ivpt.demo.pretrain import _PretrainSamples, attribute_targets, pretrain_backbone, weight_file_recipe
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
    options = dict(seed=5, epochs=1, num_classes=3, per_class=6, batch_size=4, progress=False)
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


def test_pretrain_samples_give_the_part_share_under_every_patch(tmp_path: Path) -> None:
    root, _ = ensure_synthetic(tmp_path / "data", num_classes=2, per_class=2, size=64, seed=0, family="pretrain")
    cfg = Config()
    cfg.data.dataset, cfg.data.root = "cub", str(root)
    annotations = load_annotations(cfg.data)
    plain = _PretrainSamples(annotations, np.arange(4), patch_size=8, flip=False)[0]
    assert plain["image"].shape == (3, 64, 64) and plain["parts"].shape == (64, 1 + 8)
    torch.testing.assert_close(plain["parts"].sum(dim=1), torch.ones(64))
    mask_path = root / "part_masks" / annotations.image_paths[0].relative_to(root / "images").with_suffix(".png")
    part_ids = np.asarray(Image.open(mask_path))
    # Known answer: the top-left patch's shares are the pixel counts of each id in its 8 x 8 block.
    counts = np.bincount(part_ids[:8, :8].ravel(), minlength=9) / 64.0
    torch.testing.assert_close(plain["parts"][0], torch.from_numpy(counts).float())

    flipping = _PretrainSamples(annotations, np.arange(4), patch_size=8, flip=True)
    mirrored_parts = plain["parts"].reshape(8, 8, 9).flip(1).reshape(64, 9)
    outcomes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        sample = flipping[0]
        flipped = not torch.equal(sample["image"], plain["image"])
        if flipped:
            assert torch.equal(sample["image"], plain["image"].flip(-1))
            torch.testing.assert_close(sample["parts"], mirrored_parts)
        outcomes.add(flipped)
    assert outcomes == {True, False}
