"""Build IVPT or a baseline by name, from arguments or from a :class:`ivpt.config.Config`."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ivpt.config import IVPT_METHODS, ModelConfig, coerce
from ivpt.errors import ConfigError
from ivpt.model.backbone import ViTModel, create_backbone
from ivpt.model.baselines import PromptTunedViT
from ivpt.model.ivpt import IVPT, check_n_pro
from ivpt.model.preprocessing import Preprocessing

if TYPE_CHECKING:
    from ivpt.config import Config

# The keywords create_model takes besides its positional arguments: the other fields of ModelConfig.
OPTION_NAMES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("arch", "img_size", "n_pro", "pretrained")
)


def model_config(
    arch: str,
    img_size: int | tuple[int, int] | None = None,
    n_pro: Sequence[int] | None = None,
    pretrained: bool = False,
    **options: Any,
) -> ModelConfig:
    """The :class:`ivpt.config.ModelConfig` of :func:`create_model`'s arguments, each checked against its type.

    ``img_size`` is stored only when square (``(s, s)`` or ``s``); ``None`` leaves it to the backbone. An
    option given as ``None`` keeps its default (``backbone_args=None`` is ``{}``).

    Raises:
        ConfigError: an unknown option, or a value of the wrong type or outside the allowed choices.
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(
            f"create_model: unknown option(s) {', '.join(unknown)}; the options are the fields of "
            f"ivpt.config.ModelConfig: {', '.join(OPTION_NAMES)}"
        )
    hints = typing.get_type_hints(ModelConfig)
    values: dict[str, Any] = {"arch": arch, "pretrained": pretrained}
    values.update((name, value) for name, value in options.items() if value is not None)
    if n_pro is not None:
        values["n_pro"] = n_pro
    if isinstance(img_size, (tuple, list)):
        img_size = int(img_size[0]) if len(set(img_size)) == 1 else None
    values["img_size"] = img_size
    checked = {name: coerce(value, hints[name], f"model.{name}") for name, value in values.items()}
    return ModelConfig(**checked)


def create_model(
    arch: str,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    n_pro: Sequence[int] | None = None,
    pretrained: bool = False,
    **options: Any,
) -> ViTModel:
    """Create IVPT or a baseline on an unmodified timm Vision Transformer.

    Every model maps images ``(B, 3, H, W)`` to an :class:`ivpt.model.output.IVPTOutput`. The keyword
    options are the fields of :class:`ivpt.config.ModelConfig` (``model.*`` in a config file), with the
    same defaults and allowed values; the model keeps them as ``model.model_config``, and the inputs it
    expects as ``model.preprocessing`` (:class:`ivpt.model.preprocessing.Preprocessing`, from the
    backbone's timm ``pretrained_cfg``).

    Args:
        arch: timm ViT name (DeiT, plain ViT, DINOv2 with or without registers...), optionally with a
            pretrained tag (``vit_base_patch14_reg4_dinov2.lvd142m``).
        num_classes: C.
        img_size: input side (or ``(H, W)``); fixes the patch grid ``(h, w)``. ``None``: the backbone's
            pretrained input size.
        n_pro: prototypes per stage, shallow to deep, background included (default ``(17, 14, 11, 8, 5)``);
            S = ``len(n_pro)`` stages sit at the inputs of the last S-1 blocks and on the output of the last block.
        pretrained: load timm's pretrained weights (from ``pretrained_file`` when given).
        method: ``"ivpt"``; ``"last_layer_proto"`` (IVPT with ``cross_layer=False``: only the
            ``n_pro[-1]`` last-layer prototypes; the ablation's first row also sets ``spatial_bias=False``
            and ``pooling="soft"``); ``"vpt_shallow"``, ``"vpt_deep"`` (learned prompts, CLS head);
            ``"vpt_deep_proto"`` (VPT-Deep + ``n_pro[-1]`` last-layer prototypes and the IVPT part head);
            ``"linear_probe"`` (CLS head on a completely frozen backbone, whatever ``freeze`` says).
        pretrained_file: local weight file used instead of the model hub when ``pretrained`` is set.
        backbone_args: extra keyword arguments for ``timm.create_model``.
        spatial_bias: learn a ``(K, h, w)`` logit bias per stage.
        pooling: ``"ifa"`` (hard argmax regions weighted by the map) or ``"soft"`` (weights = map).
        cross_layer: use the intermediate stages (off: last-layer prototypes only, no prompts).
        fusion: group each intermediate stage's concepts into coarser ones (off: each stage's K_s-1
            region features are that block's prompts; no groupings, no fused maps).
        fusion_target: ``"final"`` (every stage groups into the N final parts; the authors') or
            ``"chain"`` (stage s groups into stage s+1's K_{s+1}-1 foreground concepts).
        gumbel_tau: Gumbel-softmax temperature of the grouping in training.
        freeze: ``"tokens"`` (only prefix tokens and position embedding of the backbone train; the
            paper), ``"frozen"`` (no backbone parameter trains) or ``"full"``.
        vpt_prompts: learned prompt tokens per prompted block for the VPT baselines.
        grad_checkpointing: recompute block activations in backward (training only).
        cache_features: ``"linear_probe"`` only: compute each distinct image's frozen CLS feature once and
            reuse it (:class:`ivpt.model.baselines.PromptTunedViT`).

    Raises:
        ConfigError: an unknown method / arch / option value, or too few blocks for the stages.
        IVPTError: the architecture is not a timm ViT.
    """
    config = model_config(arch, img_size, n_pro, pretrained, **options)
    backbone_size = img_size if isinstance(img_size, (tuple, list)) else config.img_size
    model = _create(config, num_classes, backbone_size)
    pretrained_cfg = model.backbone.pretrained_cfg or {}
    model.model_config = config
    height, width = model.img_size
    model.preprocessing = Preprocessing(
        height if height == width else (height, width),
        tuple(pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        tuple(pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)),
    )
    return model


