"""The config system: defaults <- YAML <- key=value, with typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ivpt.config import Config, load_config, preset_names, resolve_config_file
from ivpt.errors import ConfigError
from ivpt.model.preprocessing import Preprocessing, preprocessing_of

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "src" / "ivpt" / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert cfg.model.n_pro == (17, 14, 11, 8, 5)
    assert cfg.model.arch == "vit_base_patch14_reg4_dinov2.lvd142m"
    # Input size and normalisation come from the backbone's timm pretrained config unless set.
    assert cfg.model.img_size is None and cfg.data.mean is None and cfg.data.std is None
    assert preprocessing_of(cfg) == Preprocessing(518, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (cfg.optim.lr_head, cfg.optim.lr_prototypes, cfg.optim.grad_clip) == (1e-2, 2e-4, 2.0)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.seed) == (25, 16, 42)


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 7, "batch_size": 4}, "model": {"n_pro": [6, 5]}}))
    cfg = load_config(path, ["train.epochs=3", "model.pretrained=false", "data.root=/x/y"])
    assert cfg.train.epochs == 3  # override beats YAML
    assert cfg.train.batch_size == 4  # YAML beats default
    assert cfg.model.n_pro == (6, 5)  # list -> tuple
    assert cfg.model.pretrained is False
    assert cfg.data.root == "/x/y"
    assert cfg.train.precision == "fp32"  # untouched default


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["model.backbone_args={depth: 2, embed_dim: 32}", "optim.betas=[0.8,0.9]"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert cfg.model.backbone_args == {"depth": 2, "embed_dim": 32}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key 'train.epoch'; known keys in 'train': epochs"),
        ("trian.epochs=3", "unknown config key 'trian.epochs'"),
        ("train.epochs=three", "config key 'train.epochs': expected int, got 'three'"),
        ("train.epochs=2.5", "config key 'train.epochs': expected int, got 2.5"),
        ("model.pretrained=maybe", "config key 'model.pretrained': expected bool"),
        ("train.precision=fp8", "config key 'train.precision': expected one of fp32, bf16, fp16"),
        ("model.method=resnet", "expected one of ivpt, vpt_shallow"),
        ("model.n_pro=[5,x]", "config key 'model.n_pro': expected a list of int"),
        ("model.n_pro=[5,1]", "every stage needs at least 2 prototypes"),
        ("data.val_fraction=1.5", "'data.val_fraction': must be in [0, 1)"),
        ("train.batch_size=0", "'train.batch_size': must be >= 1"),
        ("epochs", "expected key=value"),
        ("model.cache_features=true", "'model.cache_features': data.augment=paper draws a new random crop"),
        # Values that cannot work (the default arch, vit_base_patch14_reg4_dinov2, has 14 x 14 patches).
        ("model.img_size=10", "'model.img_size': 10 px is smaller than one 14 x 14 patch of 'vit_base_patch14_reg4"),
        ("optim.lr_head=-0.01", "config key 'optim.lr_head': expected a finite number >= 0, got -0.01"),
        ("optim.lr_backbone=.inf", "config key 'optim.lr_backbone': expected a finite number >= 0, got inf"),
        ("loss.entropy=-1", "config key 'loss.entropy': expected a finite number >= 0, got -1.0"),
        ("optim.step_gamma=0", "config key 'optim.step_gamma': expected a finite number > 0, got 0.0"),
        ("data.num_workers=-1", "config key 'data.num_workers': expected a finite number >= 0, got -1"),
        ("optim.betas=[0.9,1.0]", "config key 'optim.betas': expected two numbers in [0, 1), got [0.9, 1.0]"),
        ("data.std=[0.2,0,0.2]", "config key 'data.std': expected three numbers > 0, got [0.2, 0.0, 0.2]"),
        ("loss.label_smoothing=1", "config key 'loss.label_smoothing': expected a number in [0, 1), got 1.0"),
    ],
)
def test_bad_overrides_name_the_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' is a directory, expected a YAML file"):
        load_config(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml' is not valid YAML"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle:\n  arch: x\n")
    with pytest.raises(ConfigError, match="unknown.yaml: unknown config section 'modle'"):
        load_config(unknown)
    typed = tmp_path / "typed.yaml"
    typed.write_text("train:\n  epochs: '3'\n")
    with pytest.raises(ConfigError, match="typed.yaml.*'train.epochs': expected int"):
        load_config(typed)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.model.img_size > 0 and len(cfg.model.n_pro) >= 1


def test_required_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"cub_dinov2_b.yaml", "cub_deit_s.yaml", "nabirds_dinov2_b.yaml", "synthetic_tiny.yaml"} <= names


def test_presets_are_named_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert preset_names() == sorted(p.stem for p in PRESETS)
    by_name = load_config("cub_deit_s")
    assert by_name == load_config("cub_deit_s.yaml") == load_config(REPO / "src/ivpt/configs/cub_deit_s.yaml")
    assert by_name.model.arch == "deit_small_patch16_224.fb_in1k"


def test_a_local_file_shadows_a_preset_and_unknown_names_list_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("cub_deit_s.yaml").write_text("train:\n  epochs: 3\n")
    assert resolve_config_file("cub_deit_s.yaml") == Path("cub_deit_s.yaml")
    assert load_config("cub_deit_s.yaml").train.epochs == 3
    with pytest.raises(ConfigError, match="'cub_dino' does not exist and is not a preset; presets: cub_deit_s, "):
        load_config("cub_dino")
    # A path with a folder is never taken for a preset name.
    with pytest.raises(ConfigError, match="'sub/cub_deit_s.yaml' does not exist"):
        load_config("sub/cub_deit_s.yaml")


def test_public_key_names_are_stable():
    """Scripts outside the project use these keys."""
    keys = [
        "data.dataset", "data.root", "model.arch", "model.img_size", "model.n_pro", "model.method",
        "model.pretrained", "train.epochs", "train.max_steps", "train.batch_size", "train.precision",
        "train.device", "train.out_dir",
    ]
    cfg = Config()
    for key in keys:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


def test_the_suite_cannot_download_weights():
    """conftest.py blocks the URL downloads HF_HUB_OFFLINE does not cover."""
    import os

    import timm.models._builder
    import torch

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for download in (torch.hub.load_state_dict_from_url, timm.models._builder.load_state_dict_from_url):
        with pytest.raises(RuntimeError, match="tests must not download weights"):
            download("https://example.invalid/weights.pth")


def test_the_patch_size_comes_from_backbone_args_before_the_name():
    tiny = ["model.arch=vit_tiny_patch16_224", "model.backbone_args={patch_size: 8}"]
    assert load_config(None, [*tiny, "model.img_size=8"]).model.img_size == 8  # one 8 x 8 patch is enough
    with pytest.raises(ConfigError, match="7 px is smaller than one 8 x 8 patch"):
        load_config(None, [*tiny, "model.img_size=7"])
    # A name without a patch size (the demo ViT) is not guessed at.
    assert load_config(None, ["model.arch=ivpt_demo_vit", "model.img_size=4"]).model.img_size == 4


def test_a_mapping_written_without_the_space_after_a_colon_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'patch_size:8' reads as a key with no value.*\{patch_size: 8\}"):
        load_config(None, ["model.backbone_args={patch_size:8}"])
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  backbone_args: {depth:2}\n")
    with pytest.raises(ConfigError, match=rf"{config}: config key 'model.backbone_args': 'depth:2'"):
        load_config(config)
    assert load_config(None, ["model.backbone_args={patch_size: 8}"]).model.backbone_args == {"patch_size": 8}
