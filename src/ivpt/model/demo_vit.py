"""``ivpt_demo_vit``: the small Vision Transformer the demo tunes, registered with timm.

It is a timm :class:`~timm.models.vision_transformer.VisionTransformer` (64 px input, width 96, 6 blocks,
3 heads) whose patch embedding is timm's own convolutional stem, as in timm's hybrid ViTs: a
:class:`~timm.models.vision_transformer_hybrid.ConvStem` of six 3 x 3 convolutions (two per resolution,
strides 2, 1, 2, 1, 1, 1) under a :class:`~timm.models.vision_transformer_hybrid.HybridEmbed` projection.
That gives one token per 4 x 4 pixel cell (a 16 x 16 grid), like 4 px patches, but each token sees a
35 x 35 pixel window (17 px either side of its cell's first pixel; the pretraining targets are those of
the cell, so that is what the token describes). Trained from scratch on a few thousand images, a linear
patch embedding leaves the transformer to discover locality and shape on its own, which it does not do
in a CPU budget; the convolutional stem supplies both from the first step (Xiao et al., "Early convolutions help
transformers see better", 2021). The stem normalises with :class:`~timm.layers.LayerNorm2d`, not batch
norm, so a frozen backbone has no running statistics that training mode could move.

The weights were trained by ``ivpt pretrain-backbone`` on the ``"pretrain"`` family of the synthetic
data set: other classes, other class-defining parts than the demo's task. They ship with the package
(:data:`WEIGHTS_FILE`, safetensors, backbone only), so any config can use it offline::

    model.arch=ivpt_demo_vit model.pretrained=true

Importing this module registers the name; ``timm.create_model("ivpt_demo_vit", pretrained=True,
img_size=96)`` then builds it with the shipped weights, the position embedding resampled by timm to the
larger grid (the stem is convolutional and takes any size). ``pretrained_cfg_overlay=dict(file=...)``
(what ``model.pretrained_file`` sets) loads another weight file of the same shape instead.

``token_stride=8`` (``model.backbone_args={token_stride: 8}``) builds the same network with a stride of 2 in
the stem's fifth convolution too: an 8 x 8 token grid at 64 px and a quarter of the transformer's cost,
for weights trained that way by ``ivpt pretrain-backbone --token-stride 8`` (the package's first shipped
weights were; ``ivpt demo --backbone FILE`` reads the stride from the file).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.models.vision_transformer_hybrid import ConvStem, HybridEmbed
from torch import nn

from ivpt.errors import IVPTError

DEMO_ARCH = "ivpt_demo_vit"
WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "assets" / f"{DEMO_ARCH}.safetensors"

# The architecture the shipped weights belong to. Small enough that the whole demo (three tuning runs,
# their evaluations, figures and report) fits in minutes on two CPU cores. ``patch_size`` is that of the
# projection on the stem's feature map: one token per stem output position.
DEMO_VIT_ARGS: dict[str, Any] = dict(
    img_size=64,
    patch_size=1,
    embed_dim=96,
    depth=6,
    num_heads=3,
    mlp_ratio=4.0,
)
# Output channels and strides of the stem's 3 x 3 convolutions: three resolutions, two convolutions each.
STEM_CHANNELS: tuple[int, ...] = (24, 24, 48, 48, 96, 96)
# Pixels per token side the stem can give: the first one, two or all three of its resolutions halve the image.
TOKEN_STRIDES: tuple[int, ...] = tuple(2**halvings for halvings in range(1, len(STEM_CHANNELS) // 2 + 1))
# Pixels per token along each side (the stem's total stride) of the shipped weights; the default recipe of
# ``ivpt pretrain-backbone`` (:class:`ivpt.demo.recipe.PretrainRecipe`) trains at this stride.
TOKEN_STRIDE: int = 4


def stem_strides(token_stride: int = TOKEN_STRIDE) -> tuple[int, ...]:
    """Strides of the stem's convolutions for one token per ``token_stride`` x ``token_stride`` pixel cell.

    The channels and kernels stay those of :data:`STEM_CHANNELS`, so weights trained at one token stride
    load at another (only the position embedding is resampled to the new grid).

    Raises:
        IVPTError: ``token_stride`` is not one of :data:`TOKEN_STRIDES`.
    """
    if token_stride not in TOKEN_STRIDES:
        raise IVPTError(
            f"{DEMO_ARCH}: token_stride must be one of {', '.join(map(str, TOKEN_STRIDES))}, got {token_stride!r}"
        )
    halvings = int(math.log2(token_stride))
    # The first convolution of each resolution strides; resolutions past the halvings keep the size.
    return tuple(2 if index % 2 == 0 and index // 2 < halvings else 1 for index in range(len(STEM_CHANNELS)))


# The stem's strides for the shipped weights.
STEM_STRIDES: tuple[int, ...] = stem_strides(TOKEN_STRIDE)


def conv_stem_embed(token_stride: int = TOKEN_STRIDE, **embed_args: Any) -> HybridEmbed:
    """The ``embed_layer`` of the demo ViT: timm's ``ConvStem`` feeding a ``HybridEmbed`` projection.

    ``embed_args`` are what :class:`VisionTransformer` passes to its patch embedding (``img_size``,
    ``patch_size``, ``in_chans``, ``embed_dim``...); each call builds a fresh stem whose tokens cover
    ``token_stride`` x ``token_stride`` pixel cells.
    """
    stem = ConvStem(
        embed_args.get("in_chans", 3),
        depth=len(STEM_CHANNELS),
        channels=STEM_CHANNELS,
        kernel_size=3,
        stride=stem_strides(token_stride),
        norm_layer=LayerNorm2d,
        act_layer=nn.GELU,
    )
    return HybridEmbed(backbone=stem, **embed_args)


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
            first_conv="patch_embed.backbone.0.conv",
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
def ivpt_demo_vit(pretrained: bool = False, token_stride: int = TOKEN_STRIDE, **kwargs: Any) -> VisionTransformer:
    """The demo ViT (see the module docstring); ``kwargs`` override :data:`DEMO_VIT_ARGS` and timm options.

    Args:
        pretrained: load the shipped weights (or ``pretrained_cfg_overlay=dict(file=...)``).
        token_stride: pixels per token side, one of :data:`TOKEN_STRIDES` (the shipped weights were trained
            at 4: a 16 x 16 grid at 64 px; 8 gives an 8 x 8 grid at a quarter of the transformer's cost).

    Raises:
        IVPTError: ``token_stride`` is not supported, or ``pretrained`` is set, no other file is given, and
            the shipped weight file is missing.
    """
    stem_strides(token_stride)  # a bad value fails here, not inside timm's model builder
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and "file" not in overlay:
        require_weights()
    model_args = {**DEMO_VIT_ARGS, "embed_layer": partial(conv_stem_embed, token_stride), **kwargs}
    return build_model_with_cfg(
        VisionTransformer,
        DEMO_ARCH,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **model_args,
    )


__all__ = [
    "DEMO_ARCH",
    "DEMO_VIT_ARGS",
    "STEM_CHANNELS",
    "STEM_STRIDES",
    "TOKEN_STRIDE",
    "TOKEN_STRIDES",
    "WEIGHTS_FILE",
    "conv_stem_embed",
    "ivpt_demo_vit",
    "require_weights",
    "stem_strides",
]
