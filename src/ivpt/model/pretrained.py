"""Saving and loading trained models: ``save_pretrained`` / ``from_pretrained`` folders and training checkpoints.

An exported model is a folder, as on the Hugging Face Hub:

- ``config.json``: ``format`` / ``format_version``, ``class_names``, ``part_names``, ``config`` (the resolved
  :class:`ivpt.config.Config` the loader rebuilds the model from), and two sections that restate it for
  people and other tools (checked against ``config`` on load): ``backbone`` (timm name, pretrained tag,
  weight source) and ``preprocessing`` (input size, mean, std, resize, interpolation, crop); ``weights``
  names the tensor file and the frozen tensors it leaves out (:mod:`ivpt.checkpoint`);
- ``model.safetensors``: only the tensors that training changed (prototypes, heads, prompts, the backbone's
  trained tokens...), with their sha256 in the metadata. The frozen backbone comes from timm's pretrained
  weights (``model.pretrained=true``) or the local file the config or the caller names.

Nothing on these paths unpickles: ``config.json`` is JSON, the tensors are safetensors, and training
checkpoints are read with ``torch.load(weights_only=True)``. ``hf-hub:org/name[@revision]`` downloads the two
files with ``huggingface_hub``, as timm does for its own ``hf-hub:`` names.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

import ivpt
from ivpt.checkpoint import (
    checkpoint_config,
    frozen_keys,
    frozen_record,
    load_model_state,
    read_checkpoint,
    read_tensors,
    require_pretrained,
    save_tensors,
    write_json,
)
from ivpt.config import Config, apply_overrides, validate
from ivpt.errors import CheckpointError, ConfigError, IVPTError
from ivpt.model.backbone import ViTModel
from ivpt.model.factory import build_model
from ivpt.model.preprocessing import preprocessing_of, resolve_preprocessing

PRETRAINED_FORMAT = "ivpt-pretrained"
PRETRAINED_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HUB_PREFIX = "hf-hub:"
_BACKBONE_PREFIX = "backbone."
_REQUIRED = ("format", "format_version", "class_names", "part_names", "config", "backbone", "preprocessing", "weights")


# --- what a file stores -------------------------------------------------------------------------------


def pretrained_keys(model: nn.Module) -> list[str]:
    """State-dict keys that timm's pretrained weights re-create, so files leave them out.

    They are the backbone's tensors that do not train (frozen parameters and buffers) of a model created
    with ``pretrained=True``. Everything else is stored: whatever trains under the model's freeze mode
    (prefix tokens and position embedding with ``freeze="tokens"``, every block with ``"full"``), and every
    tensor outside the backbone (prototypes, prompts, heads: randomly initialised, so not re-creatable even
    when frozen). A model built without pretrained weights has a random backbone: nothing is left out.
    """
    config = getattr(model, "model_config", None)
    if config is None or not config.pretrained:
        return []
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return [key for key in model.state_dict() if key.startswith(_BACKBONE_PREFIX) and key not in trained]


def model_entries(model: nn.Module, frozen: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``model`` (stored tensors) and ``frozen`` (keys left out, their sha256) entries of a file.

    Args:
        model: the model to store.
        frozen: a ``frozen`` record made earlier for this model (the trainer makes it once: the frozen
            tensors never change, and hashing a ViT-B backbone takes a while); ``None``: made now.
    """
    state = model.state_dict()
    if frozen is None:
        frozen = frozen_record(state, pretrained_keys(model))
    left_out = set(frozen["keys"])
    return {"model": {key: value for key, value in state.items() if key not in left_out}, "frozen": dict(frozen)}


# --- exported folders ---------------------------------------------------------------------------------


def backbone_description(cfg: Config) -> dict[str, Any]:
    """The ``backbone`` section of ``config.json``: timm name, pretrained tag and where the weights come from."""
    arch = cfg.model.arch
    name, tag = split_model_name_tag(arch)
    if not tag and not arch.startswith(HUB_PREFIX):
        default = get_pretrained_cfg(arch)
        tag = default.tag if default is not None and default.tag else ""
    return {
        "timm_name": arch,
        "architecture": name,
        "tag": tag,
        "pretrained": cfg.model.pretrained,
        "pretrained_file": cfg.model.pretrained_file,
        "args": dict(cfg.model.backbone_args),
    }


def _described(cfg: Config) -> dict[str, Any]:
    return {"backbone": backbone_description(cfg), "preprocessing": preprocessing_of(cfg).to_dict()}


