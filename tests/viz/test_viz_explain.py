"""ivpt.viz.explain on tiny untrained models: the data agree with the model, the files are as promised."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ivpt
from ivpt.config import Config
from ivpt.errors import IVPTError
from ivpt.viz.drawing import save_figure
from ivpt.viz.explain import (
    FIGURE_DPI,
    FIGURE_SIZE,
    explain,
    explain_files,
    explanation_figure,
    explanation_record,
    load_image,
)

EXPECTED_PIXELS = (int(FIGURE_SIZE[0] * FIGURE_DPI), int(FIGURE_SIZE[1] * FIGURE_DPI))


def _photo(width: int = 53, height: int = 41, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _test_transform(photo: Image.Image, cfg: Config) -> torch.Tensor:
    """The data module's test transform of a photo, normalised as the model takes it: ``(3, 32, 32)``."""
    from ivpt.data.transforms import SampleTransform
    from ivpt.model.preprocessing import preprocessing_of

    prep = preprocessing_of(cfg)
    whole = np.array([0, 0, photo.width - 1, photo.height - 1], np.float32)
    transform = SampleTransform(32, "none", prep.mean, prep.std)
    return transform.normalize(transform(photo.convert("RGB"), np.zeros((0, 3), np.float32), whole)["image"])


@pytest.fixture
def tiny(tiny_config: Callable[..., Config]) -> Callable[..., tuple[torch.nn.Module, Config]]:
    """``tiny(*overrides)`` -> ``(model, cfg)``: an untrained tiny model with 5 classes."""
    from ivpt.model.factory import build_model

    def make(*overrides: str) -> tuple[torch.nn.Module, Config]:
        cfg = tiny_config(*overrides)
        torch.manual_seed(0)
        return build_model(cfg, 5).eval(), cfg

    return make


