"""The offline demo (``ivpt demo``, ``make demo``) and the small ViT it tunes (``ivpt_demo_vit``).

- :func:`run_demo`: synthetic data -> IVPT, VPT-Deep and a linear probe on the shipped frozen backbone ->
  ``ivpt eval`` metrics, ``ivpt explain`` figures, the ``ivpt report`` page and a results table;
- :func:`pretrain_backbone`: retrains the shipped backbone weights (``ivpt pretrain-backbone``);

The small ViT itself, ``ivpt_demo_vit``, is a model architecture: :mod:`ivpt.model.demo_vit` defines it and
registers it with timm. Names are imported lazily, so that ``import ivpt.demo`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "run_demo": "ivpt.demo.run",
    "pretrain_backbone": "ivpt.demo.pretrain",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ivpt.demo' has no attribute {name!r}")


__all__ = sorted(_LAZY)
