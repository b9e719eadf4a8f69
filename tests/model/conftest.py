"""Tiny randomly initialised ViTs (4 blocks, width 32) shared by the model tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ivpt.model import create_model

# Each entry: timm name, input size, backbone_args; every one gives a 4-block, 32-wide network.
TINY_ARCHS: dict[str, tuple[str, int | tuple[int, int], dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", 32, dict(patch_size=8, depth=4, embed_dim=32, num_heads=2)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", 28, dict(patch_size=7, depth=4, embed_dim=32, num_heads=2)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", 32, dict(patch_size=8, depth=4, embed_dim=32, num_heads=2)),
    "non_square": ("vit_tiny_patch16_224", (32, 48), dict(patch_size=8, depth=4, embed_dim=32, num_heads=2)),
}
NUM_CLASSES = 7
N_PRO = (6, 5, 4)


def tiny_model(kind: str = "vit", n_pro: tuple[int, ...] = N_PRO, seed: int = 0, **options: Any) -> nn.Module:
    """A tiny model of ``TINY_ARCHS[kind]``; ``options`` go to :func:`ivpt.model.create_model`."""
    arch, img_size, backbone_args = TINY_ARCHS[kind]
    torch.manual_seed(seed)
    return create_model(arch, NUM_CLASSES, img_size, n_pro, backbone_args=backbone_args, **options)


def tiny_images(kind: str = "vit", batch: int = 2, seed: int = 1) -> torch.Tensor:
    _, img_size, _ = TINY_ARCHS[kind]
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def make_model():
    """``make_model(kind="vit", n_pro=(6, 5, 4), seed=0, **create_model_options)``."""
    return tiny_model


@pytest.fixture
def make_images():
    """``make_images(kind="vit", batch=2, seed=1)`` -> ``(B, 3, H, W)`` normal noise for that arch."""
    return tiny_images


@pytest.fixture
def tiny_archs() -> dict[str, tuple[str, int | tuple[int, int], dict[str, Any]]]:
    return TINY_ARCHS


@pytest.fixture
def images() -> torch.Tensor:
    return tiny_images()