@pytest.mark.parametrize("fusion_target", ["final", "chain"])
def test_explain_agrees_with_the_model(tiny: Callable, fusion_target: str) -> None:
    model, cfg = tiny(f"model.fusion_target={fusion_target}")
    names = [f"bird {i}" for i in range(5)]
    result = explain(model, _photo(), cfg=cfg, class_names=names)

    from ivpt.model.preprocessing import preprocessing_of

    prep = preprocessing_of(cfg)
    assert (prep.mean, prep.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # vit_tiny_patch16_224's timm config
    with torch.no_grad():  # the same forward by hand, through the data module's test transform
        out = model(_test_transform(_photo(), cfg)[None])
    predicted = int(out.logits[0].argmax())
    assert result["predicted"]["index"] == predicted
    assert result["predicted"]["name"] == f"bird {predicted}"
    assert result["predicted"]["logit"] == pytest.approx(float(out.logits[0, predicted]), abs=1e-5)
    shares = [p["contribution"] for p in result["parts"]]
    assert len(shares) == 3  # n_pro[-1] - 1 final parts
    assert sum(shares) == pytest.approx(result["predicted"]["logit"], abs=1e-5)

    probabilities = [e["probability"] for e in result["top5"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert result["top5"][0]["index"] == predicted
    np.testing.assert_allclose(probabilities, out.logits[0].softmax(0).sort(descending=True).values[:5], atol=1e-6)

    assert [s["num_concepts"] for s in result["stages"]] == [6, 5, 4]
    for stage in result["stages"]:
        assert sum(stage["areas"]) == pytest.approx(1.0)
    expected_targets = [3, 3] if fusion_target == "final" else [2, 3]
    assert [s["groups_into_stage"] for s in result["stages"]] == [*expected_targets, None]
    np.testing.assert_allclose(result["stages"][0]["grouping"], out.groupings[0][0], atol=1e-6)
    assert result["image"].shape == (32, 32, 3) and result["image"].dtype == np.uint8
    assert [m.shape for m in result["concept_maps"]] == [(6, 4, 4), (5, 4, 4), (4, 4, 4)]
    json.dumps(explanation_record(result))  # JSON-ready once the drawing arrays are dropped


def test_explain_inputs_path_pil_uint8_and_dataset_tensor_agree(tiny: Callable) -> None:
    from ivpt.data import build_dataset

    model, cfg = tiny()
    # The data set decodes these 64 px JPEGs at half size for a 32 px input (data.jpeg_draft) where explain
    # decodes a file at full size; compare the full-size decodes.
    cfg.data.jpeg_draft = False
    dataset = build_dataset(cfg, "test")
    sample = dataset[0]
    path = Path(dataset.annotations.image_paths[dataset.indices[0]])
    from_path = explain(model, path, cfg=cfg)
    assert sample["image"].dtype == torch.uint8
    from_tensor = explain(model, sample["image"], cfg=cfg)
    from_normalised = explain(model, dataset.transform.normalize(sample["image"]), cfg=cfg)
    from_pil = explain(model, Image.open(path), cfg=cfg)
    from_uint8 = explain(model, torch.from_numpy(np.array(Image.open(path).convert("RGB"))), cfg=cfg)
    np.testing.assert_array_equal(from_tensor["image"], sample["image"].permute(1, 2, 0).numpy())
    for other in (from_tensor, from_normalised, from_pil, from_uint8):
        assert other["predicted"]["logit"] == pytest.approx(from_path["predicted"]["logit"], abs=1e-5)
        np.testing.assert_array_equal(other["image"], from_path["image"])


def test_explain_restores_training_mode(tiny: Callable) -> None:
    model, cfg = tiny()
    model.train()
    first = explain(model, _photo(), cfg=cfg)
    assert model.training
    second = explain(model, _photo(), cfg=cfg)
    # eval-mode grouping is deterministic (no Gumbel noise), so two calls agree exactly
    assert first["stages"][0]["grouping"] == second["stages"][0]["grouping"]


def test_explain_without_cfg_uses_the_model_input_size(tiny: Callable) -> None:
    model, _ = tiny()
    result = explain(model, _photo(80, 60))
    assert result["image"].shape == (32, 32, 3)


def test_explain_rejects_bad_inputs(tiny: Callable) -> None:
    model, cfg = tiny()
    with pytest.raises(IVPTError, match="2 class names given for a model with 5 classes"):
        explain(model, _photo(), cfg=cfg, class_names=["a", "b"])
    with pytest.raises(IVPTError, match=r"must be a normalised \(3, 32, 32\) image .* got \(3, 64, 64\)"):
        explain(model, torch.zeros(3, 64, 64), cfg=cfg)
    with pytest.raises(IVPTError, match=r"uint8 image tensor must be \(3, H, W\) or \(H, W, 3\), got \(8, 8\)"):
        explain(model, torch.zeros(8, 8, dtype=torch.uint8), cfg=cfg)


@pytest.mark.parametrize("method", ["ivpt", "vpt_deep"])
def test_figure_has_the_promised_pixel_size(tiny: Callable, tmp_path: Path, method: str) -> None:
    model, cfg = tiny(f"model.method={method}")
    result = explain(model, _photo(), cfg=cfg)
    assert bool(result["parts"]) == (method == "ivpt")
    path = save_figure(explanation_figure(result, title="x.png"), tmp_path / "x.png")
    with Image.open(path) as image:
        assert image.size == EXPECTED_PIXELS


def test_explain_with_disable_gives_the_prediction_before_and_after(tiny: Callable) -> None:
    from ivpt.model import Intervention

    model, cfg = tiny()
    names = [f"bird {i}" for i in range(5)]
    plain = explain(model, _photo(), cfg=cfg, class_names=names)
    top_part = max(plain["parts"], key=lambda p: p["contribution"])["part"]
    disable = {"parts": [top_part], "stage1": [4, 1]}
    result = explain(model, _photo(), cfg=cfg, class_names=names, disable=disable)

    intervention = result["intervention"]
    assert intervention["disabled"] == {"parts": [top_part], "stage1": [1, 4]}
    assert intervention["before"] == {"predicted": plain["predicted"], "top5": plain["top5"]}
    # "after" is what the intervened forward computes, the main entries describe it
    with torch.no_grad():
        batch = _test_transform(_photo(), cfg)[None]
        out = model(batch, intervention=Intervention.from_disable(disable, model.n_pro))
    logits = out.logits[0]
    after = intervention["after"]
    assert after["predicted"] == result["predicted"] and after["top5"] == result["top5"]
    assert result["predicted"]["index"] == int(logits.argmax())
    assert result["predicted"]["logit"] == pytest.approx(float(logits.max()), abs=1e-5)
    original = plain["predicted"]["index"]
    assert after["original_class"]["index"] == original
    assert after["original_class"]["probability"] == pytest.approx(float(logits.softmax(0)[original]), abs=1e-6)
    # the disabled part adds nothing, the rest still add up to the (new) predicted logit
    shares = {p["part"]: p for p in result["parts"]}
    assert shares[top_part]["contribution"] == 0.0 and shares[top_part]["disabled"] is True
    assert sum(p["contribution"] for p in result["parts"]) == pytest.approx(result["predicted"]["logit"], abs=1e-5)
    assert [s["disabled"] for s in result["stages"]] == [[1, 4], [], [top_part]]
    json.dumps(explanation_record(result))


def test_explain_with_only_a_part_disabled_moves_its_class_by_its_share(tiny: Callable) -> None:
    model, cfg = tiny()
    plain = explain(model, _photo(), cfg=cfg)
    top = max(plain["parts"], key=lambda p: p["contribution"])
    result = explain(model, _photo(), cfg=cfg, disable={"parts": [top["part"]]})
    original = result["intervention"]["after"]["original_class"]
    assert original["logit"] == pytest.approx(plain["predicted"]["logit"] - top["contribution"], abs=1e-5)


def test_explain_with_nothing_disabled_changes_nothing(tiny: Callable) -> None:
    model, cfg = tiny()
    plain = explain(model, _photo(), cfg=cfg)
    result = explain(model, _photo(), cfg=cfg, disable={})
    intervention = result["intervention"]
    assert intervention["disabled"] == {}
    assert intervention["before"]["top5"] == intervention["after"]["top5"] == plain["top5"]
    assert [p["contribution"] for p in result["parts"]] == [p["contribution"] for p in plain["parts"]]
    assert "intervention" not in plain and "disabled" not in plain["parts"][0]


def test_explain_rejects_a_disable_the_model_lacks(tiny: Callable) -> None:
    model, cfg = tiny()
    with pytest.raises(IVPTError, match=r"stage1 concepts \[5\] do not exist"):
        explain(model, _photo(), cfg=cfg, disable={"stage1": [5]})
    baseline, cfg = tiny("model.method=vpt_deep")
    with pytest.raises(IVPTError, match="no concepts or parts to switch off"):
        explain(baseline, _photo(), cfg=cfg, disable={"parts": [0]})


def test_figure_of_an_intervention_has_the_promised_pixel_size(tiny: Callable, tmp_path: Path) -> None:
    model, cfg = tiny()
    result = explain(model, _photo(), cfg=cfg, disable={"parts": [0], "stage2": [0, 1, 2, 3]})
    path = save_figure(explanation_figure(result), tmp_path / "x.png")
    with Image.open(path) as image:
        assert image.size == EXPECTED_PIXELS


def test_load_image_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(IVPTError, match=r"image '.*notes\.jpg' is not an image file PIL can read"):
        load_image(bad)
    with pytest.raises(IVPTError, match=r"image '.*missing\.png' does not exist"):
        load_image(tmp_path / "missing.png")


def test_explain_files_writes_png_and_json(make_checkpoint: Callable, tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _photo(70, 40).save(tmp_path / "a" / "bird.png")
    _photo(30, 90, seed=1).convert("L").save(tmp_path / "b" / "bird.jpg")  # greyscale JPEG, another size
    out = tmp_path / "explained"
    written = explain_files([tmp_path / "a" / "bird.png", tmp_path / "b" / "bird.jpg"], checkpoint, out, device="cpu")
    assert written == [out / "bird.png", out / "bird-2.png"]
    model, cfg, info = ivpt.load_checkpoint(checkpoint)
    for png, source in zip(written, ["a/bird.png", "b/bird.jpg"], strict=True):
        with Image.open(png) as image:
            assert image.size == EXPECTED_PIXELS
        record = json.loads(png.with_suffix(".json").read_text())
        assert record["image"] == str(tmp_path / source)
        direct = explain(model, tmp_path / source, cfg=cfg, class_names=info["class_names"])
        assert record["predicted"]["name"] == info["class_names"][direct["predicted"]["index"]]
        assert record["predicted"]["logit"] == pytest.approx(direct["predicted"]["logit"], abs=1e-5)
        assert sum(p["contribution"] for p in record["parts"]) == pytest.approx(record["predicted"]["logit"], abs=1e-5)
        assert len(record["top5"]) == 4  # the synthetic set has 4 classes
        assert [len(s["areas"]) for s in record["stages"]] == [6, 5, 4]


def test_explain_files_rejects_a_non_image_before_writing(make_checkpoint: Callable, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(log=False)
    good = tmp_path / "good.png"
    _photo().save(good)
    bad = tmp_path / "readme.txt"
    bad.write_text("hello")
    out = tmp_path / "explained"
    with pytest.raises(IVPTError, match=r"image '.*readme\.txt' is not an image file"):
        explain_files([good, bad], checkpoint, out, device="cpu")
    assert not out.exists()


def test_cli_explain(make_checkpoint: Callable, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ivpt.cli import main

    checkpoint = make_checkpoint(log=False)
    image = tmp_path / "photo.webp"
    _photo().save(image)
    assert main(["explain", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "photo.png").is_file() and (tmp_path / "o" / "photo.json").is_file()
    assert main(["explain", str(tmp_path / "nope.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "nope.png' does not exist" in capsys.readouterr().err
    # An output folder under a file: one line naming both, nothing written.
    (tmp_path / "afile").write_text("hi")
    out = tmp_path / "afile" / "o"
    assert main(["explain", str(image), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"ivpt explain: error: output folder '{out}': '{tmp_path / 'afile'}' is a file, expected a folder\n"
    )


def test_cli_explain_takes_overrides_in_eval_form(
    make_checkpoint: Callable, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ivpt.cli import main, split_images_and_overrides

    checkpoint = make_checkpoint(log=False)
    image = tmp_path / "photo.png"
    _photo().save(image)
    args = ["explain", str(image), "train.device=cpu", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    assert main(args) == 0 and (tmp_path / "o" / "photo.json").is_file()
    args[2] = "train.devize=cpu"
    assert main(args) == 2
    assert "unknown config key 'train.devize'" in capsys.readouterr().err
    # A file whose name looks like an override is still an image; a bare word is never an override.
    monkeypatch.chdir(tmp_path)
    Path("a.b=c.png").write_bytes(b"")
    assert split_images_and_overrides(["a.b=c.png", "bird.jpg", "eval.stage=-2"]) == (
        ["a.b=c.png", "bird.jpg"],
        ["eval.stage=-2"],
    )
    assert main(["explain", "eval.stage=-2", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "no image given" in capsys.readouterr().err


def test_non_square_model_is_explained_without_cfg() -> None:
    """A model on (H, W) inputs: the image is scaled to cover H x W and centre-cropped, then explained."""
    from ivpt.data.transforms import image_transform
    from ivpt.model import create_model

    model = create_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=(32, 48), n_pro=(5, 4, 3),
        backbone_args={"patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
    ).eval()
    # 120 x 40 source: scaled by max(48 / 120, 32 / 40) = 0.8 to 96 x 32, of which the centre 48 columns
    # (source columns 30..90) are kept. Columns 0..29 are red, 30..59 green, 60..89 blue, 90.. white.
    source = np.zeros((40, 120, 3), dtype=np.uint8)
    source[:, :30] = (255, 0, 0)
    source[:, 30:60] = (0, 255, 0)
    source[:, 60:90] = (0, 0, 255)
    source[:, 90:] = 255
    image = Image.fromarray(source)
    mean, std = model.preprocessing.mean, model.preprocessing.std
    pixels = image_transform((32, 48), mean, std)(image)
    assert pixels.shape == (3, 32, 48)
    rgb = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    # Away from the window's edges (the filter reaches one source pixel beyond them) and from the one
    # boundary inside it (column 24), the left half is green and the right half blue: red and white lie
    # outside the window.
    assert torch.allclose(rgb[:, :, 2:22].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=1e-3)
    assert torch.allclose(rgb[:, :, 26:46].mean(dim=(1, 2)), torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)

    info = ivpt.explain(model, image)
    assert info["image"].shape == (32, 48, 3)
    assert info["concept_maps"][-1].shape == (3, 4, 6)
    assert info["predicted"]["index"] == int(model(pixels[None]).logits.argmax())
    assert all(abs(sum(stage["areas"]) - 1.0) < 1e-5 for stage in info["stages"])
    with pytest.raises(IVPTError, match="makes square images; the model takes 32 x 48"):
        ivpt.transforms_for(model, train=True)
