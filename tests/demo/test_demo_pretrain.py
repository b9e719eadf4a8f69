"""``ivpt pretrain-backbone`` and the cached synthetic data sets of the demo."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from ivpt.cli import main
from ivpt.data.synthetic import render_synthetic
from ivpt.demo.data import ensure_synthetic
from ivpt.demo.pretrain import (
    APPEARANCE,
    _DeviceImages,
    appearance_targets,
    attribute_probes,
    attribute_targets,
    descriptor_statistics,
    loss_weights,
    part_centroid_nmi,
    part_cluster_nmi,
    part_descriptors,
    part_pooled_features,
    part_shares,
    pretrain_backbone,
    probe_accuracy,
    weight_file_recipe,
)
from ivpt.demo.recipe import PretrainRecipe
from ivpt.errors import IVPTError
from ivpt.model.demo_vit import DEMO_ARCH

# 3 classes x 8 images, 2 held out per class: 18 training images, four batches of 4 per epoch.
# The class-defined "pretrain" family with its attribute term (the recipe of the earlier shipped files).
TINY = PretrainRecipe(
    seed=5,
    epochs=1,
    num_classes=3,
    per_class=8,
    test_per_class=2,
    batch_size=4,
    family="pretrain",
    attribute_weight=0.1,
    part_appearance_weight=0.0,
    distill_weight=0.0,
    compute=None,
    snapshots=(),
)


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
    options = dict(data_dir=tmp_path / "data", device="cpu", diagnose=False, progress=False)
    first = pretrain_backbone(tmp_path / "a.safetensors", TINY, **options)
    cache = sorted((tmp_path / "data").iterdir())
    assert [path.name for path in cache] == ["pretrain_seed1005_64px_3x8_test2.npz"]
    stamp = cache[0].stat().st_mtime_ns
    second = pretrain_backbone(tmp_path / "b.safetensors", TINY, **{**options, "workers": 2})
    assert cache[0].stat().st_mtime_ns == stamp  # the second run read the cached images
    assert first == tmp_path / "a.safetensors"
    tensors_a, tensors_b = load_file(str(first)), load_file(str(second))
    assert set(tensors_a) == set(tensors_b)
    assert not any(name.startswith("head.") for name in tensors_a)
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    recipe = weight_file_recipe(first)
    assert recipe["seed"] == 5 and recipe["epochs"] == 1 and recipe["num_classes"] == 3
    assert recipe["epochs_completed"] == 1 and recipe["precision"] == "fp32" and recipe["device"] == "cpu"
    assert recipe["train_images"] == 18 and recipe["test_images"] == 6
    assert recipe["command"] == (
        "ivpt pretrain-backbone --out a.safetensors --seed 5 --epochs 1 --num-classes 3 --per-class 8 "
        "--test-per-class 2 --batch-size 4 --attribute-weight 0.1 --part-appearance-weight 0.0 --family pretrain "
        "--compute none --snapshots none"
    )
    # A package file: world-readable whatever the umask.
    assert first.stat().st_mode & 0o777 == 0o644

    model = timm.create_model(DEMO_ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(first)))
    assert torch.equal(model.pos_embed.detach(), tensors_a["pos_embed"])
    # Training moved the weights away from a fresh initialisation with the same seed.
    torch.manual_seed(5)
    fresh = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0)
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, tensors_a["blocks.0.attn.qkv.weight"])


def test_loss_weights_come_from_the_recipe_and_change_what_is_trained(tmp_path: Path) -> None:
    weights = loss_weights(TINY)
    assert weights == {
        "attributes": 0.1,
        "parts": 1.0,
        "geometry": 1.0,
        "appearance": 1.0,
        "part_appearance": 0.0,
        "distill_cls": 0.0,
        "distill_patch": 0.0,
    }
    default = loss_weights(PretrainRecipe())
    assert default["part_appearance"] == 1.0 and default["attributes"] == 0 and default["distill_cls"] == 0
    assert loss_weights(PretrainRecipe(distill_weight=0.5))["distill_patch"] == 0.5
    assert loss_weights(PretrainRecipe(appearance_weight=10.0))["appearance"] == 10.0
    assert loss_weights(PretrainRecipe(attribute_weight=0.0))["attributes"] == 0.0
    assert loss_weights(PretrainRecipe(part_appearance_weight=2.0))["part_appearance"] == 2.0
    options = dict(device="cpu", diagnose=False, progress=False)
    default = load_file(str(pretrain_backbone(tmp_path / "default.safetensors", TINY, **options)))
    for name, value in (("appearance_weight", 10.0), ("attribute_weight", 0.0), ("part_appearance_weight", 1.0)):
        recipe = PretrainRecipe(**{**TINY.__dict__, name: value})
        path = pretrain_backbone(tmp_path / f"{name}.safetensors", recipe, **options)
        written = weight_file_recipe(path)
        # The command names every value that differs from the default recipe's.
        shown = f"--{name.replace('_', '-')} {value}" in written["command"]
        assert written[name] == value and shown == (value != getattr(PretrainRecipe(), name))
        changed = load_file(str(path))
        assert not torch.equal(changed["blocks.0.attn.qkv.weight"], default["blocks.0.attn.qkv.weight"]), name


def test_max_minutes_saves_after_the_epoch_that_passes_it(tmp_path: Path) -> None:
    recipe = PretrainRecipe(**{**TINY.__dict__, "epochs": 3})
    path = pretrain_backbone(
        tmp_path / "w.safetensors", recipe, device="cpu", diagnose=False, progress=False, max_minutes=0
    )
    written = weight_file_recipe(path)
    assert written["epochs"] == 3 and written["epochs_completed"] == 1


def test_wider_backbone_records_its_size_and_the_demo_builds_it(tmp_path: Path) -> None:
    from ivpt.demo.run import FAST_PLAN, backbone_file_overrides, demo_config

    path = pretrain_backbone(
        tmp_path / "wide.safetensors",
        TINY,
        device="cpu",
        diagnose=False,
        progress=False,
        arch_args={"embed_dim": 48, "num_heads": 2},
    )
    overrides = backbone_file_overrides(path)
    assert overrides == [f"model.pretrained_file={path.resolve()}", "model.backbone_args={embed_dim: 48, num_heads: 2}"]
    cfg = demo_config("ivpt", FAST_PLAN, tmp_path / "data", tmp_path / "run", backbone_file=path)
    assert cfg.model.backbone_args == {"embed_dim": 48, "num_heads": 2}
    from ivpt.model import build_model

    model = build_model(cfg, num_classes=3)
    assert torch.equal(model.backbone.pos_embed.detach(), load_file(str(path))["pos_embed"])


def test_token_stride_8_backbone_records_it_and_the_demo_builds_its_8x8_grid(tmp_path: Path) -> None:
    from ivpt.demo.run import FAST_PLAN, backbone_file_overrides, demo_config
    from ivpt.model import build_model

    recipe = PretrainRecipe(**{**TINY.__dict__, "token_stride": 8})
    path = pretrain_backbone(tmp_path / "coarse.safetensors", recipe, device="cpu", diagnose=False, progress=False)
    written = weight_file_recipe(path)
    assert written["token_stride"] == 8 and "--batch-size 4 --attribute-weight" in written["command"]
    assert "--token-stride 8" in written["command"]
    assert backbone_file_overrides(path) == [
        f"model.pretrained_file={path.resolve()}",
        "model.backbone_args={token_stride: 8}",
    ]
    cfg = demo_config("ivpt", FAST_PLAN, tmp_path / "data", tmp_path / "run", backbone_file=path)
    model = build_model(cfg, num_classes=3)
    assert tuple(model.backbone.patch_embed.grid_size) == (8, 8)
    tensors = load_file(str(path))
    assert tensors["pos_embed"].shape == (1, 1 + 8 * 8, 96)
    assert torch.equal(model.backbone.pos_embed.detach(), tensors["pos_embed"])
    # A file at the default stride needs no backbone_args.
    default = pretrain_backbone(tmp_path / "fine.safetensors", TINY, device="cpu", diagnose=False, progress=False)
    assert weight_file_recipe(default)["token_stride"] == 4
    assert backbone_file_overrides(default) == [f"model.pretrained_file={default.resolve()}"]


def test_files_from_before_the_token_stride_option_load_at_their_stride_of_8(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ivpt.demo.run import backbone_file_overrides
    from ivpt.model.demo_vit import DEMO_VIT_ARGS

    older = tmp_path / "older.safetensors"
    metadata = {"arch": DEMO_ARCH, "arch_args": json.dumps({**DEMO_VIT_ARGS, "stem_channels": [24]}), "recipe": "{}"}
    save_file({"x": torch.zeros(1)}, str(older), metadata=metadata)
    assert backbone_file_overrides(older) == [
        f"model.pretrained_file={older.resolve()}",
        "model.backbone_args={token_stride: 8}",
    ]


def test_demo_rejects_backbone_files_it_cannot_use(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ivpt.demo.run import backbone_file_overrides

    with pytest.raises(IVPTError, match=r"backbone file '.*missing\.safetensors' does not exist"):
        backbone_file_overrides(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(IVPTError, match="was not written by 'ivpt pretrain-backbone'"):
        backbone_file_overrides(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(IVPTError, match="is not a safetensors file"):
        backbone_file_overrides(garbage)


def test_pretrain_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(IVPTError, match=r"output '.*weights\.pt' must be a \.safetensors file"):
        pretrain_backbone(tmp_path / "weights.pt")
    with pytest.raises(IVPTError, match="--epochs must be at least 1, got 0"):
        pretrain_backbone(tmp_path / "w.safetensors", PretrainRecipe(epochs=0))
    with pytest.raises(IVPTError, match=r"--test-per-class \(8\) must be below --per-class \(8\)"):
        pretrain_backbone(tmp_path / "w.safetensors", PretrainRecipe(per_class=8, test_per_class=8))
    with pytest.raises(IVPTError, match="--lr must be positive, got 0.0"):
        pretrain_backbone(tmp_path / "w.safetensors", PretrainRecipe(lr=0.0))
    with pytest.raises(IVPTError, match="--token-stride must be one of 2, 4, 8, got 16"):
        pretrain_backbone(tmp_path / "w.safetensors", PretrainRecipe(token_stride=16))
    with pytest.raises(IVPTError, match=r"set the token stride in the recipe \(--token-stride\), not in arch_args"):
        pretrain_backbone(tmp_path / "w.safetensors", TINY, arch_args={"token_stride": 4})
    with pytest.raises(IVPTError, match="pretrain-backbone --device: 'tpu' is not a device"):
        pretrain_backbone(tmp_path / "w.safetensors", TINY, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(IVPTError, match="--device: 'cuda' asked for, but CUDA is not available"):
            pretrain_backbone(tmp_path / "w.safetensors", TINY, device="cuda")
    with pytest.raises(IVPTError, match="21 training images are fewer than one batch of 64"):
        pretrain_backbone(
            tmp_path / "w.safetensors", PretrainRecipe(num_classes=3, per_class=9, test_per_class=2, batch_size=64)
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--per-class", "4", "--test-per-class", "4"], r"--test-per-class \(4\) must be below --per-class \(4\)"),
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--device", "tpu"], "--device: 'tpu' is not a device"),
        (["--token-stride", "3"], "--token-stride must be one of 2, 4, 8, got 3"),
        (["--appearance-weight", "-1"], "--appearance-weight must be a finite number >= 0, got -1.0"),
        (["--attribute-weight", "nan"], "--attribute-weight must be a finite number >= 0, got nan"),
        (["--part-appearance-weight", "-0.5"], "--part-appearance-weight must be a finite number >= 0, got -0.5"),
    ],
)
def test_cli_hands_each_option_to_the_recipe(
    options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each option reaches the checks that run before any image is drawn: a one-line error, exit 2.
    assert main(["pretrain-backbone", "--out", str(tmp_path / "w.safetensors"), *options]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error) and "Traceback" not in error
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


def test_device_images_flip_the_image_and_its_part_map_together() -> None:
    data = render_synthetic(num_classes=2, per_class=2, size=64, seed=0, family="pretrain")
    images = _DeviceImages(data, np.arange(4), torch.device("cpu"))
    plain = images.batch(torch.tensor([1, 2]))
    assert plain["image"].shape == (2, 3, 64, 64) and plain["part_ids"].dtype == torch.int64
    assert torch.equal(plain["part_ids"], torch.from_numpy(data.part_ids[[1, 2]]).long())
    assert plain["label"].tolist() == data.labels[[1, 2]].tolist()
    # Normalised with the ImageNet statistics the backbone was built with.
    red = (data.images[1, ..., 0] / 255.0 - 0.485) / 0.229
    torch.testing.assert_close(plain["image"][0, 0], torch.from_numpy(red).float())
    flipped = images.batch(torch.tensor([1, 2]), flip=torch.tensor([True, False]))
    assert torch.equal(flipped["image"][0], plain["image"][0].flip(-1))
    assert torch.equal(flipped["part_ids"][0], plain["part_ids"][0].flip(-1))
    assert torch.equal(flipped["image"][1], plain["image"][1])


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


def test_part_descriptors_give_colour_spread_texture_and_shape_of_each_part() -> None:
    images = torch.zeros(1, 3, 12, 16)
    part_ids = torch.zeros(1, 12, 16, dtype=torch.long)
    part_ids[0, 2:4, 1:9] = 1  # a plain 2 x 8 bar of colour (0.5, -0.2, 0.1)
    images[0, :, 2:4, 1:9] = torch.tensor([0.5, -0.2, 0.1]).view(3, 1, 1)
    part_ids[0, 6:10, 4:8] = 3  # a 4 x 4 square striped column by column, green 0 / 2
    images[0, 1, 6:10, 4:8] = torch.tensor([0.0, 2.0, 0.0, 2.0])
    descriptors, pixels = part_descriptors(images, part_ids, num_parts=4)
    assert descriptors.shape == (1, 4, 17) and pixels.tolist() == [[16.0, 0.0, 16.0, 0.0]]
    assert torch.isfinite(descriptors).all()  # absent parts too
    bar, square = descriptors[0, 0], descriptors[0, 2]
    torch.testing.assert_close(bar[:3], torch.tensor([0.5, -0.2, 0.1]))
    torch.testing.assert_close(bar[3:6], torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(square[:3], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(square[3:6], torch.tensor([0.0, 1.0, 0.0]), atol=1e-3, rtol=0)
    # Texture: the channel-mean difference to the pixel 1, then 2 away to the right, below, below-right and
    # below-left, averaged over the part (neighbours outside the square are 0). One column on, the
    # stripes always differ by 2 / 3; two columns on only at the square's edge.
    expected = torch.tensor([2 / 3, 1 / 12, 7 / 12, 11 / 24, 1 / 6, 1 / 6, 1 / 4, 1 / 4])
    torch.testing.assert_close(square[6:14], expected)
    # Shape: each is half of the creature; the bar is long and thin, the square round.
    torch.testing.assert_close(bar[14], torch.tensor(0.5).log())
    torch.testing.assert_close(square[14], torch.tensor(0.5).log())
    torch.testing.assert_close(bar[15:17].exp() * 16, torch.tensor([(64 - 1) / 12, (4 - 1) / 12]))
    torch.testing.assert_close(square[15:17].exp() * 16, torch.tensor([(16 - 1) / 12, (16 - 1) / 12]))


def test_descriptor_statistics_standardise_the_parts_present() -> None:
    data = render_synthetic(num_classes=2, per_class=4, size=64, seed=1, family="pretrain")
    images = _DeviceImages(data, np.arange(8), torch.device("cpu"))
    mean, std = descriptor_statistics(images, num_parts=8, batch_size=3)
    batch = images.batch(torch.arange(8))
    descriptors, pixels = part_descriptors(batch["image"], batch["part_ids"], 8)
    present = descriptors[pixels > 0]
    torch.testing.assert_close(mean, present.mean(dim=0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std, present.std(dim=0, unbiased=False), atol=1e-4, rtol=1e-4)


def _two_tokens() -> torch.Tensor:
    images = torch.zeros(1, 3, 16, 8)
    images[0, 0, :8, :4] = 1.0  # token 0: red channel 1 in its left half only
    images[0, 2, 8:] = torch.tensor([0.0, 2.0]).repeat(8, 4)  # token 1: blue stripes alternating per column
    return images


def test_cell_appearance_is_quarter_colours_spread_and_texture() -> None:
    target = appearance_targets(_two_tokens(), stride=8, style="cell")
    assert target.shape == (1, 2, 12 + 3 + 2) and APPEARANCE["cell"].dims == 17
    red, blue = target[0, 0], target[0, 1]
    # Sub-cell means, raster order, three channels each: the left sub-cells are red.
    torch.testing.assert_close(red[:12].reshape(4, 3)[:, 0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(red[12:15], torch.tensor([0.5, 0.0, 0.0]))  # std of a half-on channel
    torch.testing.assert_close(blue[12:15], torch.tensor([0.0, 0.0, 1.0]))
    # Alternating columns: horizontal difference 2 on 7 of 8 columns (the border repeats itself),
    # averaged over the channels; rows repeat, so nothing vertically.
    assert blue[15] == pytest.approx(2.0 / 3.0 * 7.0 / 8.0)
    assert blue[16] == pytest.approx(0.0)


def test_rich_appearance_adds_finer_colour_diagonals_and_a_second_distance() -> None:
    target = appearance_targets(_two_tokens(), stride=8, style="rich")
    assert target.shape == (1, 2, 48 + 3 + 8) and APPEARANCE["rich"].dims == 59
    red, blue = target[0, 0], target[0, 1]
    # 4 x 4 sub-cells of 2 x 2 pixels: the red half covers the first two of every row of sub-cells.
    torch.testing.assert_close(red[:48].reshape(16, 3)[:, 0], torch.tensor([1.0, 1.0, 0.0, 0.0] * 4))
    right, down, down_right, down_left = blue[51:55].tolist()
    assert right == pytest.approx(2.0 / 3.0 * 7.0 / 8.0) and down == pytest.approx(0.0)
    # Diagonal neighbours are one column over too (the border column repeats itself).
    assert down_right == pytest.approx(right) and down_left == pytest.approx(right)
    # At distance 2 the stripes line up again: only the border columns, which repeat, differ.
    assert blue[55] == pytest.approx(2.0 / 3.0 * 1.0 / 8.0)


def test_part_pooled_features_average_each_true_part() -> None:
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [9.0, 9.0]]])  # (1, 4 tokens, D=2)
    shares = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]]])  # bg, p1, p2
    pooled = part_pooled_features(tokens, shares)
    assert pooled.shape == (1, 4)
    # Part 1: tokens 0 and 1 equally; part 2: only token 2; the background token 3 never counts.
    torch.testing.assert_close(pooled[0], torch.tensor([2.0, 0.0, 0.0, 5.0]))
    absent = part_pooled_features(tokens, torch.tensor([[[1.0, 0.0, 0.0]] * 4]))
    assert torch.equal(absent, torch.zeros(1, 4))


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


def test_part_centroid_nmi_scores_nearest_part_means_on_held_out_images() -> None:
    generator = torch.Generator().manual_seed(1)
    parts = torch.randint(0, 4, (20, 12), generator=generator)  # 0 is background
    shares = torch.nn.functional.one_hot(parts, 4).float()
    is_train = torch.arange(20) < 10
    # Each part sits at its own point, with a little noise: its train mean is nearest to all of its tokens.
    centres = torch.eye(4) * 5.0
    features = centres[parts] + 0.1 * torch.randn(20, 12, 4, generator=generator)
    assert part_centroid_nmi(features, shares, is_train) == pytest.approx(100.0)
    # Parts 2 and 3 at the same point: ties go to one of them, and half the information is gone.
    merged = centres[parts.clamp(max=2)]
    assert 40.0 < part_centroid_nmi(merged, shares, is_train) < 80.0
    noise = torch.randn(20, 12, 4, generator=generator)
    assert part_centroid_nmi(noise, shares, is_train) < 15.0
    only_background = torch.nn.functional.one_hot(torch.zeros(20, 12, dtype=torch.long), 4).float()
    with pytest.raises(IVPTError, match="the test images have no foreground tokens"):
        part_centroid_nmi(features, only_background, is_train)


@pytest.mark.parametrize("stride", [8, 4])
def test_feature_diagnostics_score_every_block_on_the_backbones_own_grid(stride: int) -> None:
    from ivpt.demo.pretrain import feature_diagnostics

    data = render_synthetic(num_classes=3, per_class=6, size=64, seed=2)
    torch.manual_seed(0)
    backbone = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0, token_stride=stride)
    result = feature_diagnostics(backbone, data, batch_size=7)
    depth = len(backbone.blocks)
    assert len(result["part_nmi"]) == len(result["part_centroid_nmi"]) == depth
    assert all(0.0 <= value <= 100.0 for value in result["part_nmi"] + result["part_centroid_nmi"])
    shares = part_shares(torch.from_numpy(data.part_ids), int(data.part_ids.max()), stride, split=1)[:, :, 0]
    expected = (shares[..., 0] < 0.5).sum(dim=1).float().mean().item()
    assert result["foreground_tokens"] == pytest.approx(round(expected, 1))
    assert 0.0 <= result["probe_accuracy"] <= 100.0 and 0.0 <= result["part_probe_accuracy"] <= 100.0
    assert set(result["attribute_probe_accuracy"]) == {"head_colour", "wing_pattern", "beak_shape"}


def test_attribute_probes_read_each_axis_from_its_own_part_only() -> None:
    from ivpt.data.synthetic import FAMILIES, PART_ID, class_definitions

    data = render_synthetic(num_classes=10, per_class=8, size=64, seed=3)
    shares = part_shares(torch.from_numpy(data.part_ids), int(data.part_ids.max()), 4, split=1)[:, :, 0]
    # Tokens that show the head's colour where the head is, and noise everywhere else.
    colours = list(FAMILIES["default"].axes["head_colour"])
    classes = class_definitions("default", 10)
    head_colour = torch.tensor([colours.index(classes[label][1]["head_colour"]) for label in data.labels])
    generator = torch.Generator().manual_seed(0)
    tokens = 0.01 * torch.randn(len(data.labels), shares.shape[1], 8, generator=generator)
    on_head = (shares[..., PART_ID["head"]] > 0).float()
    tokens[..., : len(colours)] += (
        on_head[..., None] * torch.nn.functional.one_hot(head_colour, 8)[:, None, : len(colours)]
    )
    result = attribute_probes(tokens, shares, data, "default")
    assert set(result) == {"head_colour", "wing_pattern", "beak_shape"}
    assert result["head_colour"] == 100.0
    # The wing's and the beak's tokens carry nothing about their attributes.
    assert result["wing_pattern"] < 70.0 and result["beak_shape"] < 70.0
    # The first two classes share their wing pattern (barred): nothing to tell apart on that axis.
    two = render_synthetic(num_classes=2, per_class=6, size=64, seed=3)
    assert [attributes["wing_pattern"] for _, attributes in class_definitions("default", 2)] == ["Barred", "Barred"]
    two_shares = part_shares(torch.from_numpy(two.part_ids), 8, 4, split=1)[:, :, 0]
    two_result = attribute_probes(torch.randn(12, 256, 8, generator=generator), two_shares, two, "default")
    assert two_result["wing_pattern"] is None and two_result["head_colour"] is not None


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
    assert part_logits.shape == (2, 64, 4, 9) and appearance.shape == (2, 64, APPEARANCE["cell"].dims)
    expected = -torch.cdist(tokens, model.part_centroids.detach().expand(2, -1, -1)).square()
    torch.testing.assert_close(centroid_logits, expected, rtol=1e-4, atol=1e-3)
    # Token k of image 0 is centroid k itself: its own centroid is the nearest.
    assert torch.equal(centroid_logits[0, :9].argmax(dim=-1), torch.arange(9))


def test_epoch_order_replays_the_engines_sampler_and_per_sample_flips() -> None:
    from torch.utils.data import Dataset

    from ivpt.demo.pretrain import epoch_order
    from ivpt.engine.rng import EpochSampler, SeededSamples

    class CoinFlips(Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, index: int) -> bool:
            return bool(torch.rand(()) < 0.5)

    sampler = EpochSampler(40, seed=7)
    sampler.set_epoch(3)
    pairs = list(sampler)
    flips_by_loader = [SeededSamples(CoinFlips(), seed=7)[pair] for pair in pairs]
    before = torch.get_rng_state()
    order, flips = epoch_order(40, seed=7, epoch=3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    assert order.tolist() == [index for index, _ in pairs]
    assert flips.tolist() == flips_by_loader and 0 < int(flips.sum()) < 40
    assert order.tolist() != epoch_order(40, seed=7, epoch=4)[0].tolist()
