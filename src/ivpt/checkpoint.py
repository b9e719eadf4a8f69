"""Checkpoint files: atomic writing, integrity digests, validated reading. Used by the model, engine and viz.

Two file kinds, both read without unpickling code:

- **training checkpoints** (``last.pt``, ``best.pt``, ``ivpt convert-official``): a plain dict saved with
  :func:`torch.save` and read with ``torch.load(weights_only=True)``: ``format="ivpt"``, ``version``,
  ``config`` (``Config.to_dict()``), ``class_names``, ``part_names``, ``model`` (the stored tensors, see
  below), ``frozen`` and ``sha256``; training checkpoints add ``optimizer``, ``scheduler``, ``scaler``,
  ``epoch``, ``step``, ``rng`` and ``best_metric`` (see :mod:`ivpt.engine.trainer`);
- **tensor files** (``model.safetensors`` of an exported model, :mod:`ivpt.model.pretrained`): safetensors
  with the digest in their metadata.

``model`` holds what training changed. Frozen backbone tensors that timm's pretrained weights re-create
(``model.pretrained=true``) are left out; ``frozen`` lists their names and the sha256 of their values, which
the loader compares with what timm gave it. ``sha256`` is a digest of every tensor in the file (names,
dtypes, shapes, bytes), checked on every read: flipped bytes on disk are an error naming the file, never a
model that silently predicts worse. Version 1 files (every tensor stored, no digest) are still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from ivpt.config import Config, apply_overrides, validate
from ivpt.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "ivpt"
CHECKPOINT_VERSION = 2
MODEL_KEYS = ("format", "version", "config", "class_names", "part_names", "model")
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "step", "rng", "best_metric")
DIGEST_KEY = "sha256"
# How many offending names an error message lists before it only counts the rest.
_LISTED = 6


# --- digests ------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 (hex) of named tensors: each one's name, dtype, shape and bytes, in the order given."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _named_tensors(value: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside nested dicts / lists / tuples, named by its path (``model/backbone.pos_embed``)."""
    if isinstance(value, Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _named_tensors(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _named_tensors(item, f"{path}/{index}")


def payload_digest(payload: Mapping[str, Any]) -> str:
    """The digest of every tensor in a checkpoint dict (its ``sha256`` entry left out)."""
    return tensor_digest(_named_tensors({k: v for k, v in payload.items() if k != DIGEST_KEY}))


def _check_digest(recorded: Any, computed: str, path: Path, what: str) -> None:
    if recorded != computed:
        raise CheckpointError(
            f"{what} '{path}' is damaged: its tensor data does not match the sha256 recorded when it was written "
            f"({str(recorded)[:12]}... recorded, {computed[:12]}... now); use another copy or an earlier checkpoint"
        )


# --- writing ------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` with its ``sha256`` digest to ``path`` atomically (see :func:`write_atomically`)."""
    stamped = {**payload, DIGEST_KEY: payload_digest(payload)}
    return write_atomically(path, lambda file: torch.save(stamped, file))


class _RecordingWriter:
    """A file wrapper that remembers the OS error of a failed write: torch's zip writer replaces it with
    an ``[enforce fail at inline_container.cc] unexpected pos`` message that says nothing."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()

    def __getattr__(self, name: str) -> Any:  # tell, seek... for writers that use them (zipfile, numpy)
        return getattr(self.file, name)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], Any], mode: int | None = None) -> Path:
    """Write a file through ``write(file)`` so that no reader ever sees it half written.

    The data goes to a temporary file in the same folder, is flushed to disk, gets ``mode`` (the
    temporary file is private, 0600, otherwise), and then replaces ``path`` in one ``os.replace``: a
    reader (or a run killed mid-write) sees the old file or the new one, never a torn one.

    Raises:
        CheckpointError: ``could not write <path>: <reason>`` when the disk is full, a file size limit
            is hit, the folder cannot be written...; the previous file at ``path`` is left as it was.
    """
    path = Path(path)
    tmp_name: str | None = None
    writer: _RecordingWriter | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            writer = _RecordingWriter(file)
            write(writer)  # type: ignore[arg-type]
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        cause = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(cause, OSError):
            raise CheckpointError(f"could not write {path}: {cause.strerror or cause}") from None
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


def save_tensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors as safetensors, atomically, with their digest in the metadata (:func:`read_tensors`)."""
    from safetensors.torch import save

    ordered = {name: tensors[name].detach().to("cpu").contiguous() for name in sorted(tensors)}
    header = {**(metadata or {}), DIGEST_KEY: tensor_digest(ordered.items())}
    data = save(ordered, metadata=header)
    return write_atomically(path, lambda file: file.write(data))


def read_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file written by :func:`save_tensors` on the CPU and check its digest.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        CheckpointError: the file is missing, is not a safetensors file, or its data does not match its digest.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"weight file '{path}' is not a readable safetensors file ({_first_line(exc)})") from None
    if DIGEST_KEY not in metadata:
        raise CheckpointError(f"weight file '{path}' has no sha256 in its metadata; it was not written by ivpt")
    computed = tensor_digest((name, tensors[name]) for name in sorted(tensors))
    _check_digest(metadata[DIGEST_KEY], computed, path, "weight file")
    return tensors, metadata


def write_json(path: str | Path, values: Mapping[str, Any]) -> Path:
    """Write ``values`` as indented JSON, atomically."""
    text = json.dumps(values, indent=2) + "\n"
    return write_atomically(path, lambda file: file.write(text.encode()))


# --- reading ------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, *, training: bool = False) -> dict[str, Any]:
    """Load and check an ivpt checkpoint on the CPU.

    Args:
        path: the ``.pt`` file.
        training: also require the entries needed to resume training.

    Raises:
        CheckpointError: the file is missing, is not a PyTorch file, holds something other than an
            ivpt checkpoint, lacks required entries, or its tensors do not match its digest. The message
            names the file and the problem.
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
    if version >= 2:
        if DIGEST_KEY not in payload:
            raise CheckpointError(f"checkpoint '{path}' lacks its sha256 entry; it was not written by ivpt")
        _check_digest(payload[DIGEST_KEY], payload_digest(payload), path, "checkpoint")
    required = MODEL_KEYS + (TRAINING_KEYS if training else ())
    missing = [key for key in required if key not in payload]
    if missing:
        purpose = "to resume training" if training else "to rebuild the model"
        raise CheckpointError(f"checkpoint '{path}' lacks the entries {', '.join(missing)} needed {purpose}")
    state = payload["model"]
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
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


def checkpoint_config(payload: Mapping[str, Any], path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The checkpoint's stored config with ``overrides`` applied, ready to rebuild its model.

    Pretrained loading stays on only when the checkpoint left frozen backbone tensors to timm's pretrained
    weights (:func:`frozen_keys`); otherwise every weight comes from the file, and building the model must
    not reach for a model hub.

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
    require_pretrained(cfg, frozen_keys(payload), f"checkpoint '{path}'")
    return cfg


def require_pretrained(cfg: Config, frozen: Sequence[str], source: str) -> None:
    """Turn pretrained loading off when a file stores every tensor; refuse to when it relies on it.

    Raises:
        CheckpointError: the file leaves frozen tensors to the pretrained weights, but ``cfg`` (after
            the caller's overrides) builds the model without them.
    """
    if not frozen:
        cfg.model.pretrained = False
        cfg.model.pretrained_file = ""
    elif not cfg.model.pretrained:
        raise CheckpointError(
            f"{source} leaves {len(frozen)} frozen backbone tensors to the pretrained weights of "
            f"'{cfg.model.arch}', so model.pretrained must stay true (model.pretrained_file=... names a local copy)"
        )


# --- model states -------------------------------------------------------------------------------------


def frozen_record(state: Mapping[str, Tensor], names: Iterable[str]) -> dict[str, Any]:
    """The ``frozen`` entry for state-dict keys left out of a file: ``{"keys": [...], "sha256": ...}``."""
    keys = sorted(names)
    return {"keys": keys, DIGEST_KEY: tensor_digest((key, state[key]) for key in keys)}


def frozen_keys(payload: Mapping[str, Any]) -> list[str]:
    """The state-dict keys a checkpoint left to the pretrained backbone (empty: it stores every tensor)."""
    frozen = payload.get("frozen") or {}
    return list(frozen.get("keys", [])) if isinstance(frozen, Mapping) else []


def state_mismatches(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], limit: int | None = None
) -> list[str]:
    """Describe how ``found`` (key -> shape, from a file) differs from ``expected`` (from the model).

    Returns one string per kind of problem (missing keys, unexpected keys, shape mismatches), each
    naming the keys with their shapes (at most ``limit`` per kind); an empty list when they agree.
    """
    missing = [f"{k} {tuple(s)}" for k, s in expected.items() if k not in found]
    unexpected = [f"{k} {tuple(s)}" for k, s in found.items() if k not in expected]
    mismatched = [
        f"{k} file {tuple(found[k])} vs model {tuple(s)}"
        for k, s in expected.items()
        if k in found and tuple(found[k]) != tuple(s)
    ]
    kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    return [f"{label}: {_listing(items, limit)}" for label, items in kinds if items]


def _listing(items: list[str], limit: int | None) -> str:
    if limit is None or len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def load_model_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    path: str | Path,
    frozen: Mapping[str, Any] | None = None,
) -> None:
    """Load ``state`` into ``model``; the keys ``frozen`` lists must already hold the recorded values.

    Every key of the model must be in ``state`` or in ``frozen["keys"]``, with the model's shape; the
    model's tensors of the frozen keys (from timm's pretrained weights) must match ``frozen["sha256"]``.

    Raises:
        CheckpointError: listing every mismatch, or saying that the pretrained weights differ.
    """
    model_state = model.state_dict()
    omitted = list((frozen or {}).get("keys", []))
    unknown = [key for key in omitted if key not in model_state]
    stored = {key: tuple(value.shape) for key, value in model_state.items() if key not in set(omitted)}
    problems = state_mismatches(stored, {key: tuple(value.shape) for key, value in state.items()}, limit=_LISTED)
    if unknown:
        problems.append(f"frozen keys the model lacks: {_listing(unknown, _LISTED)}")
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit the model built from its config; " + "; ".join(problems)
        )
    if omitted and frozen_record(model_state, omitted)[DIGEST_KEY] != frozen[DIGEST_KEY]:  # type: ignore[index]
        raise CheckpointError(
            f"checkpoint '{path}' was trained on other frozen backbone weights than the pretrained ones loaded now "
            "(their sha256 differs): a different timm release or weight file; point model.pretrained_file at "
            "the weights it was trained with"
        )
    model.load_state_dict(dict(state), strict=not omitted)


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DIGEST_KEY",
    "MODEL_KEYS",
    "TRAINING_KEYS",
    "checkpoint_config",
    "frozen_keys",
    "frozen_record",
    "load_model_state",
    "payload_digest",
    "require_pretrained",
    "read_checkpoint",
    "read_tensors",
    "save_checkpoint",
    "save_tensors",
    "state_mismatches",
    "tensor_digest",
    "write_atomically",
    "write_json",
]
