"""Size of a training checkpoint (``last.pt``) of a config, with and without the frozen backbone tensors.

    PYTHONPATH=src python scripts/checkpoint_size.py configs/cub_dinov2_b.yaml [key=value ...]

Builds the config's model without downloading anything (``model.pretrained=false``: the tensors, and so
the sizes, are those of the pretrained model), its Adam optimizer after one step (so that the moments
exist) and the trainer's checkpoint entries, then writes the checkpoint twice through
:func:`ivpt.checkpoint.save_checkpoint`: with every model tensor (what ivpt stored before it left the
frozen backbone to timm's weights) and with the tensors training changes (what ``ivpt train`` stores with
``model.pretrained=true``). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from ivpt.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint
from ivpt.config import load_config
from ivpt.engine.rng import capture_rng_state
from ivpt.engine.step import build_train_step
from ivpt.model import build_model
from ivpt.model.preprocessing import resolve_preprocessing
from ivpt.model.pretrained import model_entries

CLASSES = {"cub": 200, "nabirds": 555}


def main(argv: list[str]) -> dict[str, object]:
    config_file, overrides = argv[0], [*argv[1:], "model.pretrained=false"]
    cfg = resolve_preprocessing(load_config(config_file, overrides))
    num_classes = CLASSES.get(cfg.data.dataset, 200)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes)
    step = build_train_step(model, cfg, steps_per_epoch=100)
    for parameter in step.trainable:
        parameter.grad = torch.zeros_like(parameter)
    step.optimizer.step()
    common = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "class_names": [str(i) for i in range(num_classes)],
        "part_names": [str(i) for i in range(15)],
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict() if step.scheduler is not None else {},
        "scaler": step.scaler.state_dict(),
        "epoch": 0,
        "epoch_step": 1,
        "step": 1,
        "steps_per_epoch": 100,
        "world_size": 1,
        "rng": [capture_rng_state(step.affine_generator)],
        "best_metric": None,
    }
    model.model_config.pretrained = True  # what is left out of a pretrained run's checkpoint
    small = model_entries(model)
    sizes = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, entries in (("every_tensor", {"model": model.state_dict()}), ("trained_tensors", small)):
            path = save_checkpoint(Path(folder) / f"{name}.pt", {**common, **entries})
            sizes[name] = path.stat().st_size
    return {
        "config": config_file,
        "overrides": overrides,
        "arch": cfg.model.arch,
        "freeze": cfg.model.freeze,
        "num_classes": num_classes,
        "tensors_stored": {"every_tensor": len(model.state_dict()), "trained_tensors": len(small["model"])},
        "bytes": sizes,
        "MiB": {name: round(size / 2**20, 2) for name, size in sizes.items()},
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
