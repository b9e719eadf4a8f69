"""``ivpt eval``: metrics.json with every key and stage, notes for what cannot apply, known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ivpt.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint
from ivpt.cli import main
from ivpt.config import Config
from ivpt.engine.evaluate import HEADLINE_KEYS, STAGE_KEYS, evaluate, evaluate_checkpoint, headline_stage
from ivpt.errors import ConfigError, DataError
from ivpt.model.pretrained import load_checkpoint

NUM_STAGES = 3  # model.n_pro=[6,5,4]


def write_checkpoint(cfg: Config, path: Path, num_classes: int = 4, seed: int = 0) -> Path:
    """A checkpoint of a randomly initialised model in the minimal (convert-official) form."""
    from ivpt.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg, num_classes=num_classes)
    return save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": cfg.to_dict(),
            "class_names": [f"class{i}" for i in range(num_classes)],
            "part_names": [],
            "model": model.state_dict(),
        },
    )


@pytest.fixture
def checkpoint(tiny_config, tmp_path: Path) -> Path:
    return write_checkpoint(tiny_config(), tmp_path / "ckpt" / "model.pt")


def test_metrics_json_has_every_key_and_every_stage(checkpoint: Path, capsys) -> None:
    results = evaluate_checkpoint(checkpoint)
    written = json.loads((checkpoint.parent / "metrics.json").read_text())
    assert written["checkpoint"] == str(checkpoint)
    for key in HEADLINE_KEYS:
        assert isinstance(written[key], float), (key, written[key], written["notes"])
    assert written["notes"] == []
    assert set(written["per_stage"]) == {str(s) for s in range(NUM_STAGES)}
    for stage in written["per_stage"].values():
        assert set(stage) == set(STAGE_KEYS)
        assert all(isinstance(stage[key], float) for key in STAGE_KEYS)
        assert all(0.0 <= stage[key] <= 100.0 for key in ("consistency", "stability", "nmi", "fg_iou", "fg_missed"))
    # Default eval.stage = -3 is stage 0 of three; the headline part metrics are that stage's.
    assert written["stage"] == 0
    assert all(written[key] == written["per_stage"]["0"][key] for key in STAGE_KEYS)
    assert written["top5"] == 100.0  # four classes: every label is in the top five
    assert results["accuracy"] == written["accuracy"]
    table = capsys.readouterr().out
    assert "consistency" in table and "metrics.json" in table


def test_accuracy_matches_a_direct_count(checkpoint: Path) -> None:
    from ivpt.data import build_dataset

    model, cfg, _ = load_checkpoint(checkpoint)
    test_set = build_dataset(cfg, "test")
    hits = []
    per_class: dict[int, list[bool]] = {}
    with torch.no_grad():
        for index in range(len(test_set)):
            sample = test_set[index]
            predicted = int(model(test_set.transform.normalize(sample["image"][None])).logits.argmax())
            hits.append(predicted == sample["label"])
            per_class.setdefault(sample["label"], []).append(hits[-1])
    results = evaluate(model, cfg, ["accuracy"])
    assert results["accuracy"] == pytest.approx(100.0 * np.mean(hits))
    assert results["macro_accuracy"] == pytest.approx(100.0 * np.mean([np.mean(v) for v in per_class.values()]))
    assert results["images"] == len(test_set) and results["split"] == "test"
    assert results["consistency"] is None and results["per_stage"] == {}
    assert any(note.startswith("not requested: consistency") for note in results["notes"])


@pytest.mark.parametrize("metrics", [["accuracy", "fg_iou"], ["consistency"]])
def test_observer_sees_every_forward_of_the_scored_split(checkpoint: Path, metrics: list[str]) -> None:
    """Once per test image with the model's own output, also when no metric needs that pass."""
    from ivpt.data import build_dataset

    model, cfg, _ = load_checkpoint(checkpoint)
    test_set = build_dataset(cfg, "test")
    seen: dict[int, torch.Tensor] = {}

    def observe(output, batch) -> None:
        for position, index in enumerate(batch["index"].tolist()):
            assert index not in seen
            seen[index] = output.logits[position]
            assert int(batch["label"][position]) == test_set[index]["label"]

    evaluate(model, cfg, metrics, observe=observe)
    assert sorted(seen) == list(range(len(test_set)))
    with torch.no_grad():
        images = torch.stack([test_set[i]["image"] for i in (0, len(test_set) - 1)])
        assert images.dtype == torch.uint8  # evaluate normalises them itself
        direct = model(test_set.transform.normalize(images)).logits
    torch.testing.assert_close(torch.stack([seen[0], seen[len(test_set) - 1]]), direct)


