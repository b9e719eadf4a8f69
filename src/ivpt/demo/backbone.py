"""``ivpt_demo_vit``: the small Vision Transformer the demo tunes, registered with timm.

It is a stock :class:`timm.models.vision_transformer.VisionTransformer` (64 px input, 8 px patches, so an
8 x 8 patch grid; width 96, 6 blocks, 3 heads) whose weights were trained by ``ivpt pretrain-backbone``
on the ``"pretrain"`` family of the synthetic data set: other classes, other class-defining parts than
the demo's task. The weights ship with the package (:data:`WEIGHTS_FILE`, safetensors, backbone only),
so any config can use it offline::

    model.arch=ivpt_demo_vit model.pretrained=true

Importing this module registers the name; ``timm.create_model("ivpt_demo_vit", pretrained=True,
img_size=96)`` then builds it with the shipped weights, the position embedding resampled by timm to the
larger grid. ``pretrained_cfg_overlay=dict(file=...)`` (what ``model.pretrained_file`` sets) loads another
weight file of the same shape instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ivpt.errors import IVPTError

DEMO_ARCH = "ivpt_demo_vit"
WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "assets" / f"{DEMO_ARCH}.safetensors"

# The architecture the shipped weights belong to. Small enough that the whole demo (three tuning runs,
# their evaluations, figures and report) fits in minutes on two CPU cores.
DEMO_VIT_ARGS: dict[str, Any] = dict(
    img_size=64,
    patch_size=8,
    embed_dim=96,
    depth=6,
    num_heads=3,
    mlp_ratio=4.0,
)

# timm reads the pretrained configs of a module from its ``default_cfgs`` when ``register_model`` runs.
default_cfgs = generate_default_cfgs(
    {
        f"{DEMO_ARCH}.synthetic_pretrain": dict(
            file=str(WEIGHTS_FILE),
            # The file holds the backbone without a classifier: any num_classes gets a fresh head.
            num_classes=0,
            input_size=(3, DEMO_VIT_ARGS["img_size"], DEMO_VIT_ARGS["img_size"]),
            crop_pct=1.0,
            interpolation="bicubic",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            first_conv="patch_embed.proj",
            classifier="head",
            license="mit",
        )
    }
)


def require_weights() -> Path:
    """The shipped weight file's path.

    Raises:
        IVPTError: the file is missing (a source checkout where ``ivpt pretrain-backbone`` has not been
            run, or a damaged install).
    """
    if not WEIGHTS_FILE.is_file():
        raise IVPTError(
            f"{DEMO_ARCH}: the pretrained weight file '{WEIGHTS_FILE}' is missing; recreate it with "
            f"'ivpt pretrain-backbone --out {WEIGHTS_FILE}' or set model.pretrained=false"
        )
    return WEIGHTS_FILE


@register_model
def ivpt_demo_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The demo ViT (see the module docstring); ``kwargs`` override :data:`DEMO_VIT_ARGS` and timm options.

    Raises:
        IVPTError: ``pretrained`` is set, no other file is given, and the shipped weight file is missing.
    """
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and "file" not in overlay:
        require_weights()
    model_args = {**DEMO_VIT_ARGS, **kwargs}
    return build_model_with_cfg(
        VisionTransformer,
        DEMO_ARCH,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **model_args,
    )


__all__ = ["DEMO_ARCH", "DEMO_VIT_ARGS", "WEIGHTS_FILE", "ivpt_demo_vit", "require_weights"]