def write_pretrained(
    folder: str | Path,
    cfg: Config,
    class_names: Sequence[str],
    part_names: Sequence[str],
    entries: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (see the module docstring); returns ``folder``.

    Args:
        cfg: the resolved config (its input size and normalisation set).
        entries: ``model`` and ``frozen`` as :func:`model_entries` makes them.
        source: recorded as ``source`` (the training checkpoint exported, its epoch...).
    """
    folder = Path(folder)
    save_tensors(folder / WEIGHTS_FILE, entries["model"], metadata={"format": "pt"})
    values = {
        "format": PRETRAINED_FORMAT,
        "format_version": PRETRAINED_VERSION,
        "ivpt_version": ivpt.__version__,
        "method": cfg.model.method,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "part_names": list(part_names),
        **_described(cfg),
        "weights": {"file": WEIGHTS_FILE, "frozen": dict(entries["frozen"])},
        "source": dict(source or {}),
        "config": cfg.to_dict(),
    }
    write_json(folder / CONFIG_FILE, values)
    return folder


def save_pretrained(
    model: nn.Module,
    folder: str | Path,
    *,
    config: Config | None = None,
    class_names: Sequence[str] | None = None,
    part_names: Sequence[str] | None = None,
) -> Path:
    """Save a model to ``folder`` (``config.json`` + ``model.safetensors``) for :func:`from_pretrained`.

    Args:
        model: a model from :func:`ivpt.create_model`, :func:`from_pretrained` or a checkpoint.
        folder: created if needed; the two files in it are replaced atomically.
        config: the run's config, for its ``data``/``eval`` sections (what ``ivpt eval`` on the folder
            uses); its ``model`` section and normalisation are taken from the model itself.
        class_names, part_names: default: the model's own (from the file it was loaded from), else
            ``"0"``, ``"1"``... and none.

    Raises:
        IVPTError: the model was not created by ivpt, takes non-square images, or the names do not fit.
    """
    model_config = getattr(model, "model_config", None)
    prep = getattr(model, "preprocessing", None)
    if not isinstance(model, ViTModel) or model_config is None or prep is None:
        raise IVPTError("save_pretrained: expected a model made by ivpt.create_model (it records its options)")
    if not isinstance(prep.img_size, int):
        raise IVPTError(f"save_pretrained: models on non-square inputs {prep.img_size} cannot be saved yet")
    cfg = copy.deepcopy(config) if config is not None else Config()
    cfg.model = copy.deepcopy(model_config)
    cfg.model.img_size = prep.img_size
    cfg.data.mean, cfg.data.std = tuple(prep.mean), tuple(prep.std)
    names = list(class_names or model.class_names or [str(i) for i in range(model.num_classes)])
    if len(names) != model.num_classes:
        raise IVPTError(f"save_pretrained: {len(names)} class names for a model with {model.num_classes} classes")
    parts = list(part_names if part_names is not None else (model.part_names or []))
    return write_pretrained(folder, cfg, names, parts, model_entries(model))


def _hub_files(source: str) -> Path:
    """Download ``config.json`` and ``model.safetensors`` of ``hf-hub:org/name[@revision]``; their folder."""
    repo_id, _, revision = source[len(HUB_PREFIX) :].partition("@")
    try:
        from huggingface_hub import hf_hub_download

        config_path = hf_hub_download(repo_id, CONFIG_FILE, revision=revision or None)
        hf_hub_download(repo_id, WEIGHTS_FILE, revision=revision or None)
    except Exception as exc:  # offline, unknown repository, missing file: all one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot download '{source}' from the Hugging Face Hub: {first}") from None
    return Path(config_path).parent


def read_pretrained_config(folder: Path) -> dict[str, Any]:
    """Read and check ``folder/config.json``.

    Raises:
        CheckpointError: missing, not JSON, another format or version, or entries missing.
    """
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"model folder '{folder}' has no {CONFIG_FILE}; an exported ivpt model has one (ivpt export writes it)"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{path}' is not valid JSON ({exc})") from None
    if not isinstance(values, dict) or values.get("format") != PRETRAINED_FORMAT:
        raise CheckpointError(f"'{path}' is not an exported ivpt model: no format='{PRETRAINED_FORMAT}' entry")
    version = values.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= PRETRAINED_VERSION:
        raise CheckpointError(
            f"'{path}' has format_version {version!r}; this ivpt reads versions 1..{PRETRAINED_VERSION}"
        )
    missing = [key for key in _REQUIRED if key not in values]
    if missing:
        raise CheckpointError(f"'{path}' lacks the entries {', '.join(missing)}")
    return values


def _folder_model(
    folder: Path, overrides: Sequence[str], pretrained_file: str | None
) -> tuple[ViTModel, Config, dict[str, Any]]:
    values = read_pretrained_config(folder)
    path = folder / CONFIG_FILE
    try:
        cfg = Config.from_dict(values["config"], source=f"'{path}'")
        validate(cfg)
    except ConfigError as exc:
        raise CheckpointError(f"'{path}': its config is invalid: {exc}") from None
    for section, described in _described(cfg).items():
        if values[section] != described:
            raise CheckpointError(
                f"'{path}': its '{section}' section disagrees with its 'config' (the loader builds the model from "
                f"'config'; edit that): {values[section]} vs {described}"
            )
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    weights = values["weights"]
    if not isinstance(weights, dict) or not isinstance(weights.get("frozen", {}), dict):
        raise CheckpointError(f"'{path}': entry 'weights' must be a mapping with 'file' and 'frozen'")
    frozen = weights.get("frozen") or {"keys": []}
    if pretrained_file is not None:
        cfg.model.pretrained_file = pretrained_file
    require_pretrained(cfg, frozen.get("keys", []), f"'{folder}'")
    weights_path = folder / str(weights.get("file", WEIGHTS_FILE))
    tensors, _ = read_tensors(weights_path)
    class_names = _class_names(values["class_names"], path)
    model = build_model(cfg, num_classes=len(class_names))
    load_model_state(model, tensors, weights_path, frozen=frozen)
    info = {"class_names": class_names, "part_names": list(values["part_names"]), **dict(values.get("source") or {})}
    return model, cfg, info


def _class_names(names: Any, path: Path | str) -> list[str]:
    if not isinstance(names, list) or not names:
        raise CheckpointError(f"'{path}': entry 'class_names' must be a non-empty list of names")
    return [str(name) for name in names]


# --- loading any of them ------------------------------------------------------------------------------


def load_checkpoint(
    source: str | Path,
    overrides: Sequence[str] = (),
    device: str | torch.device = "cpu",
    *,
    pretrained_file: str | None = None,
) -> tuple[ViTModel, Config, dict[str, Any]]:
    """Rebuild a trained model from a training checkpoint, an exported folder or a Hub id.

    Args:
        source: a ``.pt`` file written by ``ivpt train`` or ``ivpt convert-official``, a folder written
            by :func:`save_pretrained` / ``ivpt export``, or ``hf-hub:org/name[@revision]``.
        overrides: ``key=value`` config overrides applied to the stored config (e.g. ``data.root=...``
            when the data set moved).
        device: where the model is put.
        pretrained_file: a local file with the frozen backbone's weights, instead of the source the
            stored config names (timm's model hub, or a ``model.pretrained_file`` of another machine).

    Returns:
        ``(model, cfg, info)``: the model in eval mode with ``class_names`` / ``part_names`` set, the
        resolved config, and the file's remaining entries (``class_names``, ``part_names``, ``epoch``, ...;
        the bulky ``model`` and ``optimizer`` states are left out).

    Raises:
        CheckpointError: a missing, damaged or foreign file, or weights that do not fit.
    """
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        model, cfg, info = _folder_model(_hub_files(source), overrides, pretrained_file)
    elif Path(source).is_dir():
        model, cfg, info = _folder_model(Path(source), overrides, pretrained_file)
    else:
        payload = read_checkpoint(source)
        cfg = checkpoint_config(payload, source, overrides)
        if pretrained_file is not None and frozen_keys(payload):
            cfg.model.pretrained_file = pretrained_file
        class_names = _class_names(payload["class_names"], f"checkpoint '{source}'")
        model = build_model(cfg, num_classes=len(class_names))
        load_model_state(model, payload["model"], source, frozen=payload.get("frozen"))
        info = {key: value for key, value in payload.items() if key not in ("model", "optimizer", "frozen")}
    model.class_names = list(info["class_names"])
    model.part_names = list(info["part_names"])
    model.to(device).eval()
    return model, cfg, info


def checkpoint_home(source: str | Path) -> Path | None:
    """The folder whose files belong with ``source`` (``metrics.json``, ``log.jsonl``): a checkpoint's own
    folder, an exported model's folder itself; ``None`` for a Hub id."""
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return None
    path = Path(source)
    return path if path.is_dir() else path.parent