def test_stage_selection_and_clamping(checkpoint: Path, tmp_path: Path) -> None:
    results = evaluate_checkpoint(checkpoint, ["eval.stage=-5"], metrics=["part_discovery"], out_dir=tmp_path / "a")
    assert results["stage"] == 0
    assert any("eval.stage=-5 is out of range for a model with 3 stage(s)" in n for n in results["notes"])
    results = evaluate_checkpoint(checkpoint, ["eval.stage=-1"], metrics=["part_discovery"], out_dir=tmp_path / "b")
    assert results["stage"] == 2 and results["nmi"] == results["per_stage"][2]["nmi"]
    assert headline_stage(7, 3) == (2, headline_stage(7, 3)[1]) and "stage 2" in headline_stage(7, 3)[1]
    assert headline_stage(-3, 5) == (2, None)


def test_stability_is_reproducible(checkpoint: Path) -> None:
    model, cfg, _ = load_checkpoint(checkpoint)
    first = evaluate(model, cfg, ["stability"])["per_stage"]
    assert evaluate(model, cfg, ["stability"])["per_stage"] == first
    cfg.eval.noise_std = 0.0
    cfg.eval.noise_clip = 0.0
    assert all(v["stability"] == 100.0 for v in evaluate(model, cfg, ["stability"])["per_stage"].values())


def test_kpr_divides_by_the_box_that_eval_kpr_box_names(checkpoint: Path) -> None:
    """Default: the protocol's annotated box (docs/method.md section 9); ``clipped``: the box cut to the crop."""
    from torch.utils.data import default_collate

    from ivpt.data import build_dataset
    from ivpt.metrics import KeypointRegressionMeter, keypoint_regression_error, kpr_box

    model, cfg, _ = load_checkpoint(checkpoint)
    scores = {}
    for mode in ("annotated", "clipped"):
        cfg.eval.kpr_box = mode
        scores[mode] = evaluate(model, cfg, ["kpr"])["per_stage"]
    direct: dict[str, dict[int, float]] = {"annotated": {}, "clipped": {}}
    batches = {}
    with torch.no_grad():
        for split in ("train_full", "test"):
            dataset = build_dataset(cfg, split, train_transform=False)
            batch = default_collate([dataset[i] for i in range(len(dataset))])
            batches[split] = (batch, model(dataset.transform.normalize(batch["image"])).concept_maps)
    for mode, boxes in direct.items():
        for stage in range(NUM_STAGES):
            meters = []
            for split in ("train_full", "test"):
                batch, maps = batches[split]
                box = batch["bbox"] if mode == "clipped" else kpr_box(batch["bbox_edges"], cfg.model.img_size)
                meter = KeypointRegressionMeter(maps[stage].shape[1] - 1, batch["keypoints"].shape[1])
                meter.update(maps[stage], batch["keypoints"], box, cfg.model.img_size)
                meters.append(meter)
            boxes[stage] = keypoint_regression_error(*meters)
    for mode in direct:
        for stage in range(NUM_STAGES):
            assert scores[mode][stage]["kpr"] == pytest.approx(direct[mode][stage], rel=1e-6), (mode, stage)
    assert scores["annotated"][0]["kpr"] != pytest.approx(scores["clipped"][0]["kpr"], rel=1e-3)


class _NonFiniteAt(torch.nn.Module):
    """The model, with a NaN put into stage ``stage``'s maps on its ``call``-th forward (0 = the probe)."""

    def __init__(self, model: torch.nn.Module, call: int, stage: int) -> None:
        super().__init__()
        self.model, self.call, self.stage, self.calls = model, call, stage, 0

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        if self.calls == self.call:
            out.concept_maps[self.stage][-1, 0, 0, 0] = float("nan")
        self.calls += 1
        return out


@pytest.mark.parametrize(
    ("metric", "call", "stage", "where"),
    [
        # Forward 0 is the probe, forwards 1-4 the four test batches of 8: forward 3 is batch 2.
        ("part_discovery", 3, 1, "test split, batch 2, stage 1"),
        ("kpr", 3, 1, "test split, batch 2, stage 1"),
        ("consistency", 3, 1, "test split cropped to the boxes, batch 2, stage 1"),
        # Faithfulness runs three forwards per batch (the images, then two with a region blurred out).
        ("faithfulness", 4, 2, "test split, batch 1, stage 2"),
    ],
)
def test_non_finite_maps_fail_naming_the_pass_batch_and_stage(
    checkpoint: Path, metric: str, call: int, stage: int, where: str
) -> None:
    from ivpt.metrics import MetricError

    model, cfg, _ = load_checkpoint(checkpoint)
    poisoned = _NonFiniteAt(model, call=call, stage=stage)
    with pytest.raises(MetricError, match=rf"^{where}: maps: 1 NaN or infinite values, in image\(s\) 7 of the batch"):
        evaluate(poisoned, cfg, [metric], device="cpu")