def _create(config: ModelConfig, num_classes: int, img_size: int | tuple[int, int] | None) -> ViTModel:
    method, cache_features = config.method, config.cache_features
    if cache_features and method != "linear_probe":
        raise ConfigError(f"config key 'model.cache_features': only a linear_probe can cache features, not {method!r}")
    n_pro = check_n_pro(config.n_pro)
    backbone = create_backbone(
        config.arch, img_size, config.pretrained, config.pretrained_file, dict(config.backbone_args)
    )
    common: dict[str, Any] = dict(freeze=config.freeze, grad_checkpointing=config.grad_checkpointing)
    prototype_options: dict[str, Any] = dict(spatial_bias=config.spatial_bias, pooling=config.pooling)

    if method in IVPT_METHODS:
        model = IVPT(
            backbone,
            num_classes,
            n_pro,
            cross_layer=config.cross_layer and method == "ivpt",
            fusion=config.fusion,
            fusion_target=config.fusion_target,
            gumbel_tau=config.gumbel_tau,
            **prototype_options,
            **common,
        )
        model.method = method
        return model
    if method == "vpt_deep_proto":
        return PromptTunedViT(
            backbone,
            num_classes,
            method,
            num_prompts=config.vpt_prompts,
            deep=True,
            head="parts",
            num_prototypes=n_pro[-1],
            **prototype_options,
            **common,
        )
    if method == "linear_probe":
        common["freeze"] = "frozen"
    return PromptTunedViT(
        backbone,
        num_classes,
        method,
        num_prompts=0 if method == "linear_probe" else config.vpt_prompts,
        deep=method == "vpt_deep",
        head="cls",
        cache_features=cache_features,
        **common,
    )


def build_model(cfg: Config, num_classes: int) -> ViTModel:
    """Create the model described by ``cfg.model`` for ``num_classes`` classes.

    Its ``preprocessing`` takes ``data.mean`` / ``data.std`` from ``cfg`` where they are set.
    """
    fields = dataclasses.asdict(cfg.model)
    model = create_model(num_classes=num_classes, **fields)
    mean, std = cfg.data.mean, cfg.data.std
    model.preprocessing = dataclasses.replace(
        model.preprocessing,
        mean=tuple(mean) if mean is not None else model.preprocessing.mean,
        std=tuple(std) if std is not None else model.preprocessing.std,
    )
    return model
