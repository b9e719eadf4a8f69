"""Checkpoint files: atomic writes, clear errors for damaged or foreign files, model rebuilding."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from ivpt.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    read_checkpoint,
    save_checkpoint,
)
from ivpt.config import Config, apply_overrides
from ivpt.errors import CheckpointError, ConfigError, IVPTError
from ivpt.model.pretrained import load_checkpoint

CLASSES = ["a", "b", "c"]


def minimal_payload(cfg: Config) -> dict:
    """The minimal checkpoint form (what ``ivpt convert-official`` writes)."""
    from ivpt.model import build_model

    torch.manual_seed(3)
    model = build_model(cfg, num_classes=len(CLASSES))
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "class_names": CLASSES,
        "part_names": ["head", "tail"],
        "model": model.state_dict(),
    }


@pytest.fixture(scope="module")
def payload(tiny_model_overrides: list[str]) -> dict:
    return minimal_payload(apply_overrides(Config(), tiny_model_overrides))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, {"x": torch.arange(3)})
    save_checkpoint(path, {"x": torch.arange(5)})
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"x": torch.ones(2)})
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_checkpoint(path, {"x": lambda: None})
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def _write(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = {
    "missing": (lambda p: p / "missing.pt", "does not exist"),
    "directory": (lambda p: p, "is not a file"),
    "garbage": (lambda p: _raw(p / "g.pt", b"definitely not torch\x00\x01"), "is not a PyTorch file"),
    "empty": (lambda p: _raw(p / "e.pt", b""), "is not a PyTorch file"),
    "truncated": (lambda p: _raw(p / "t.pt", _torch_bytes({"x": torch.ones(100)})[:200]), "or is truncated"),
    "list": (lambda p: _write(p / "l.pt", [1, 2]), "expected a dict, found list"),
    "no format": (lambda p: _write(p / "f.pt", {"model": {}}), "no format='ivpt' entry"),
    "official": (lambda p: _write(p / "o.pt", {"model_state": {}}), "use `ivpt convert-official`"),
    "future version": (lambda p: _write(p / "v.pt", {"format": "ivpt", "version": 99}), "format version 99"),
}


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", BAD_FILES)
def test_unreadable_files_raise_checkpoint_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_pickled_python_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.pt"
    torch.save({"format": "ivpt", "thing": Path("x")}, path)
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        read_checkpoint(path)


def test_missing_entries_are_listed(tmp_path: Path, payload: dict) -> None:
    partial = {k: v for k, v in payload.items() if k not in ("model", "class_names")}
    path = save_checkpoint(tmp_path / "p.pt", partial)
    with pytest.raises(CheckpointError, match="lacks the entries class_names, model needed to rebuild the model"):
        read_checkpoint(path)
    full = save_checkpoint(tmp_path / "full.pt", payload)
    assert read_checkpoint(full)["class_names"] == CLASSES
    with pytest.raises(CheckpointError, match="lacks the entries optimizer, .*best_metric needed to resume training"):
        read_checkpoint(full, training=True)


def test_model_entry_must_hold_tensors(tmp_path: Path, payload: dict) -> None:
    path = save_checkpoint(tmp_path / "m.pt", {**payload, "model": {"w": [1, 2]}})
    with pytest.raises(CheckpointError, match="entry 'model' is not a state dict of tensors"):
        read_checkpoint(path)


def test_load_checkpoint_rebuilds_the_model_in_eval_mode(tmp_path: Path, payload: dict) -> None:
    path = save_checkpoint(tmp_path / "ok.pt", payload)
    model, cfg, info = load_checkpoint(path, overrides=["eval.stage=-1"])
    assert not model.training
    assert cfg.eval.stage == -1
    assert cfg.model.pretrained is False
    assert info["class_names"] == CLASSES and info["part_names"] == ["head", "tail"]
    assert "model" not in info
    state = model.state_dict()
    assert state.keys() == payload["model"].keys()
    assert all(torch.equal(state[k], payload["model"][k]) for k in state)
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert out.logits.shape == (2, len(CLASSES))


def test_load_checkpoint_lists_missing_unexpected_and_reshaped_keys(tmp_path: Path, payload: dict) -> None:
    state = dict(payload["model"])
    removed = sorted(state)[0]
    del state[removed]
    state["extra.weight"] = torch.zeros(1)
    reshaped = next(k for k, v in state.items() if v.dim() == 2)
    state[reshaped] = torch.zeros(1, 1)
    path = save_checkpoint(tmp_path / "bad.pt", {**payload, "model": state})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert f"missing keys: {removed}" in text
    assert "unexpected keys: extra.weight" in text
    assert f"{reshaped} file (1, 1) vs model" in text
    assert str(path) in text


def test_invalid_stored_config_and_bad_overrides(tmp_path: Path, payload: dict) -> None:
    broken = {**payload, "config": {**payload["config"], "train": {"epochz": 3}}}
    path = save_checkpoint(tmp_path / "cfg.pt", broken)
    with pytest.raises(CheckpointError, match=r"its stored config is invalid: .*unknown config key 'train.epochz'"):
        load_checkpoint(path)
    good = save_checkpoint(tmp_path / "good.pt", payload)
    with pytest.raises(ConfigError, match="unknown config key 'eval.stag'"):
        load_checkpoint(good, overrides=["eval.stag=1"])


def test_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(IVPTError):
        read_checkpoint(tmp_path / "nothing.pt")
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
