"""Checkpoint files: atomic writes, clear errors for damaged or foreign files, model rebuilding."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ivpt.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    payload_digest,
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


# --- failed writes (issue 28.2) -----------------------------------------------------------------------


def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_checkpoint_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, {"x": torch.ones(2)})

    real_fdopen = os.fdopen

    class FullDisk:
        """The temporary file of the write, on a disk with no space left."""

        def __init__(self, file: io.BufferedWriter) -> None:
            self.file = file

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> object:
            return getattr(self.file, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"x": torch.zeros(1000)})
    assert str(info.value) == f"could not write {path}: No space left on device"
    monkeypatch.undo()
    assert torch.equal(read_checkpoint_tensors(path)["x"], torch.ones(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def read_checkpoint_tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


FILE_SIZE_LIMIT = """
import resource, sys, torch
from ivpt.checkpoint import save_checkpoint
from ivpt.errors import CheckpointError

path = sys.argv[1]
save_checkpoint(path, {"x": torch.ones(10)})
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(path, {"x": torch.ones(1_000_000)})  # 4 MB, past the limit
except CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_file_size_limit_is_one_line_naming_the_file_and_the_previous_checkpoint_survives(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == f"could not write {path}: File too large"
    assert torch.equal(read_checkpoint_tensors(path)["x"], torch.ones(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_an_unwritable_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("hi")
    with pytest.raises(CheckpointError, match=f"could not write {blocker / 'sub' / 'last.pt'}: "):
        save_checkpoint(blocker / "sub" / "last.pt", {"x": torch.ones(1)})


# --- integrity (issue 28.7) ---------------------------------------------------------------------------


def flip_tensor_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    offset = record.header_offset
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])
    middle = offset + 30 + name_length + extra_length + record.file_size // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_an_error_naming_the_file(tmp_path: Path, payload: dict) -> None:
    path = save_checkpoint(tmp_path / "best.pt", payload)
    assert read_checkpoint(path)["sha256"] == payload_digest(read_checkpoint(path))
    flip_tensor_bytes(path)
    # torch itself reads the damaged file without complaint...
    damaged = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(damaged[k], payload["model"][k]) for k in damaged)
    # ...the digest does not.
    with pytest.raises(CheckpointError, match=f"checkpoint '{path}' is damaged: its tensor data does not match"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(path)


def test_the_digest_covers_every_tensor_with_its_name_dtype_and_shape() -> None:
    base = {"a": torch.arange(4, dtype=torch.float32), "nested": {"b": [torch.ones(2, 2)]}}
    digest = payload_digest(base)
    expected = hashlib.sha256()
    for name, tensor in (("/a", base["a"]), ("/nested/b/0", base["nested"]["b"][0])):
        expected.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        expected.update(tensor.numpy().tobytes())
    assert digest == expected.hexdigest()
    assert payload_digest({**base, "sha256": "anything", "epoch": 3}) == digest  # only tensors count
    for changed in (
        {**base, "a": torch.arange(4, dtype=torch.float64)},
        {**base, "a": torch.arange(4, dtype=torch.float32).reshape(2, 2)},
        {"b": base["a"], "nested": base["nested"]},
    ):
        assert payload_digest(changed) != digest


def test_version_1_files_without_a_digest_still_load(tmp_path: Path, payload: dict) -> None:
    old = {key: value for key, value in payload.items() if key not in ("frozen",)}
    path = _write(tmp_path / "v1.pt", {**old, "version": 1})
    model, _, _ = load_checkpoint(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in payload["model"].items())
    with pytest.raises(CheckpointError, match="lacks its sha256 entry"):
        read_checkpoint(_write(tmp_path / "v2.pt", {**old, "version": 2}))
