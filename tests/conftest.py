"""Fixtures shared across test packages: a tiny synthetic data set and a CPU-sized config."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from ivpt.config import Config, load_config

# No test may touch the network: the only pretrained weights the tests load are the demo backbone's,
# shipped inside the package; any attempt to reach the model hub fails at once instead of waiting.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _no_download(*args: object, **kwargs: object) -> None:
    raise RuntimeError(f"tests must not download weights (asked for {args[0] if args else kwargs})")


def _block_url_downloads() -> None:
    """HF_HUB_OFFLINE covers the Hugging Face hub only; timm's older weights come through torch.hub URLs.

    timm is imported here, after HF_HUB_OFFLINE is set: huggingface_hub reads it when first imported.
    """
    import timm.models._builder

    torch.hub.load_state_dict_from_url = _no_download
    torch.hub.download_url_to_file = _no_download
    timm.models._builder.load_state_dict_from_url = _no_download


_block_url_downloads()

# The test models are tiny: extra threads only add synchronisation, and on a shared machine a busy
# neighbour core makes every intra-op barrier wait (evaluations ran 40x slower with two threads).
torch.set_num_threads(1)

# A 3-block, 32-wide ViT on 32 px inputs (4 x 4 patch grid): a training step takes milliseconds.
TINY_MODEL_OVERRIDES = (
    "model.arch=vit_tiny_patch16_224",
    "model.pretrained=false",
    "model.img_size=32",
    "model.n_pro=[6,5,4]",
    "model.backbone_args={patch_size: 8, depth: 3, embed_dim: 32, num_heads: 2}",
    "model.freeze=tokens",
)


@pytest.fixture(scope="session")
def tiny_model_overrides() -> list[str]:
    """``model.*`` overrides of the tiny ViT (no data needed)."""
    return list(TINY_MODEL_OVERRIDES)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CUB-layout synthetic data set: 4 classes x 16 images of 64 px (32 train, 32 test), with keypoints and masks."""
    from ivpt.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, num_classes=4, per_class=16, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def undated_page() -> Callable[[Path], str]:
    """An ``ivpt report`` page's text without the minute it was written, the one line two runs differ in."""

    def read(index: Path) -> str:
        return re.sub(r"Written [0-9-]+ [0-9:]+", "Written <date>", index.read_text())

    return read


@pytest.fixture
def tiny_overrides(synthetic_root: Path, tmp_path: Path) -> Callable[..., list[str]]:
    """``tiny_overrides(*extra)``: ``key=value`` strings of the tiny run (for command lines too).

    The run writes to ``tmp_path/run``; later overrides win.
    """

    def make(*extra: str) -> list[str]:
        return _tiny_overrides(synthetic_root, tmp_path / "run", extra)

    return make


@pytest.fixture
def tiny_config(tiny_overrides: Callable[..., list[str]]) -> Callable[..., Config]:
    """``tiny_config(*overrides)``: a config for the tiny model on the synthetic set, writing to tmp_path/run."""

    def make(*overrides: str) -> Config:
        return load_config(None, tiny_overrides(*overrides))

    return make


def _tiny_overrides(root: Path, out_dir: Path, extra: Sequence[str]) -> list[str]:
    return [
        *TINY_MODEL_OVERRIDES,
        "data.dataset=cub",
        f"data.root={root}",
        "data.num_workers=0",
        "data.val_fraction=0.25",
        "data.augment=flip",
        "train.batch_size=8",
        "train.epochs=2",
        "train.device=cpu",
        "train.progress=false",
        "train.log_every_steps=1",
        f"train.out_dir={out_dir}",
        "eval.batch_size=8",
        "eval.map_size=64",
        "eval.box_half_size=10",
        *extra,
    ]
