"""``train.compile``: the backbone's blocks compiled in place, the same training, the compile time logged.

One cold compile of a tiny ViT's block on the CPU (scalar C++ kernels) takes about a minute on two shared
cores; the later compiles in this file reuse it. ``scripts/gpu_check.sh``'s dry run (tests/test_bench.py)
checks that a second process loads the kernels from torch's on-disk cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config

from ivpt.config import Config, apply_overrides
from ivpt.engine.logger import read_log
from ivpt.engine.step import build_train_step, compile_blocks
from ivpt.engine.trainer import train
from ivpt.model import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def scalar_kernels():
    # The test checks what is compiled and computed, not how fast CPU kernels run: scalar kernels compile
    # in about three quarters of the time.
    with inductor_config.patch({"cpp.vec_isa_ok": False}):
        yield


def _losses(cfg: Config, steps: int = 2) -> tuple[list[dict[str, torch.Tensor]], object]:
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4).train()
    step = build_train_step(model, cfg, steps_per_epoch=steps)
    images = torch.randn(steps, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 3])
    torch.manual_seed(2)  # the Gumbel draws of both runs
    return [step(images[i], labels) for i in range(steps)], step


def test_compiled_blocks_train_like_eager_ones_and_the_trainer_logs_the_compile(
    tiny_model_overrides: list[str], tiny_overrides, tmp_path: Path
) -> None:
    eager_cfg = apply_overrides(Config(), [*tiny_model_overrides, "train.device=cpu"])
    compiled_cfg = apply_overrides(Config(), [*tiny_model_overrides, "train.device=cpu", "train.compile=true"])
    eager, eager_step = _losses(eager_cfg)
    compiled, compiled_step = _losses(compiled_cfg)
    assert eager_step.compile_seconds is None and compiled_step.compile_seconds > 0
    blocks = compiled_step.model.backbone.blocks
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(block._compiled_call_impl is None for block in eager_step.model.backbone.blocks)
    for eager_terms, compiled_terms in zip(eager, compiled, strict=True):
        assert eager_terms.keys() == compiled_terms.keys()
        for name, value in eager_terms.items():
            torch.testing.assert_close(compiled_terms[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert compile_blocks(compiled_step.model) == len(blocks) == 3  # compiling again is harmless

    # The step's shapes (batch 3), no validation or test pass: the kernels compiled above serve the run.
    extra = ("train.batch_size=3", "data.val_fraction=0", "train.test_at_end=false", "train.max_steps=2")
    cfg = apply_overrides(Config(), tiny_overrides("train.compile=true", *extra))
    train(cfg, resume=None)
    records = read_log(tmp_path / "run" / "log.jsonl")
    compiles = [r for r in records if r["event"] == "compile"]
    assert len(compiles) == 1 and compiles[0]["first_step_s"] > 0
    assert set(compiles[0]["cache"]) == {"hits", "misses"}
