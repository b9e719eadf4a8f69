"""The frozen timm Vision Transformer every model of the project is built on.

The backbone is a stock ``timm`` ViT (plain ViT, DeiT with or without distillation token, DINOv2 with or
without registers, ...). Models never replace its classes or copy its attention code: they call its own
stem (``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``), its blocks one by one and its final
``norm``, which leaves room to insert prompt tokens between blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import model_entrypoint, split_model_name_tag
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ivpt.config import FREEZE_MODES, FreezeMode, ModelConfig
from ivpt.errors import ConfigError, IVPTError
from ivpt.model import demo_vit  # noqa: F401 - registers the project's small demo ViT with timm
from ivpt.model.preprocessing import Preprocessing

# Learned tokens that are trained in ``freeze="tokens"`` mode (the official recipe): they adapt the input
# sequence without touching any block weight.
TOKEN_PARAMETERS: tuple[str, ...] = ("cls_token", "reg_token", "dist_token", "pos_embed")

# timm modules whose models are VisionTransformer (or subclasses) with the stem and blocks models call.
_VIT_FAMILIES: tuple[str, ...] = ("vision_transformer", "deit", "vision_transformer_hybrid")

# Parts of a timm ViT that the project's models never call; they stay frozen in every mode so that the
# optimizer never holds parameters that cannot receive a gradient.
_UNUSED_MODULES: tuple[str, ...] = ("fc_norm", "head", "head_drop", "attn_pool")


def create_backbone(
    arch: str,
    img_size: int | tuple[int, int],
    pretrained: bool = False,
    pretrained_file: str = "",
    backbone_args: dict[str, Any] | None = None,
) -> VisionTransformer:
    """Create an unmodified timm ViT without classifier and check that models can drive it.

    Args:
        arch: timm model name, optionally with a pretrained tag (``vit_base_patch14_reg4_dinov2.lvd142m``).
        img_size: input side, or ``(height, width)``.
        pretrained: load timm's pretrained weights.
        pretrained_file: local weight file used instead of the model hub when ``pretrained`` is set.
        backbone_args: extra keyword arguments for ``timm.create_model`` (``depth``, ``embed_dim``...).

    Raises:
        ConfigError: unknown architecture, bad ``backbone_args`` or a missing ``pretrained_file``.
        IVPTError: the architecture is not a timm Vision Transformer, or pretrained weights cannot be loaded.
    """
    if not timm.is_model(arch):
        raise ConfigError(f"config key 'model.arch': '{arch}' is not a timm model name")
    module = model_entrypoint(split_model_name_tag(arch)[0]).__module__
    family = module.rsplit(".", 1)[-1]
    if family not in _VIT_FAMILIES and not module.startswith("ivpt."):
        raise IVPTError(
            f"model.arch '{arch}' is a timm '{family}' model, not a timm Vision Transformer "
            f"(expected e.g. deit_small_patch16_224 or vit_base_patch14_reg4_dinov2.lvd142m)"
        )
    kwargs: dict[str, Any] = dict(backbone_args or {})
    if pretrained and pretrained_file:
        if not Path(pretrained_file).is_file():
            raise ConfigError(f"config key 'model.pretrained_file': file '{pretrained_file}' does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    try:
        backbone = timm.create_model(arch, pretrained=pretrained, img_size=img_size, num_classes=0, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"config key 'model.backbone_args' {kwargs!r} does not fit '{arch}': {exc}") from None
    except (RuntimeError, OSError, ValueError) as exc:
        if not pretrained:
            raise
        raise IVPTError(f"cannot load pretrained weights for '{arch}': {exc}") from None
    check_backbone(backbone, arch)
    return backbone


def check_backbone(backbone: nn.Module, arch: str) -> None:
    """Raise :class:`IVPTError` unless ``backbone`` is a timm ViT whose stem and blocks models can call."""
    if not isinstance(backbone, VisionTransformer):
        raise IVPTError(
            f"model.arch '{arch}' is a {type(backbone).__name__}, not a timm Vision Transformer "
            f"(expected e.g. deit_small_patch16_224 or vit_base_patch14_reg4_dinov2.lvd142m)"
        )
    if getattr(backbone, "dynamic_img_size", False):
        raise IVPTError(f"model.arch '{arch}': dynamic_img_size is not supported (prototype biases need a fixed grid)")
    if not isinstance(backbone.patch_drop, nn.Identity):
        raise IVPTError(f"model.arch '{arch}': patch dropout is not supported (it breaks the patch grid)")


def set_trainable(backbone: nn.Module, freeze: FreezeMode) -> None:
    """Set ``requires_grad`` on the backbone's parameters for a freeze mode.

    ``"tokens"``: only the prefix tokens and the position embedding train (the paper);
    ``"frozen"``: nothing trains; ``"full"``: everything the models call trains.
    """
    if freeze not in FREEZE_MODES:
        raise ConfigError(f"config key 'model.freeze': expected one of {', '.join(FREEZE_MODES)}, got {freeze!r}")
    for name, parameter in backbone.named_parameters():
        root = name.split(".", 1)[0]
        if root in _UNUSED_MODULES:
            parameter.requires_grad_(False)
        elif freeze == "full":
            parameter.requires_grad_(True)
        elif freeze == "tokens":
            parameter.requires_grad_(name in TOKEN_PARAMETERS)
        else:
            parameter.requires_grad_(False)


class ViTModel(nn.Module):
    """Base of all models: owns the backbone and runs its stem, blocks and final norm step by step.

    Attributes:
        backbone: the unmodified timm ViT.
        num_classes: C.
        grid_size: ``(h, w)`` patch grid.
        embed_dim: D.
        num_prefix_tokens: class, distillation and register tokens in front of the patch tokens.
        method: name of the method the model implements (``"ivpt"``, ``"vpt_deep"``...).
        n_pro: prototypes per stage actually used, shallow to deep (empty without prototypes).
        model_config: the options it was created with (set by :func:`ivpt.model.create_model`).
        preprocessing: the inputs it expects (set by :func:`ivpt.model.create_model`).
        class_names, part_names: set when it was loaded from a checkpoint or an exported folder.
    """

    method: str = ""
    model_config: ModelConfig | None = None
    preprocessing: Preprocessing | None = None
    class_names: list[str] | None = None
    part_names: list[str] | None = None

    def __init__(
        self, backbone: VisionTransformer, num_classes: int, freeze: FreezeMode, grad_checkpointing: bool = False
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.grid_size: tuple[int, int] = tuple(int(v) for v in backbone.patch_embed.grid_size)  # type: ignore[assignment]
        self.img_size: tuple[int, int] = tuple(int(v) for v in backbone.patch_embed.img_size)  # type: ignore[assignment]
        self.embed_dim = int(backbone.embed_dim)
        self.num_prefix_tokens = int(backbone.num_prefix_tokens)
        self.freeze = freeze
        self.grad_checkpointing = grad_checkpointing
        self.n_pro: tuple[int, ...] = ()
        set_trainable(backbone, freeze)

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.backbone, "cls_token", None) is not None

    def embed(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` -> token sequence ``(B, P + h*w, D)`` (P prefix tokens first)."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.img_size:
            raise IVPTError(
                f"model input: expected images of shape (B, 3, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise IVPTError(
                f"model input: expected normalised float images, got {images.dtype} (a data set's uint8 images "
                "go through its transform.normalize first)"
            )
        backbone = self.backbone
        tokens = backbone.patch_embed(images)
        tokens = backbone._pos_embed(tokens)
        tokens = backbone.patch_drop(tokens)
        return backbone.norm_pre(tokens)

    def run_block(self, index: int, tokens: Tensor) -> Tensor:
        """Apply block ``index`` to ``(B, T, D)`` tokens, recomputing activations in backward if asked."""
        block = self.backbone.blocks[index]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """``(B, P + h*w [+ prompts], D)`` -> the ``(B, h*w, D)`` patch tokens."""
        start = self.num_prefix_tokens
        return tokens[:, start : start + self.grid_size[0] * self.grid_size[1]]

    def class_token(self, normed_tokens: Tensor) -> Tensor | None:
        """The final normalised CLS token ``(B, D)``, or ``None`` for backbones without one."""
        return normed_tokens[:, 0] if self.has_class_token else None
