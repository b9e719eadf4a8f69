"""Fixtures of the viz tests: an untrained tiny checkpoint on the synthetic set (no training needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ivpt.config import Config


@pytest.fixture
def make_checkpoint(tiny_config: Callable[..., Config], tmp_path: Path) -> Callable[..., Path]:
    """``make_checkpoint(*overrides, log=True)``: save an untrained tiny model as ``tmp_path/run/best.pt``.

    With ``log`` a small ``log.jsonl`` (train and val records as the trainer writes them) goes beside it.
    """
    from ivpt.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint
    from ivpt.data import load_annotations
    from ivpt.engine.logger import RunLogger
    from ivpt.model.factory import build_model

    def make(*overrides: str, log: bool = True) -> Path:
        cfg = tiny_config(*overrides)
        notes = load_annotations(cfg.data)
        torch.manual_seed(0)
        model = build_model(cfg, len(notes.class_names))
        path = Path(cfg.train.out_dir) / "best.pt"
        save_checkpoint(
            path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": cfg.to_dict(),
                "class_names": list(notes.class_names),
                "part_names": list(notes.part_names),
                "model": model.state_dict(),
                "epoch": 2,
            },
        )
        if log:
            logger = RunLogger(path.parent)
            for step in (1, 2, 3, 4):
                losses = {"total": 3.0 / step, "classification": 1.5 / step, "presence": 0.2}
                logger.log("train", step, epoch=(step - 1) // 2, loss=losses, lr={"head": 0.01 / step})
                if step % 2 == 0:
                    logger.log("val", step, epoch=step // 2, accuracy=20.0 * step, top5=100.0, best=20.0 * step)
        return path

    return make
