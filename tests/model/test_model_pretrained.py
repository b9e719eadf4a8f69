"""save_pretrained / from_pretrained: what a folder stores, loading it back (locally and from a mocked Hub),
and the clear errors for damaged, edited or foreign folders. The pretrained weights are the shipped demo
backbone's, so nothing is downloaded."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ivpt
from ivpt.config import Config
from ivpt.errors import CheckpointError, ConfigError
from ivpt.model.demo_vit import DEMO_ARCH, WEIGHTS_FILE
from ivpt.model.preprocessing import Preprocessing, preprocessing_of
from ivpt.model.pretrained import CONFIG_FILE, pretrained_keys
from ivpt.model.pretrained import WEIGHTS_FILE as MODEL_FILE

TOKENS = ("cls_token", "reg_token", "dist_token", "pos_embed")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def demo_model(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return ivpt.create_model(DEMO_ARCH, 4, n_pro=(6, 5, 4), pretrained=True, **options)


def backbone_parameters(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith("backbone.")}


@pytest.mark.parametrize(
    ("options", "stored_backbone"),
    [
        ({}, lambda m: {f"backbone.{t}" for t in TOKENS} & backbone_parameters(m)),
        ({"freeze": "frozen"}, lambda m: set()),
        ({"freeze": "full"}, backbone_parameters),
        ({"method": "linear_probe"}, lambda m: set()),
        ({"method": "vpt_deep"}, lambda m: {f"backbone.{t}" for t in TOKENS} & backbone_parameters(m)),
    ],
    ids=["tokens", "frozen", "full", "linear_probe", "vpt_deep"],
)
def test_files_store_what_trains_and_everything_outside_the_backbone(options, stored_backbone) -> None:
    model = demo_model(**options)
    state = model.state_dict()
    stored = set(state) - set(pretrained_keys(model))
    assert {k for k in stored if k.startswith("backbone.")} == stored_backbone(model)
    assert {k for k in state if not k.startswith("backbone.")} <= stored
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained <= stored


def test_a_randomly_initialised_backbone_is_stored_whole() -> None:
    torch.manual_seed(0)
    model = ivpt.create_model(DEMO_ARCH, 4, n_pro=(6, 5, 4), pretrained=False)
    assert pretrained_keys(model) == []


def test_save_and_load_give_the_same_model(tmp_path: Path) -> None:
    model = demo_model()
    with torch.no_grad():  # as if trained: a token and a prototype moved away from their start
        model.backbone.pos_embed.add_(0.25)
        model.stages[0].prototypes.mul_(-1.0)
    folder = ivpt.save_pretrained(model, tmp_path / "export", class_names=["a", "b", "c", "d"], part_names=["x"])
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, MODEL_FILE]

    stored = load_file(folder / MODEL_FILE)
    assert "backbone.pos_embed" in stored and "stages.0.prototypes" in stored
    assert "backbone.blocks.0.attn.qkv.weight" not in stored
    assert set(stored) == set(model.state_dict()) - set(pretrained_keys(model))

    values = json.loads((folder / CONFIG_FILE).read_text())
    assert values["format"] == "ivpt-pretrained" and values["format_version"] == 1
    assert values["class_names"] == ["a", "b", "c", "d"] and values["part_names"] == ["x"]
    assert values["backbone"] == {
        "timm_name": DEMO_ARCH,
        "architecture": DEMO_ARCH,
        "tag": "synthetic_pretrain",
        "pretrained": True,
        "pretrained_file": "",
        "args": {},
    }
    assert values["preprocessing"]["input_size"] == [3, 64, 64]
    assert (tuple(values["preprocessing"]["mean"]), tuple(values["preprocessing"]["std"])) == IMAGENET
    assert values["config"]["model"]["n_pro"] == [6, 5, 4] and values["config"]["model"]["img_size"] == 64
    assert len(values["weights"]["frozen"]["keys"]) == len(pretrained_keys(model))

    loaded = ivpt.from_pretrained(folder)
    assert not loaded.training and loaded.class_names == ["a", "b", "c", "d"] and loaded.part_names == ["x"]
    assert loaded.preprocessing == Preprocessing(64, *IMAGENET)
    reference = model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, found = model.eval()(images), loaded(images)
    assert torch.equal(expected.logits, found.logits)
    assert all(torch.equal(a, b) for a, b in zip(expected.concept_maps, found.concept_maps, strict=True))


def test_loading_a_folder_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ivpt.save_pretrained(demo_model(), tmp_path / "export")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a folder must load without unpickling")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    assert ivpt.from_pretrained(folder).num_classes == 4


def test_hub_ids_are_downloaded_like_timm_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    folder = ivpt.save_pretrained(demo_model(), tmp_path / "export", class_names=list("abcd"))
    asked: list[tuple[str, str, str | None]] = []

    def download(repo_id: str, filename: str, revision: str | None = None, **kwargs: object) -> str:
        asked.append((repo_id, filename, revision))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = ivpt.from_pretrained("hf-hub:someone/ivpt-demo@v1")
    assert model.class_names == list("abcd")
    assert asked == [("someone/ivpt-demo", CONFIG_FILE, "v1"), ("someone/ivpt-demo", MODEL_FILE, "v1")]


def test_a_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="^cannot download 'hf-hub:a/b' from the Hugging Face Hub: We couldn't"):
        ivpt.from_pretrained("hf-hub:a/b")


def test_other_frozen_weights_than_the_trained_ones_are_refused(tmp_path: Path) -> None:
    folder = ivpt.save_pretrained(demo_model(), tmp_path / "export")
    weights = load_file(WEIGHTS_FILE)
    weights["blocks.0.attn.qkv.weight"] = weights["blocks.0.attn.qkv.weight"] + 0.01
    other = tmp_path / "other.safetensors"
    save_file(weights, other)
    with pytest.raises(CheckpointError, match="trained on other frozen backbone weights than the pretrained ones"):
        ivpt.from_pretrained(folder, pretrained_file=str(other))
    # the same weights from a local file are accepted
    same = tmp_path / "same.safetensors"
    same.write_bytes(WEIGHTS_FILE.read_bytes())
    assert ivpt.from_pretrained(folder, pretrained_file=str(same)).num_classes == 4


def test_damaged_and_foreign_folders_are_named(tmp_path: Path) -> None:
    folder = ivpt.save_pretrained(demo_model(), tmp_path / "export")
    with pytest.raises(CheckpointError, match=f"model folder '{tmp_path}' has no config.json"):
        ivpt.from_pretrained(tmp_path)

    weights = folder / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-200:-100] = bytes(b ^ 0xFF for b in data[-200:-100])  # inside the tensor data, past the header
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"weight file '{weights}' is damaged: its tensor data does not match"):
        ivpt.from_pretrained(folder)

    folder = ivpt.save_pretrained(demo_model(), tmp_path / "edited")
    values = json.loads((folder / CONFIG_FILE).read_text())
    values["preprocessing"]["mean"] = [0.5, 0.5, 0.5]
    (folder / CONFIG_FILE).write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="its 'preprocessing' section disagrees with its 'config'"):
        ivpt.from_pretrained(folder)

    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        ivpt.from_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"format": "ivpt-pretrained", "format_version": 7}))
    with pytest.raises(CheckpointError, match="has format_version 7; this ivpt reads versions 1..1"):
        ivpt.from_pretrained(folder)


def test_transforms_for_gives_the_backbones_normalisation() -> None:
    model = demo_model()
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    tensor = ivpt.transforms_for(model)(Image.fromarray(pixels))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 - mean) / std
    torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0)
    # a wider image: the short side is resized to 64, then the centre is cropped
    assert ivpt.transforms_for(model)(Image.new("RGB", (128, 80))).shape == (3, 64, 64)
    torch.manual_seed(0)
    assert ivpt.transforms_for(model, train=True)(Image.fromarray(pixels)).shape == (3, 64, 64)


def test_preprocessing_comes_from_the_backbone_unless_the_config_sets_it() -> None:
    cfg = Config()
    cfg.model.arch = "vit_base_patch16_clip_224.openai"
    clip = preprocessing_of(cfg)
    assert clip.img_size == 224 and clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    tiny = dict(patch_size=8, depth=3, embed_dim=32, num_heads=2)
    model = ivpt.create_model(cfg.model.arch, 3, 32, (4, 3), backbone_args=tiny)
    assert model.preprocessing == Preprocessing(32, clip.mean, clip.std)
    cfg.model.img_size, cfg.data.std = 112, (1.0, 1.0, 1.0)
    assert preprocessing_of(cfg) == Preprocessing(112, clip.mean, (1.0, 1.0, 1.0))
    cfg.model.arch = "hf-hub:someone/some-vit"
    cfg.model.img_size = None
    with pytest.raises(ConfigError, match="config key 'model.img_size': timm has no pretrained config"):
        preprocessing_of(cfg)


def test_a_file_without_the_frozen_backbone_needs_the_pretrained_weights(tmp_path: Path) -> None:
    model = demo_model()
    folder = ivpt.save_pretrained(model, tmp_path / "export")
    left_out = len(pretrained_keys(model))
    with pytest.raises(CheckpointError, match=rf"leaves {left_out} frozen backbone tensors .* must stay true"):
        ivpt.load_checkpoint(folder, ["model.pretrained=false"])


def test_eval_of_a_hub_model_needs_an_output_folder() -> None:
    from ivpt.engine.evaluate import evaluate_checkpoint

    with pytest.raises(ConfigError, match="'hf-hub:a/b' has no folder of its own for metrics.json; give --out DIR"):
        evaluate_checkpoint("hf-hub:a/b")