def test_methods_without_concept_maps_get_nulls_with_reasons(tiny_config, tmp_path: Path) -> None:
    path = write_checkpoint(tiny_config("model.method=linear_probe"), tmp_path / "probe.pt")
    results = evaluate_checkpoint(path, metrics=["accuracy", "consistency", "kpr", "fg_iou", "faithfulness"])
    assert isinstance(results["accuracy"], float)
    for key in ("consistency", "kpr", "fg_iou", "faithfulness", "nmi"):
        assert results[key] is None
    assert results["per_stage"] == {} and results["stage"] is None
    notes = results["notes"]
    assert "consistency: method 'linear_probe' has no concept maps" in notes
    assert "faithfulness: method 'linear_probe' has no part scores and concept maps" in notes


def test_vpt_prompt_attention_maps_get_part_metrics_but_no_faithfulness(tiny_config, tmp_path: Path) -> None:
    path = write_checkpoint(tiny_config("model.method=vpt_deep"), tmp_path / "vpt.pt")
    results = evaluate_checkpoint(path, metrics=["accuracy", "consistency", "part_discovery", "faithfulness"])
    assert isinstance(results["consistency"], float) and isinstance(results["nmi"], float)
    assert results["faithfulness"] is None
    assert any(note.startswith("faithfulness: method 'vpt_deep'") for note in results["notes"])


def make_folder_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folders_have_no_part_metrics_and_say_why(tiny_config, tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "folders")
    cfg = tiny_config("data.dataset=folder", f"data.root={root}", "data.val_fraction=0")
    path = write_checkpoint(cfg, tmp_path / "folder.pt", num_classes=2)
    results = evaluate_checkpoint(path)
    assert isinstance(results["accuracy"], float) and isinstance(results["faithfulness"], float)
    assert all(results[key] is None for key in ("consistency", "stability", "nmi", "ari", "kpr", "fg_iou", "fg_missed"))
    assert "consistency: the data set (folder) has no part keypoints" in results["notes"]
    assert "fg_iou: the data set has no segmentation masks (segmentations/)" in results["notes"]
    assert results["per_stage"] == {}


def test_user_errors(checkpoint: Path, tiny_config, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="unknown metric.* bogus; choose from accuracy, consistency"):
        evaluate_checkpoint(checkpoint, metrics=["accuracy", "bogus"])
    three = write_checkpoint(tiny_config(), tmp_path / "three.pt", num_classes=3)
    with pytest.raises(DataError, match="classifies 3 classes, but the data set at .* has 4"):
        evaluate_checkpoint(three)
    code = main(["eval", "--checkpoint", str(tmp_path / "missing.pt")])
    assert code == 2 and "missing.pt' does not exist" in capsys.readouterr().err


def test_cli_eval_writes_the_requested_metrics(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval_out"
    code = main(["eval", "--checkpoint", str(checkpoint), "--metrics", "accuracy,kpr", "--out", str(out)])
    assert code == 0
    written = json.loads((out / "metrics.json").read_text())
    assert isinstance(written["kpr"], float) and isinstance(written["accuracy"], float)
    assert written["consistency"] is None
    assert set(written["per_stage"]) == {"0", "1", "2"}
    assert all(isinstance(stage["kpr"], float) and stage["nmi"] is None for stage in written["per_stage"].values())
    assert str(out / "metrics.json") in capsys.readouterr().out


def test_an_unusable_out_fails_before_any_metric(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    passes: list[str] = []
    monkeypatch.setattr("ivpt.engine.evaluate._Evaluation.run", lambda self: passes.append("run"))
    (tmp_path / "afile").write_text("hi")
    out = tmp_path / "afile" / "sub"
    code = main(["eval", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert code == 2 and passes == []
    assert capsys.readouterr().err == (
        f"ivpt eval: error: output folder '{out}': '{tmp_path / 'afile'}' is a file, expected a folder\n"
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_failed_metrics_json_write_keeps_the_table_and_names_the_file(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "full"
    out.mkdir()
    (out / "metrics.json").symlink_to("/dev/full")  # writes fail with ENOSPC, as on a full disk
    code = main(["eval", "--checkpoint", str(checkpoint), "--metrics", "accuracy", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert "accuracy" in captured.out  # the table came first
    assert captured.err == (
        f"ivpt eval: error: '{out / 'metrics.json'}': no space left on device (expected free space on its file "
        "system)\n"
    )


class _Terminal:
    """A text stream that says it is a terminal, as tqdm asks."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "progress_key", "shown"), [(True, "true", True), (False, "true", False), (True, "false", False)]
)
def test_eval_shows_a_bar_per_pass_on_a_terminal(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tty: bool, progress_key: str, shown: bool
) -> None:
    stream = _Terminal(tty)
    monkeypatch.setattr("sys.stderr", stream)
    evaluate_checkpoint(checkpoint, [f"train.progress={progress_key}"], out_dir=tmp_path / "eval")
    text = "".join(stream.parts)
    for bar in ("ivpt eval: test split", "test split, cropped to the boxes", "train split, for the KPR regressors"):
        assert (bar in text) is shown, (bar, text[:200])
