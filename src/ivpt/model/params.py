"""Optimizer parameter groups with the per-group learning rates of the official recipe (docs/method.md §7).

=============== ===================================================================== ==================
group           parameters                                                            learning rate
=============== ===================================================================== ==================
``head``        part classifier, modulation, prompt linears and norms, grouping       ``lr_head``
                linears; the CLS classifier of the baselines
``prototypes``  prototypes and spatial biases of every stage                          ``lr_prototypes``
``vpt_prompts`` the learned prompt tokens of the VPT baselines (free vectors in       ``lr_prototypes``
                token space, like the prototypes)
``tokens``      CLS / register / distillation tokens and position embedding           ``lr_tokens``
``backbone``    every other backbone parameter (only with ``freeze="full"``)          ``lr_backbone``
=============== ===================================================================== ==================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ivpt.config import FREEZE_MODES
from ivpt.errors import ConfigError
from ivpt.model.backbone import TOKEN_PARAMETERS

if TYPE_CHECKING:
    from ivpt.config import OptimConfig

GROUP_NAMES: tuple[str, ...] = ("head", "prototypes", "vpt_prompts", "tokens", "backbone")
_GROUP_LR_KEY = {
    "head": "lr_head",
    "prototypes": "lr_prototypes",
    "vpt_prompts": "lr_prototypes",
    "tokens": "lr_tokens",
    "backbone": "lr_backbone",
}
_BACKBONE_PREFIX = "backbone."


def group_of(parameter_name: str) -> str:
    """Name of the group a parameter of an ivpt model belongs to (see the module docstring)."""
    if parameter_name.startswith(_BACKBONE_PREFIX):
        return "tokens" if parameter_name[len(_BACKBONE_PREFIX) :] in TOKEN_PARAMETERS else "backbone"
    leaf = parameter_name.rsplit(".", 1)[-1]
    if leaf in ("prototypes", "spatial_bias"):
        return "prototypes"
    if leaf == "prompt_tokens":
        return "vpt_prompts"
    return "head"


def _trainable_by_group(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[group_of(name)].append(parameter)
    return groups


def param_groups(model: nn.Module, optim_cfg: OptimConfig, freeze: str) -> list[dict[str, Any]]:
    """Torch optimizer parameter groups ``{"name", "params", "lr"}`` for every non-empty group.

    Every trainable parameter of ``model`` is in exactly one group; frozen parameters are in none.

    Args:
        model: a model from :func:`ivpt.model.create_model`.
        optim_cfg: ``cfg.optim`` (``lr_head``, ``lr_prototypes``, ``lr_tokens``, ``lr_backbone``).
        freeze: ``cfg.model.freeze``; checked against what the model actually trains.

    Raises:
        ConfigError: the model trains backbone parameters that ``freeze`` says are frozen.
    """
    groups = _trainable_by_group(model)
    allowed_backbone = {"full": ("tokens", "backbone"), "tokens": ("tokens",), "frozen": ()}.get(freeze)
    if allowed_backbone is None:
        raise ConfigError(f"config key 'model.freeze': expected one of {', '.join(FREEZE_MODES)}, got {freeze!r}")
    for name in ("tokens", "backbone"):
        if groups[name] and name not in allowed_backbone:
            raise ConfigError(
                f"config key 'model.freeze' is {freeze!r}, but the model trains {len(groups[name])} "
                f"'{name}' parameters; build the model with the same freeze mode"
            )
    return [
        {"name": name, "params": params, "lr": float(getattr(optim_cfg, _GROUP_LR_KEY[name]))}
        for name, params in groups.items()
        if params
    ]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count (elements) per group, plus ``"trainable"``, ``"frozen"`` and ``"total"``.

    Every group of :data:`GROUP_NAMES` is listed, with 0 when empty.
    """
    counts = {name: sum(p.numel() for p in params) for name, params in _trainable_by_group(model).items()}
    trainable = sum(counts.values())
    total = sum(p.numel() for p in model.parameters())
    return {**counts, "trainable": trainable, "frozen": total - trainable, "total": total}