def from_pretrained(
    source: str | Path, *, device: str | torch.device = "cpu", pretrained_file: str | None = None
) -> ViTModel:
    """Load a model saved by :func:`save_pretrained` (or ``ivpt export``), like ``timm.create_model``.

    Args:
        source: the folder, ``hf-hub:org/name[@revision]``, or a training checkpoint ``.pt``.
        device: where the model is put.
        pretrained_file: local weights of the frozen backbone (default: what the saved config names).

    Returns:
        The model in eval mode, with ``class_names``, ``part_names``, ``preprocessing`` (for
        :func:`ivpt.transforms_for`) and ``model_config``.
    """
    return load_checkpoint(source, device=device, pretrained_file=pretrained_file)[0]


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a training checkpoint as an exported folder (what ``ivpt export`` runs); returns ``out``.

    The tensors are copied as they are (no model is built, nothing is downloaded); the frozen backbone
    stays with timm's pretrained weights when the checkpoint left it out.
    """
    payload = read_checkpoint(checkpoint)
    cfg = checkpoint_config(payload, checkpoint)
    class_names = _class_names(payload["class_names"], f"checkpoint '{checkpoint}'")
    entries = {"model": payload["model"], "frozen": payload.get("frozen") or frozen_record({}, [])}
    source = {"checkpoint": str(checkpoint)}
    source.update({key: payload[key] for key in ("epoch", "step", "best_metric") if key in payload})
    return write_pretrained(out, resolve_preprocessing(cfg), class_names, list(payload["part_names"]), entries, source)


__all__ = [
    "CONFIG_FILE",
    "PRETRAINED_FORMAT",
    "PRETRAINED_VERSION",
    "WEIGHTS_FILE",
    "backbone_description",
    "checkpoint_home",
    "export_checkpoint",
    "from_pretrained",
    "load_checkpoint",
    "model_entries",
    "pretrained_keys",
    "read_pretrained_config",
    "save_pretrained",
    "write_pretrained",
]
