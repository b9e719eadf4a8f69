"""Read snapshots saved by the authors' IVPT code (docs/method.md section 11) into ivpt models.

The authors save ``torch.save(dict(model_state=..., optimizer_state=..., finished_epoch=...,
epoch_test_accuracies=...))``; backbone keys are timm's own, and the IVPT modules are named:

===========================  ==============================  ================================
official key                 shape                           ivpt parameter
===========================  ==============================  ================================
``p_token.{s}``              ``(1, K_s, D)``                 ``stages.{s}.prototypes (K_s, D)``
``p_bias.{s}``               ``(1, K_s, h, w)``              ``stages.{s}.spatial_bias``
``p_linear.{s}.*``           ``Linear(D, D)``, s < S-1       ``fusions.{s}.prompt_proj.*``
``p_norm.{s}.*``             ``LayerNorm((N, D))``           ``fusions.{s}.prompt_norm.*``
``p_classifier.{s}.*``       ``Linear(D, N)``                ``fusions.{s}.grouping.*``
``modulation.*``             ``LayerNorm((D, N+1))``         ``head.modulation.*``
``fc_class_landmarks.*``     ``Linear(D, C, bias=False)``    ``head.classifier.*``
anything else                timm                            ``backbone.*``
===========================  ==============================  ================================
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ivpt.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint, state_mismatches
from ivpt.config import Config
from ivpt.errors import CheckpointError
from ivpt.model.factory import create_model
from ivpt.model.ivpt import IVPT
from ivpt.model.pretrained import model_entries

DEFAULT_N_PRO: tuple[int, ...] = (17, 14, 11, 8, 5)

# (ivpt name pattern, official replacement); the first pattern that matches the start of a name wins.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^stages\.(\d+)\.prototypes$", r"p_token.\1"),
        (r"^stages\.(\d+)\.spatial_bias$", r"p_bias.\1"),
        (r"^fusions\.(\d+)\.prompt_proj\.", r"p_linear.\1."),
        (r"^fusions\.(\d+)\.prompt_norm\.", r"p_norm.\1."),
        (r"^fusions\.(\d+)\.grouping\.", r"p_classifier.\1."),
        (r"^head\.modulation\.", "modulation."),
        (r"^head\.classifier\.", "fc_class_landmarks."),
        (r"^backbone\.", ""),
    )
)
# ivpt stores these without the official leading batch dimension of 1.
_UNBATCHED = re.compile(r"^stages\.\d+\.(prototypes|spatial_bias)$")


def official_name(ivpt_name: str) -> str:
    """The official key of an ivpt IVPT state-dict key (``stages.0.prototypes`` -> ``p_token.0``)."""
    for pattern, replacement in _RENAMES:
        if pattern.search(ivpt_name):
            return pattern.sub(replacement, ivpt_name, count=1)
    raise KeyError(f"no official name for parameter '{ivpt_name}'")


def read_official_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read the model state of an official snapshot (or of a bare state dict), without a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint '{path}' does not exist")
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure here means the file is not a loadable torch snapshot
        raise CheckpointError(f"official checkpoint '{path}' cannot be read by torch.load: {exc}") from None
    state = snapshot.get("model_state", snapshot) if isinstance(snapshot, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"official checkpoint '{path}': expected a dict with 'model_state' (a state dict of tensors) "
            f"or a bare state dict"
        )
    # DDP snapshots prefix every key with 'module.'.
    return {key.removeprefix("module."): value for key, value in state.items()}


def official_to_ivpt(state: dict[str, Tensor], model: IVPT, source: str) -> dict[str, Tensor]:
    """Rename and reshape an official state dict for ``model``.

    Raises:
        CheckpointError: listing every missing and unexpected key and every shape mismatch.
    """
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        expected[official_name(name)] = (name, (1, *shape) if _UNBATCHED.match(name) else shape)

    problems = state_mismatches(
        {key: shape for key, (_, shape) in expected.items()},
        {key: tuple(value.shape) for key, value in state.items()},
    )
    if problems:
        raise CheckpointError(f"official checkpoint '{source}' does not fit the model: {'; '.join(problems)}")
    return {
        name: state[key].reshape(shape[1:] if _UNBATCHED.match(name) else shape)
        for key, (name, shape) in expected.items()
    }


def load_official_checkpoint(
    path: str | Path,
    arch: str,
    img_size: int,
    num_classes: int,
    n_pro: tuple[int, ...] = DEFAULT_N_PRO,
    device: str | torch.device = "cpu",
    *,
    backbone_args: dict | None = None,
) -> IVPT:
    """Build IVPT (the official switches) and load an official snapshot into it.

    Args:
        path: snapshot file (``{model_state, optimizer_state, finished_epoch, epoch_test_accuracies}``
            or a bare state dict; a DDP ``module.`` prefix is stripped).
        arch, img_size, num_classes, n_pro: what the snapshot was trained with.
        device: where the model lives.
        backbone_args: extra ``timm.create_model`` arguments (tiny test networks).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: unreadable file, or keys / shapes that do not fit (all of them listed).
    """
    model = create_model(arch, num_classes, img_size, tuple(n_pro), pretrained=False, backbone_args=backbone_args)
    state = official_to_ivpt(read_official_state_dict(path), model, str(path))  # type: ignore[arg-type]
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()  # type: ignore[return-value]


def convert_official(
    snapshot: str | Path,
    arch: str,
    img_size: int,
    num_classes: int,
    n_pro: tuple[int, ...] = DEFAULT_N_PRO,
    out: str | Path = "ivpt_official.pt",
    *,
    backbone_args: dict | None = None,
) -> Path:
    """Convert an official snapshot into an ivpt checkpoint (what ``ivpt convert-official`` runs).

    Writes ``{"format": "ivpt", "version", "config", "class_names", "part_names", "model", "frozen", "sha256"}``
    atomically (temporary file in the output folder, then ``os.replace``) and returns ``out``. Every tensor
    is stored: the snapshot's backbone is whatever the authors loaded, not necessarily timm's current weights.
    """
    model = load_official_checkpoint(snapshot, arch, img_size, num_classes, n_pro, backbone_args=backbone_args)
    cfg = Config()
    cfg.model.method = "ivpt"
    cfg.model.arch = arch
    cfg.model.img_size = int(img_size)
    cfg.model.n_pro = tuple(int(k) for k in n_pro)
    cfg.model.pretrained = False
    cfg.model.backbone_args = dict(backbone_args or {})
    cfg.data.mean, cfg.data.std = model.preprocessing.mean, model.preprocessing.std
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "class_names": [str(i) for i in range(num_classes)],
        "part_names": [],
        **model_entries(model),
    }
    return save_checkpoint(out, checkpoint)
