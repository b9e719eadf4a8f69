"""ivpt: Interpretable Visual Prompt Tuning on frozen timm Vision Transformers.

Public entry points (imported lazily so that ``ivpt --help`` stays fast):

- :func:`ivpt.create_model` builds IVPT or a baseline on any timm ViT;
- :func:`ivpt.from_pretrained` / :func:`ivpt.save_pretrained` load and save trained models (a folder with
  ``config.json`` and ``model.safetensors``, or ``hf-hub:org/name``);
- :func:`ivpt.transforms_for` gives the image transform a model needs;
- :func:`ivpt.load_official_checkpoint` loads a snapshot saved by the authors' code;
- :func:`ivpt.load_checkpoint` loads a checkpoint written by ``ivpt train`` (or an exported folder) with its config;
- :func:`ivpt.explain` explains one image;
- :func:`ivpt.load_config` builds a :class:`ivpt.config.Config` from YAML and overrides.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "ivpt.model",
    "load_official_checkpoint": "ivpt.model.official",
    "load_checkpoint": "ivpt.model.pretrained",
    "from_pretrained": "ivpt.model.pretrained",
    "save_pretrained": "ivpt.model.pretrained",
    "transforms_for": "ivpt.data.transforms",
    "explain": "ivpt.viz.explain",
    "load_config": "ivpt.config",
    "Config": "ivpt.config",
    "IVPTOutput": "ivpt.model.output",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ivpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY) + ["__version__"]
