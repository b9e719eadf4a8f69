"""``ivpt bench`` and the fast training path it measures.

The speed-up of the training step rests on one claim: the transformed batch's pass can run its backbone
without autograd (``forward_without_backbone_grad``) because the equivariance loss only reaches the
stage prototypes and spatial biases. The tests below prove it is the same method: the same outputs, and
the same gradients of a whole training objective as the ``2B`` autograd forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ivpt.bench import run_bench
from ivpt.cli import main
from ivpt.config import Config, apply_overrides
from ivpt.engine.step import build_train_step
from ivpt.errors import IVPTError
from ivpt.model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    arch="vit_tiny_patch16_224",
    img_size=32,
    batch=3,
    n_pro=(6, 5, 4),
    backbone_args=dict(patch_size=8, depth=3, embed_dim=32, num_heads=2),
    steps=3,
    warmup=1,
)
COMMON_KEYS = {
    "mode",
    "method",
    "arch",
    "img_size",
    "batch",
    "precision",
    "device",
    "compile",
    "ms_per_step",
    "img_per_s",
    "bound_ms_per_step",
    "ratio",
    "finite",
    "compile_s",
    "compile_cache",
}


def _check_line(result: dict, mode: str, batch: int) -> None:
    assert set(result) == COMMON_KEYS | {"peak_rss_gb"}
    assert result["mode"] == mode and result["device"] == "cpu" and result["finite"] is True
    assert result["compile"] is False and result["compile_s"] is None and result["compile_cache"] is None
    assert result["ms_per_step"] > 0 and result["bound_ms_per_step"] > 0 and result["peak_rss_gb"] > 0
    # Both are rounded from the same unrounded medians.
    assert result["ratio"] == pytest.approx(result["ms_per_step"] / result["bound_ms_per_step"], rel=1e-2)
    assert result["img_per_s"] == pytest.approx(batch / result["ms_per_step"] * 1e3, rel=1e-2)


@pytest.mark.parametrize("mode", ["train-step", "eval"])
def test_run_bench_reports_every_field(mode: str) -> None:
    result = run_bench(mode, **TINY)
    _check_line(result, mode, TINY["batch"])
    assert result["arch"] == "vit_tiny_patch16_224" and result["img_size"] == 32 and result["method"] == "ivpt"


def test_run_bench_with_bf16_and_a_baseline_stays_finite() -> None:
    result = run_bench("train-step", **{**TINY, "precision": "bf16", "n_pro": (5,)}, method="vpt_deep_proto")
    _check_line(result, "train-step", TINY["batch"])
    assert result["precision"] == "bf16" and result["method"] == "vpt_deep_proto"


def test_cli_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    # The full-size vit_tiny (12 blocks, width 192) on 32 px inputs: a 2 x 2 patch grid.
    argv = ["bench", "eval", "--arch", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2"]
    assert main([*argv, "--steps", "2", "--warmup", "0", "--n-pro", "5,4,3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    _check_line(json.loads(lines[0]), "eval", 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "predict"}, "bench: unknown mode 'predict' (expected one of train-step, eval)"),
        ({"precision": "fp8"}, "bench --precision: expected one of fp32, bf16, fp16, got 'fp8'"),
        ({"device": "tpu"}, "bench --device: expected one of cpu, cuda, got 'tpu'"),
        ({"steps": 0}, "bench --steps: must be >= 1, got 0"),
        ({"warmup": -1}, "bench --warmup: must be >= 0, got -1"),
        ({"batch": 0}, "bench --batch: must be >= 1, got 0"),
        ({"arch": "resnet_does_not_exist"}, "config key 'model.arch': 'resnet_does_not_exist' is not a timm model"),
    ],
)
def test_bad_arguments_raise_one_line_errors(overrides: dict, message: str) -> None:
    arguments = {"mode": "eval", **TINY, **overrides}
    with pytest.raises(IVPTError) as info:
        run_bench(**arguments)
    assert str(info.value).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_request_without_a_gpu_is_a_user_error() -> None:
    with pytest.raises(IVPTError, match=r"^bench --device cuda: no CUDA device is visible to torch$"):
        run_bench("eval", **{**TINY, "device": "cuda"})


# ----------------------------------------------------------------------------------------------------
# The transformed batch's pass without backbone autograd is the same method
# ----------------------------------------------------------------------------------------------------


def _tiny_config(tiny_model_overrides: list[str], *extra: str) -> Config:
    return apply_overrides(Config(), [*tiny_model_overrides, "train.device=cpu", *extra])


def _tiny_model(cfg: Config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, num_classes=4)


def _images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


METHOD_OVERRIDES = {
    "ivpt": (),
    "ivpt_chain_soft": ("model.fusion_target=chain", "model.pooling=soft"),
    "vpt_deep_proto": ("model.method=vpt_deep_proto", "model.n_pro=[5]"),
}


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
@pytest.mark.parametrize("training", [False, True])
def test_pass_without_backbone_grad_gives_the_same_output(tiny_model_overrides, method: str, training: bool) -> None:
    model = _tiny_model(_tiny_config(tiny_model_overrides, *METHOD_OVERRIDES[method])).train(training)
    images = _images()
    # Both passes draw their Gumbel noise (training) in the same order from the global generator.
    torch.manual_seed(7)
    full = model(images)
    torch.manual_seed(7)
    light = model.forward_without_backbone_grad(images)
    assert len(light.concept_maps) == len(full.concept_maps) == len(model.n_pro)
    for a, b in zip(light.concept_maps, full.concept_maps, strict=True):
        torch.testing.assert_close(a, b)
        assert a.requires_grad
    torch.testing.assert_close(light.logits, full.logits)
    torch.testing.assert_close(light.region_features, full.region_features)
    torch.testing.assert_close(light.fused_maps, full.fused_maps)
    assert not light.logits.requires_grad and not any(f.requires_grad for f in light.fused_maps)


def test_maps_of_the_light_pass_train_only_prototypes_and_biases(tiny_model_overrides) -> None:
    model = _tiny_model(_tiny_config(tiny_model_overrides)).train()
    maps = model.forward_without_backbone_grad(_images()).concept_maps
    weights = [torch.rand(m.shape, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(maps)]
    sum((m * w).sum() for m, w in zip(maps, weights, strict=True)).backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {f"stages.{s}.{p}" for s in range(3) for p in ("prototypes", "spatial_bias")}


def _step_gradients(cfg: Config, joint: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss terms and gradients of one training objective, before any optimizer step."""
    model = _tiny_model(cfg).eval()  # eval: deterministic grouping, so both paths see the same numbers
    step = build_train_step(model, cfg, steps_per_epoch=1, joint_transformed_pass=joint)
    terms = step.losses(_images(4), torch.tensor([0, 1, 2, 3]))
    terms["total"].backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, gradients


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_light_transformed_pass_gives_the_gradients_of_the_joint_2b_forward(tiny_model_overrides, method) -> None:
    cfg = _tiny_config(tiny_model_overrides, *METHOD_OVERRIDES[method])
    terms_joint, grads_joint = _step_gradients(cfg, joint=True)
    terms_light, grads_light = _step_gradients(cfg, joint=False)
    assert terms_joint["equivariance"] > 0
    torch.testing.assert_close(terms_light, terms_joint, rtol=1e-4, atol=1e-6)
    assert set(grads_light) == set(grads_joint)
    assert {"backbone.pos_embed", "stages.0.prototypes", "stages.0.spatial_bias"} <= set(grads_light)
    for name, gradient in grads_joint.items():
        torch.testing.assert_close(grads_light[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_equivariance_gradient_alone_matches_too(tiny_model_overrides) -> None:
    # With every other term off, the prototypes' gradient comes from the transformed pass alone (and
    # the original maps): a wrong or missing graph in the light pass could not hide behind other terms.
    weights = [f"loss.{t}=0" for t in ("classification", "consistency", "presence", "bg_presence")]
    weights += [f"loss.{t}=0" for t in ("orthogonality", "total_variation", "entropy")]
    cfg = _tiny_config(tiny_model_overrides, *weights)
    _, grads_joint = _step_gradients(cfg, joint=True)
    _, grads_light = _step_gradients(cfg, joint=False)
    assert (
        set(grads_light)
        == set(grads_joint)
        == {f"stages.{s}.{p}" for s in range(3) for p in ("prototypes", "spatial_bias")}
    )
    for name, gradient in grads_joint.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(grads_light[name], gradient, rtol=1e-4, atol=1e-7, msg=name)


def test_training_step_runs_the_transformed_batch_without_block_autograd(tiny_model_overrides) -> None:
    cfg = _tiny_config(tiny_model_overrides)
    model = _tiny_model(cfg).train()
    seen: list[tuple[int, bool]] = []
    model.backbone.blocks[0].register_forward_hook(
        lambda _m, args, _o: seen.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    build_train_step(model, cfg, steps_per_epoch=1)(_images(3), torch.tensor([0, 1, 2]))
    build_train_step(model, cfg, steps_per_epoch=1, joint_transformed_pass=True)(_images(3), torch.tensor([0, 1, 2]))
    # Light path: the transformed batch first, without autograd, then the original with it; joint: 2B.
    assert seen == [(3, False), (3, True), (6, True)]


# ----------------------------------------------------------------------------------------------------
# The prepared GPU script
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == [
        "train_bf16",
        "eval_bf16",
        "train_fp16",
        "train_bf16_joint_2B",
        "train_fp32",
        "eval_fp32",
        "loader_32",
        "loader_48",
        "train_e2e_bf16",
        "eval_metrics_bf16",
        "train_bf16_compile",
        "train_bf16_compile_warm",
        "train_e2e_bf16_compile",
    ]
    for record in records:
        assert "error" not in record, record
        assert record.get("finite", True) is True and record["ratio"] > 0, record
    by_label = {r["label"]: r for r in records}
    assert by_label["loader_32"]["draft_fraction"] == 1.0 and by_label["loader_48"]["draft_fraction"] == 0.0
    cold, warm = by_label["train_bf16_compile"], by_label["train_bf16_compile_warm"]
    assert cold["compile_s"] > 0 and cold["compile_cache"]["misses"] > 0
    # A new process, the same shapes: every compiled graph comes from the on-disk cache of the first.
    assert warm["compile_cache"]["hits"] > 0 and warm["compile_cache"]["misses"] == 0
    assert by_label["train_e2e_bf16_compile"]["compile"] is True
    assert (tmp_path / "environment.txt").read_text().strip()
