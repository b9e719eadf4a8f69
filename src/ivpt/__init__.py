"""ivpt: Interpretable Visual Prompt Tuning on frozen timm Vision Transformers.

Public entry points (imported lazily so that ``ivpt --help`` stays fast):

- :func:`ivpt.create_model` builds IVPT or a baseline on any timm ViT;
- :func:`ivpt.load_official_checkpoint` loads a snapshot saved by the authors' code;
- :func:`ivpt.load_checkpoint` loads a checkpoint written by ``ivpt train``;
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
    "load_checkpoint": "ivpt.engine.checkpoint",
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
