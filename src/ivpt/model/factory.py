"""Build IVPT or a baseline by name, from arguments or from a :class:`ivpt.config.Config`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from ivpt.errors import ConfigError
from ivpt.model.backbone import create_backbone
from ivpt.model.baselines import PromptTunedViT
from ivpt.model.ivpt import IVPT, check_n_pro

if TYPE_CHECKING:
    from ivpt.config import Config

METHODS: tuple[str, ...] = ("ivpt", "vpt_shallow", "vpt_deep", "vpt_deep_proto", "last_layer_proto", "linear_probe")


def create_model(
    arch: str,
    num_classes: int,
    img_size: int | tuple[int, int],
    n_pro: tuple[int, ...] = (17, 14, 11, 8, 5),
    pretrained: bool = False,
    *,
    method: str = "ivpt",
    pretrained_file: str = "",
    backbone_args: dict[str, Any] | None = None,
    spatial_bias: bool = True,
    pooling: Literal["ifa", "soft"] = "ifa",
    cross_layer: bool = True,
    fusion: bool = True,
    fusion_target: Literal["final", "chain"] = "final",
    gumbel_tau: float = 1.0,
    freeze: Literal["tokens", "frozen", "full"] = "tokens",
    vpt_prompts: int = 10,
    grad_checkpointing: bool = False,
    cache_features: bool = False,
) -> nn.Module:
    """Create IVPT or a baseline on an unmodified timm Vision Transformer.

    Every model maps images ``(B, 3, H, W)`` to an :class:`ivpt.model.output.IVPTOutput`.

    Args:
        arch: timm ViT name (DeiT, plain ViT, DINOv2 with or without registers...).
        num_classes: C.
        img_size: input side (or ``(H, W)``); fixes the patch grid ``(h, w)``.
        n_pro: prototypes per stage, shallow to deep, background included; S = ``len(n_pro)`` stages sit at
            the inputs of the last S-1 blocks and on the output of the last block.
        pretrained: load timm's pretrained weights (from ``pretrained_file`` when given).
        method: ``"ivpt"``; ``"last_layer_proto"`` (IVPT with ``cross_layer=False``: only the
            ``n_pro[-1]`` last-layer prototypes; the ablation's first row also sets ``spatial_bias=False``
            and ``pooling="soft"``); ``"vpt_shallow"``, ``"vpt_deep"`` (learned prompts, CLS head);
            ``"vpt_deep_proto"`` (VPT-Deep + ``n_pro[-1]`` last-layer prototypes and the IVPT part head);
            ``"linear_probe"`` (CLS head on a completely frozen backbone, whatever ``freeze`` says).
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
    if method not in METHODS:
        raise ConfigError(f"config key 'model.method': expected one of {', '.join(METHODS)}, got {method!r}")
    if cache_features and method != "linear_probe":
        raise ConfigError(f"config key 'model.cache_features': only a linear_probe can cache features, not {method!r}")
    n_pro = check_n_pro(n_pro)
    backbone = create_backbone(arch, img_size, pretrained, pretrained_file, backbone_args)
    common: dict[str, Any] = dict(freeze=freeze, grad_checkpointing=grad_checkpointing)
    prototype_options: dict[str, Any] = dict(spatial_bias=spatial_bias, pooling=pooling)

    if method in ("ivpt", "last_layer_proto"):
        model = IVPT(
            backbone,
            num_classes,
            n_pro,
            cross_layer=cross_layer and method == "ivpt",
            fusion=fusion,
            fusion_target=fusion_target,
            gumbel_tau=gumbel_tau,
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
            num_prompts=vpt_prompts,
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
        num_prompts=0 if method == "linear_probe" else vpt_prompts,
        deep=method == "vpt_deep",
        head="cls",
        cache_features=cache_features,
        **common,
    )


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """Create the model described by ``cfg.model`` for ``num_classes`` classes."""
    m = cfg.model
    return create_model(
        m.arch,
        num_classes,
        m.img_size,
        tuple(m.n_pro),
        m.pretrained,
        method=m.method,
        pretrained_file=m.pretrained_file,
        backbone_args=dict(m.backbone_args),
        spatial_bias=m.spatial_bias,
        pooling=m.pooling,
        cross_layer=m.cross_layer,
        fusion=m.fusion,
        fusion_target=m.fusion_target,
        gumbel_tau=m.gumbel_tau,
        freeze=m.freeze,
        vpt_prompts=m.vpt_prompts,
        grad_checkpointing=m.grad_checkpointing,
        cache_features=m.cache_features,
    )
