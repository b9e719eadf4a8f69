"""The offline demo (``ivpt demo``, ``make demo``) and the small ViT it tunes (``ivpt_demo_vit``).

- :func:`run_demo`: synthetic data -> IVPT, VPT-Deep and a linear probe on the shipped frozen backbone ->
  ``ivpt eval`` metrics, ``ivpt explain`` figures, the ``ivpt report`` page and a results table;
- :func:`pretrain_backbone`: retrains the shipped backbone weights (``ivpt pretrain-backbone``);
- :mod:`ivpt.demo.backbone`: registers ``ivpt_demo_vit`` with timm when imported.

Names are imported lazily: the model package imports :mod:`ivpt.demo.backbone` to register the
architecture, and that must not pull in the training engine.
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
