"""``ivpt bench loader | train | eval-metrics``: their JSON lines (fields, types, relations), not their speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ivpt.bench.data import forward_passes, run_eval_bench, run_loader_bench, run_train_bench
from ivpt.cli import main
from ivpt.config import Config, apply_overrides
from ivpt.engine.evaluate import METRIC_NAMES, evaluate
from ivpt.errors import IVPTError
from ivpt.model import build_model

TINY_MODEL = dict(
    arch="vit_tiny_patch16_224",
    img_size=32,
    n_pro=(6, 5, 4),
    backbone_args=dict(patch_size=8, depth=3, embed_dim=32, num_heads=2),
)
LOADER_KEYS = {
    "mode",
    "dataset",
    "img_size",
    "augment",
    "batch",
    "workers",
    "device",
    "images",
    "samples",
    "draft_fraction",
    "getitem_ms",
    "bound_ms",
    "full_decode_bound_ms",
    "ratio",
    "ratio_spread",
    "full_decode_ratio",
    "img_per_s",
    "img_per_s_per_worker",
}
RUN_KEYS = {"mode", "dataset", "method", "arch", "img_size", "batch", "precision", "device", "compile", "workers"}


def _spread_holds(result: dict) -> None:
    low, high = result["ratio_spread"]
    assert 0 < low <= result["ratio"] <= high


@pytest.mark.parametrize(("img_size", "workers", "draft_fraction"), [(32, 0, 1.0), (48, 2, 0.0)])
def test_loader_line(synthetic_root: Path, img_size: int, workers: int, draft_fraction: float) -> None:
    result = run_loader_bench(
        synthetic_root, img_size=img_size, batch=4, workers=workers, steps=2, warmup=1, samples=5, rounds=1
    )
    assert set(result) == LOADER_KEYS
    assert result["mode"] == "loader" and result["augment"] == "paper" and result["workers"] == workers
    # 28 training images (32 minus the 10 % validation share); 64 px images shrink twice to 32 px, not to 48.
    assert result["images"] == 28 and result["samples"] == 5 and result["draft_fraction"] == draft_fraction
    for key in ("getitem_ms", "bound_ms", "full_decode_bound_ms", "img_per_s", "img_per_s_per_worker"):
        assert isinstance(result[key], float) and result[key] > 0, key
    # One round: the ratios are those of the reported means.
    assert result["ratio"] == pytest.approx(result["getitem_ms"] / result["bound_ms"], rel=5e-3)
    assert result["full_decode_ratio"] == pytest.approx(result["getitem_ms"] / result["full_decode_bound_ms"], rel=5e-3)
    assert result["ratio_spread"] == [result["ratio"], result["ratio"]]
    assert result["img_per_s_per_worker"] == pytest.approx(result["img_per_s"] / max(1, workers), abs=0.1)


def test_train_line(synthetic_root: Path) -> None:
    result = run_train_bench(
        synthetic_root, **TINY_MODEL, batch=4, workers=0, steps=2, warmup=1, rounds=2, augment="flip"
    )
    assert set(result) == RUN_KEYS | {
        "augment",
        "ms_per_step",
        "img_per_s",
        "step_ms_per_step",
        "step_img_per_s",
        "ratio",
        "ratio_spread",
        "data_wait_ms",
        "finite",
        "compile_s",
        "compile_cache",
    }
    assert result["mode"] == "train" and result["augment"] == "flip" and result["finite"] is True
    assert result["compile"] is False and result["compile_s"] is None
    assert result["img_per_s"] == pytest.approx(4 / result["ms_per_step"] * 1e3, rel=1e-2)
    assert result["step_img_per_s"] == pytest.approx(4 / result["step_ms_per_step"] * 1e3, rel=1e-2)
    # With workers=0 every batch loads while the step waits: the wait is part of each step's time.
    assert 0 < result["data_wait_ms"] < result["ms_per_step"]
    _spread_holds(result)


def test_eval_line_counts_one_forward_per_image_and_pass(synthetic_root: Path) -> None:
    result = run_eval_bench(synthetic_root, **TINY_MODEL, batch=8, workers=0, steps=1, warmup=0, rounds=1)
    assert set(result) == RUN_KEYS | {
        "clock",
        "test_images",
        "train_images",
        "passes",
        "forward_images",
        "eval_s",
        "ms_per_image",
        "bound_ms_per_image",
        "bound_s",
        "ratio",
        "ratio_spread",
        "metrics",
    }
    # The synthetic set has keypoints and masks, the tiny IVPT parts and maps: every metric runs.
    assert result["metrics"] == list(METRIC_NAMES)
    assert result["test_images"] == 32 and result["train_images"] == 32
    assert result["passes"] == {
        "scored split": 32,
        "faithfulness: top part removed": 32,
        "faithfulness: random region removed": 32,
        "box crops": 32,
        "box crops with noise": 32,
        "training split (KPR fit)": 32,
    }
    assert result["forward_images"] == 192 and result["clock"] == "process_cpu"
    assert result["bound_s"] == pytest.approx(192 * result["bound_ms_per_image"] / 1e3, rel=1e-2)
    assert result["ratio"] == pytest.approx(result["eval_s"] / result["bound_s"], rel=1e-2)
    assert result["ms_per_image"] == pytest.approx(result["eval_s"] / 32 * 1e3, rel=1e-2)


@pytest.mark.parametrize(
    "metrics", [list(METRIC_NAMES), ["accuracy"], ["consistency"], ["stability", "kpr"], ["faithfulness"]]
)
def test_evaluate_sends_each_image_once_through_the_model_per_pass(
    synthetic_root: Path, tiny_model_overrides: list[str], metrics: list[str]
) -> None:
    cfg = apply_overrides(
        Config(), [*tiny_model_overrides, f"data.root={synthetic_root}", "data.num_workers=0", "train.device=cpu"]
    )
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4)
    seen: list[int] = []
    model.backbone.patch_embed.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    results = evaluate(model, cfg, metrics)
    passes = forward_passes(results, test_images=32, train_images=32)
    # Besides the passes: one blank image that tells the evaluation the model's stages.
    assert sum(seen) == sum(passes.values()) + 1
    assert ("box crops with noise" in passes) == ("stability" in metrics)
    assert ("training split (KPR fit)" in passes) == ("kpr" in metrics)


def test_cli_prints_one_json_line_and_needs_data(synthetic_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "loader", "--img-size", "32", "--batch", "4", "--workers", "0", "--steps", "1", "--warmup", "0"]
    assert main([*argv, "--samples", "2", "--rounds", "1", "--data", str(synthetic_root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and set(json.loads(lines[0])) == LOADER_KEYS
    assert main(argv) == 2
    assert "bench loader: --data ROOT is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda root: run_loader_bench(root, workers=-1), "bench --workers: must be >= 0, got -1"),
        (lambda root: run_loader_bench(root, samples=0), "bench --samples: must be >= 1, got 0"),
        (lambda root: run_loader_bench(root, batch=64), "bench --batch 64: the training split of"),
        (lambda root: run_train_bench(root, **TINY_MODEL, rounds=0), "bench --rounds: must be >= 1, got 0"),
        (lambda root: run_eval_bench(root, **TINY_MODEL, steps=0), "bench --steps: must be >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_one_line_errors(synthetic_root: Path, call, message: str) -> None:
    with pytest.raises(IVPTError) as info:
        call(synthetic_root)
    assert str(info.value).startswith(message)
