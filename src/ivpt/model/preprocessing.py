"""How images are prepared for a model: input size and normalisation, from the config or from the backbone.

``model.img_size``, ``data.mean`` and ``data.std`` may be left unset (``None``): they then come from the
backbone's timm ``pretrained_cfg`` (``input_size``, ``mean``, ``std``), which is right for ImageNet-, CLIP-
and SigLIP-style backbones alike. ``ivpt train`` resolves them before it starts, so ``config.yaml`` and every
checkpoint hold the values the model was trained with.

The rest of the preparation is ivpt's own test transform (:mod:`ivpt.data.transforms`): the short side is
resized to ``img_size`` with PIL's bilinear filter (over the whole footprint, so it does not alias), then the
centre ``img_size`` square is cropped; timm's ``interpolation`` and ``crop_pct`` are not used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg

from ivpt.errors import ConfigError

if TYPE_CHECKING:
    from ivpt.config import Config

# What ivpt's test transform does after the normalisation values (see the module docstring).
RESIZE = "shortest_edge"
INTERPOLATION = "bilinear"
CROP_PCT = 1.0
CROP_MODE = "center"


@dataclass(frozen=True)
class Preprocessing:
    """The inputs a model expects: ``(3, img_size, img_size)`` images normalised with ``mean`` / ``std``.

    ``img_size`` is ``(H, W)`` for a model built on non-square inputs (which ivpt's transforms do not make).
    """

    img_size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """The timm-style description stored in an exported model's ``config.json``."""
        height, width = self.img_size if isinstance(self.img_size, tuple) else (self.img_size, self.img_size)
        return {
            "input_size": [3, height, width],
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": RESIZE,
            "interpolation": INTERPOLATION,
            "crop_pct": CROP_PCT,
            "crop_mode": CROP_MODE,
        }


def backbone_defaults(arch: str) -> tuple[int | None, tuple[float, ...], tuple[float, ...]]:
    """``(img_size, mean, std)`` of a timm architecture's pretrained config.

    ``img_size`` is ``None`` when timm knows no pretrained config for ``arch`` (a name it cannot describe
    without downloading, such as ``hf-hub:...``); mean and std then fall back to ImageNet's, as in timm.
    """
    pretrained_cfg = get_pretrained_cfg(arch)
    if pretrained_cfg is None:
        return None, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return (
        int(pretrained_cfg.input_size[-1]),
        tuple(float(v) for v in pretrained_cfg.mean),
        tuple(float(v) for v in pretrained_cfg.std),
    )


def preprocessing_of(cfg: Config) -> Preprocessing:
    """The preprocessing ``cfg`` describes: its own values where set, the backbone's elsewhere.

    Raises:
        ConfigError: ``model.img_size`` is unset and the backbone has no default input size.
    """
    img_size, mean, std = cfg.model.img_size, cfg.data.mean, cfg.data.std
    if img_size is None or mean is None or std is None:
        default_size, default_mean, default_std = backbone_defaults(cfg.model.arch)
        if img_size is None and default_size is None:
            raise ConfigError(
                f"config key 'model.img_size': timm has no pretrained config for '{cfg.model.arch}' to take "
                "the input size from; set model.img_size"
            )
        img_size = default_size if img_size is None else img_size
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
    return Preprocessing(int(img_size), tuple(mean), tuple(std))  # type: ignore[arg-type]


def resolve_preprocessing(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``model.img_size``, ``data.mean`` and ``data.std`` set (:func:`preprocessing_of`)."""
    resolved = copy.deepcopy(cfg)
    preprocessing = preprocessing_of(cfg)
    resolved.model.img_size = preprocessing.img_size
    resolved.data.mean = preprocessing.mean
    resolved.data.std = preprocessing.std
    return resolved


__all__ = ["Preprocessing", "backbone_defaults", "preprocessing_of", "resolve_preprocessing"]
