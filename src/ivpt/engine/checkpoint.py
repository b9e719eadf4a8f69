"""Checkpoint files: atomic writing, validated reading, and rebuilding a model from one.

A checkpoint is a plain dict saved with :func:`torch.save` and read back with
``torch.load(weights_only=True)``, so it holds only tensors and plain Python containers:

- always: ``format="ivpt"``, ``version``, ``config`` (``Config.to_dict()``), ``class_names``,
  ``part_names``, ``model`` (the full state dict, frozen backbone included);
- training checkpoints add ``optimizer``, ``scheduler``, ``scaler``, ``epoch``, ``step``, ``rng`` and
  ``best_metric`` (see :mod:`ivpt.engine.trainer` for what they mean).

``ivpt convert-official`` writes the minimal form, which :func:`load_checkpoint` accepts too.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from ivpt.config import Config, apply_overrides, validate
from ivpt.errors import CheckpointError, ConfigError
from ivpt.model.state import state_mismatches

CHECKPOINT_FORMAT = "ivpt"
CHECKPOINT_VERSION = 1
MODEL_KEYS = ("format", "version", "config", "class_names", "part_names", "model")
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "step", "rng", "best_metric")
# How many offending names an error message lists before it only counts the rest.
_LISTED = 6


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (see :func:`write_atomically`)."""
    return write_atomically(path, lambda file: torch.save(dict(payload), file))


def write_atomically(path: str | Path, write: Callable[[BinaryIO], Any], mode: int | None = None) -> Path:
    """Write a file through ``write(file)`` so that no reader ever sees it half written.

    The data goes to a temporary file in the same folder, is flushed to disk, gets ``mode`` (the
    temporary file is private, 0600, otherwise), and then replaces ``path`` in one ``os.replace``: a
    reader (or a run killed mid-write) sees the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: str | Path, *, training: bool = False) -> dict[str, Any]:
    """Load and check an ivpt checkpoint on the CPU.

    Args:
        path: the ``.pt`` file.
        training: also require the entries needed to resume training.

    Raises:
        CheckpointError: the file is missing, is not a PyTorch file, holds something other than an
            ivpt checkpoint, or lacks required entries. The message names the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' is not a file")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"checkpoint '{path}' is not a PyTorch file, or is truncated (no zip archive or pickle)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint '{path}' holds Python objects other than tensors and plain containers; "
            "it was not written by ivpt (for the authors' snapshots use `ivpt convert-official`)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint '{path}' is not a readable PyTorch file ({_first_line(exc)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint '{path}' is not an ivpt checkpoint: expected a dict, found {type(payload).__name__}"
        )
    if payload.get("format") != CHECKPOINT_FORMAT:
        official = "model_state" in payload
        hint = " (it looks like an official IVPT snapshot: use `ivpt convert-official`)" if official else ""
        raise CheckpointError(
            f"checkpoint '{path}' is not an ivpt checkpoint: no format='{CHECKPOINT_FORMAT}' entry{hint}"
        )
    version = payload.get("version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {version!r}; this ivpt reads versions 1..{CHECKPOINT_VERSION}"
        )
    required = MODEL_KEYS + (TRAINING_KEYS if training else ())
    missing = [key for key in required if key not in payload]
    if missing:
        purpose = "to resume training" if training else "to rebuild the model"
        raise CheckpointError(f"checkpoint '{path}' lacks the entries {', '.join(missing)} needed {purpose}")
    state = payload["model"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"checkpoint '{path}': entry 'model' is not a state dict of tensors")
    return payload


def _looks_like_torch_file(path: Path) -> bool:
    # torch.save writes a zip archive; files from before PyTorch 1.6 are bare pickles (protocol byte 0x80).
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as file:
        return file.read(1) == b"\x80"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def checkpoint_config(
    payload: Mapping[str, Any], path: str | Path, overrides: Sequence[str] = ()
) -> Config:
    """The checkpoint's stored config with ``overrides`` applied and pretrained loading turned off.

    The weights come from the checkpoint, so building the model must not reach for a model hub.

    Raises:
        CheckpointError: the stored config is not a valid ivpt config.
        ConfigError: an override is invalid.
    """
    try:
        cfg = Config.from_dict(payload["config"], source=f"checkpoint '{path}'")
        validate(cfg)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint '{path}': its stored config is invalid: {exc}") from None
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    cfg.model.pretrained = False
    cfg.model.pretrained_file = ""
    return cfg


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Strictly load ``state`` into ``model``; any mismatch is listed in one :class:`CheckpointError`."""
    problems = state_mismatches(
        {key: tuple(value.shape) for key, value in model.state_dict().items()},
        {key: tuple(value.shape) for key, value in state.items()},
        limit=_LISTED,
    )
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit the model built from its config; " + "; ".join(problems)
        )
    model.load_state_dict(dict(state), strict=True)


def load_checkpoint(
    path: str | Path, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the model stored in an ivpt checkpoint.

    Args:
        path: checkpoint written by ``ivpt train`` or ``ivpt convert-official``.
        overrides: ``key=value`` config overrides applied to the stored config (e.g. ``data.root=...``
            when the data set moved).
        device: where the model is put.

    Returns:
        ``(model, cfg, info)``: the model in eval mode with the checkpoint's weights, the resolved
        config, and the checkpoint's remaining entries (``class_names``, ``part_names``, ``epoch``, ...;
        the bulky ``model`` and ``optimizer`` states are left out).
    """
    from ivpt.model import build_model

    payload = read_checkpoint(path)
    cfg = checkpoint_config(payload, path, overrides)
    class_names = payload["class_names"]
    if not isinstance(class_names, list) or not class_names:
        raise CheckpointError(f"checkpoint '{path}': entry 'class_names' must be a non-empty list of names")
    model = build_model(cfg, num_classes=len(class_names))
    load_model_state(model, payload["model"], path)
    model.to(device).eval()
    info = {key: value for key, value in payload.items() if key not in ("model", "optimizer")}
    return model, cfg, info


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "MODEL_KEYS",
    "TRAINING_KEYS",
    "checkpoint_config",
    "load_checkpoint",
    "load_model_state",
    "read_checkpoint",
    "save_checkpoint",
]
