"""Training on pretrained weights (the shipped demo backbone): small checkpoints that leave the frozen backbone
to timm, exact resumption from them, and the exported folder wherever a checkpoint is accepted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ivpt
from ivpt.checkpoint import read_checkpoint
from ivpt.cli import main
from ivpt.config import Config
from ivpt.engine.trainer import train
from ivpt.model.demo_vit import DEMO_ARCH
from ivpt.model.pretrained import CONFIG_FILE, WEIGHTS_FILE

PRETRAINED = (
    f"model.arch={DEMO_ARCH}",
    "model.pretrained=true",
    "model.img_size=64",
    "model.backbone_args={}",
    "train.test_at_end=false",
)


@pytest.fixture
def demo_config(tiny_config: Callable[..., Config]) -> Callable[..., Config]:
    def make(*overrides: str) -> Config:
        return tiny_config(*PRETRAINED, *overrides)

    return make


@pytest.mark.slow
def test_checkpoints_leave_out_the_frozen_backbone_and_resume_exactly(demo_config, tmp_path: Path) -> None:
    straight = demo_config(f"train.out_dir={tmp_path / 'straight'}")
    train(straight, resume=None)
    payload = read_checkpoint(tmp_path / "straight" / "last.pt", training=True)
    model = ivpt.load_checkpoint(tmp_path / "straight" / "last.pt")[0]
    state = model.state_dict()
    frozen = payload["frozen"]["keys"]
    assert frozen and set(frozen) | set(payload["model"]) == set(state) and not set(frozen) & set(payload["model"])
    assert {k for k in payload["model"] if k.startswith("backbone.")} == {"backbone.cls_token", "backbone.pos_embed"}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained <= set(payload["model"])

    # Stopped after step 4 of 6 (in the middle of the second epoch), then resumed from that checkpoint.
    mid = demo_config(f"train.out_dir={tmp_path / 'mid'}", "train.max_steps=4")
    train(mid, resume=None)
    mid.train.max_steps = 0
    train(mid, resume="auto")
    resumed = read_checkpoint(tmp_path / "mid" / "last.pt", training=True)
    assert resumed["model"].keys() == payload["model"].keys()
    assert all(torch.equal(resumed["model"][k], payload["model"][k]) for k in payload["model"])
    for index, moments in payload["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg"], resumed["optimizer"]["state"][index]["exp_avg"])
    rebuilt = ivpt.load_checkpoint(tmp_path / "mid" / "last.pt")[0].state_dict()
    assert all(torch.equal(rebuilt[k], state[k]) for k in state)


@pytest.mark.slow
def test_the_exported_folder_works_wherever_a_checkpoint_does(demo_config, tmp_path: Path, capsys) -> None:
    cfg = demo_config("train.epochs=1")
    train(cfg, resume=None)
    best = Path(cfg.train.out_dir) / "best.pt"
    folder = tmp_path / "export"
    assert main(["export", "--checkpoint", str(best), "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    payload = read_checkpoint(best)
    stored = load_file(folder / WEIGHTS_FILE)
    assert stored.keys() == payload["model"].keys()
    assert all(torch.equal(stored[k], payload["model"][k]) for k in stored)
    values = json.loads((folder / CONFIG_FILE).read_text())
    assert values["source"]["checkpoint"] == str(best) and values["source"]["epoch"] == payload["epoch"]

    metrics = ["--metrics", "accuracy,part_discovery"]
    assert main(["eval", "--checkpoint", str(best), *metrics, "--out", str(tmp_path / "from_pt")]) == 0
    assert main(["eval", "--checkpoint", str(folder), *metrics]) == 0
    from_pt = json.loads((tmp_path / "from_pt" / "metrics.json").read_text())
    from_folder = json.loads((folder / "metrics.json").read_text())  # the folder is the model's home
    for key in ("accuracy", "nmi", "ari"):
        assert from_folder[key] == from_pt[key]

    image = tmp_path / "bird.png"
    Image.new("RGB", (80, 64), (200, 40, 40)).save(image)
    assert main(["explain", str(image), "--checkpoint", str(folder), "--out", str(tmp_path / "explained")]) == 0
    record = json.loads((tmp_path / "explained" / "bird.json").read_text())
    assert record["checkpoint"] == str(folder) and len(record["stages"]) == 3

    assert main(["report", "--checkpoint", str(folder), "--out", str(tmp_path / "report"), "--top-k", "2"]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"Checkpoint {folder}" in page and "read from" in page  # ivpt eval's metrics.json in the folder
    assert f"The training log {folder / 'log.jsonl'} was not found" in page
