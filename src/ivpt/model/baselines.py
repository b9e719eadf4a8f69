"""Baselines of the paper's comparison: VPT-Shallow, VPT-Deep, VPT-Deep with part prototypes, linear probe.

All of them are :class:`PromptTunedViT` configurations:

=================  ===========================  =========================================
method             learned prompt tokens         head
=================  ===========================  =========================================
``vpt_shallow``    P tokens at the input only    linear on the final normalised CLS token
``vpt_deep``       fresh P tokens at every block linear on the final normalised CLS token
``vpt_deep_proto`` fresh P tokens at every block last-layer prototypes + IVPT part head
``linear_probe``   none                          linear on the final normalised CLS token
=================  ===========================  =========================================

(``last_layer_proto`` is IVPT without cross-layer stages: :class:`ivpt.model.ivpt.IVPT`.)
Prompt tokens sit right after the prefix tokens, as in VPT; blocks have no attention mask, so their
position does not change the result.

The VPT methods have no prototypes, but their prompts attend to the image: in eval mode they report the
attention of each prompt token of the last block over the patches as concept maps
(:func:`prompt_attention_maps`), so that ``ivpt eval`` scores their consistency, stability and part
discovery like IVPT's (the paper's VPT-Deep row). Training never sees these maps: the shaping losses
would otherwise pull on the prompts, and VPT is trained with cross-entropy alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Literal

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ivpt.config import FreezeMode, Pooling
from ivpt.errors import ConfigError
from ivpt.model.backbone import ViTModel
from ivpt.model.concepts import ConceptStage, PartHead, classify_parts
from ivpt.model.intervention import Intervention
from ivpt.model.output import IVPTOutput


def prompt_attention_maps(
    block: Block, tokens: Tensor, prompts: slice, patches: slice, grid_size: tuple[int, int]
) -> Tensor:
    """Where each prompt token looks in ``block``: its attention over the patch tokens, as concept maps.

    The attention is recomputed from the block's own weights (``norm1``, ``attn.qkv``, the optional
    ``attn.q_norm``/``attn.k_norm`` and ``attn.scale``): for prompt ``p``, ``a_p = mean_heads
    softmax_patches(q_p . k_patch * scale)``, the softmax over the patches only, so the maps ignore what
    the prompt pays to the prefix tokens and to other prompts. Each ``a_p`` is scaled to a maximum of 1,
    then the patch's foreground mass ``m = max_p a_p`` is shared among the prompts in proportion to their
    ``a_p``, and the rest goes to the background: ``A_p = m * a_p / sum_q a_q``, ``A_bg = 1 - m``. A patch
    that no prompt singles out is background, and the argmax over prompts is the prompt that attends
    to the patch most, relative to its own peak.

    Args:
        block: a timm ViT block (pre-norm attention).
        tokens: ``(B, T, D)`` the block's input sequence.
        prompts: positions of the P prompt tokens in the sequence.
        patches: positions of the h*w patch tokens, in raster order.
        grid_size: ``(h, w)``.

    Returns:
        ``(B, P + 1, h, w)`` float32 maps that sum to 1 over channels, background last.
    """
    attention = block.attn
    batch, length, dim = tokens.shape
    heads = attention.num_heads
    qkv = attention.qkv(block.norm1(tokens)).reshape(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    query, key = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])  # (B, heads, T, D / heads)
    logits = query[:, :, prompts].float() @ key[:, :, patches].float().transpose(-2, -1) * attention.scale
    weights = logits.softmax(dim=-1).mean(dim=1)  # (B, P, h*w)
    relative = weights / weights.amax(dim=-1, keepdim=True)
    foreground = relative.amax(dim=1, keepdim=True)  # (B, 1, h*w)
    maps = torch.cat([foreground * relative / relative.sum(dim=1, keepdim=True), 1.0 - foreground], dim=1)
    return maps.reshape(batch, -1, *grid_size)


class PromptTunedViT(ViTModel):
    """A frozen ViT with learned (input-independent) prompt tokens and a CLS or part-prototype head.

    Args:
        backbone: the timm ViT.
        num_classes: C.
        method: name reported in ``model.method``.
        num_prompts: P learned tokens per prompted block (0: none).
        deep: fresh prompts before every block (VPT-Deep) instead of once at the input (VPT-Shallow).
        head: ``"cls"`` (linear on the CLS token) or ``"parts"`` (last-layer prototypes + part head).
        num_prototypes: K of the last-layer stage for ``head="parts"`` (background included).
        spatial_bias, pooling: as for IVPT, for ``head="parts"``.
        freeze, grad_checkpointing: as for IVPT.
        cache_features: keep the CLS feature of every distinct image seen (keyed by a hash of its pixels)
            and compute the backbone only for new ones. Needs a fully frozen backbone without prompts
            (the linear probe): the feature then depends on the pixels alone. The cache lives in memory,
            outside the state dict, and grows by one ``(D,)`` vector per distinct image; with flips as the
            only augmentation, a linear probe computes the backbone twice per training image in all.

    Attributes:
        prompt_tokens: ``(L or 1, P, D)`` or ``None``; VPT's uniform init with bound
            ``sqrt(6 / (3 * patch_area + D))``.
        classifier: ``Linear(D, C)`` for ``head="cls"``.
        stages, head: one :class:`ConceptStage` and the :class:`PartHead` for ``head="parts"``.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        method: str,
        *,
        num_prompts: int = 10,
        deep: bool = True,
        head: Literal["cls", "parts"] = "cls",
        num_prototypes: int = 5,
        spatial_bias: bool = True,
        pooling: Pooling = "ifa",
        freeze: FreezeMode = "tokens",
        grad_checkpointing: bool = False,
        cache_features: bool = False,
    ):
        super().__init__(backbone, num_classes, freeze, grad_checkpointing)
        self.method = method
        if num_prompts < 0:
            raise ConfigError(f"config key 'model.vpt_prompts': must be >= 0, got {num_prompts}")
        if cache_features and (num_prompts or head != "cls" or freeze != "frozen"):
            raise ConfigError(
                "config key 'model.cache_features': needs a fully frozen backbone without prompts and a CLS "
                f"head (a linear probe), got {num_prompts} prompts, head {head!r}, freeze {freeze!r}"
            )
        # Pixel hash -> (D,) CLS feature; None: every forward runs the backbone.
        self.feature_cache: dict[bytes, Tensor] | None = {} if cache_features else None
        self.num_prompts = num_prompts
        self.deep = deep
        dim = self.embed_dim
        if num_prompts:
            patch_h, patch_w = backbone.patch_embed.patch_size
            bound = math.sqrt(6.0 / (3 * patch_h * patch_w + dim))
            layers = self.num_blocks if deep else 1
            self.prompt_tokens = nn.Parameter(torch.empty(layers, num_prompts, dim).uniform_(-bound, bound))
        else:
            self.prompt_tokens = None
        self.hard_pooling = pooling == "ifa"
        if head == "parts":
            self.n_pro = (num_prototypes,)
            self.stages = nn.ModuleList([ConceptStage(num_prototypes, dim, self.grid_size, spatial_bias)])
            self.head = PartHead(dim, num_prototypes, num_classes)
            self.classifier = None
        else:
            if not self.has_class_token:
                raise ConfigError(f"method '{method}' classifies the CLS token, but this backbone has none")
            self.classifier = nn.Linear(dim, num_classes)

    def _with_prompts(self, tokens: Tensor, layer: int, replace: bool) -> Tensor:
        """Insert prompts of ``layer`` after the prefix tokens, dropping the previous ones if ``replace``."""
        start = self.num_prefix_tokens
        prompts = self.prompt_tokens[layer].to(tokens.dtype).expand(tokens.shape[0], -1, -1)  # type: ignore[index]
        rest = tokens[:, start + self.num_prompts :] if replace else tokens[:, start:]
        return torch.cat([tokens[:, :start], prompts, rest], dim=1)

    def _prompt_attention(self, tokens: Tensor) -> Tensor:
        """``(B, P + 1, h, w)`` attention maps of the last block's prompts (:func:`prompt_attention_maps`)."""
        start = self.num_prefix_tokens
        patches = slice(start + self.num_prompts, start + self.num_prompts + self.grid_size[0] * self.grid_size[1])
        with torch.no_grad():
            return prompt_attention_maps(
                self.backbone.blocks[-1], tokens, slice(start, start + self.num_prompts), patches, self.grid_size
            )

    def forward(self, images: Tensor, intervention: Intervention | None = None) -> IVPTOutput:
        """``images (B, 3, H, W)`` -> :class:`IVPTOutput` (prototype fields filled only with a part head).

        Args:
            intervention: with a part head, final parts to remove from the logits (as for
                :meth:`ivpt.model.ivpt.IVPT.forward`); a CLS head has nothing to switch off.
        """
        if intervention is not None:
            intervention.check(self.n_pro)
        return self._run(images, backbone_grad=True, intervention=intervention)

    def forward_without_backbone_grad(self, images: Tensor) -> IVPTOutput:
        """Like :meth:`forward`, but only the concept maps keep autograd (see
        :meth:`ivpt.model.ivpt.IVPT.forward_without_backbone_grad`): the equivariance view's pass."""
        return self._run(images, backbone_grad=False)

    def _cached_class_features(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, D)`` CLS features, the backbone run only on images not seen before."""
        cache = self.feature_cache
        assert cache is not None
        pixels = images.detach().cpu().contiguous()
        shape = str((pixels.dtype, tuple(pixels.shape[1:]))).encode()
        keys = [hashlib.blake2b(shape + image.numpy().tobytes(), digest_size=16).digest() for image in pixels]
        # Where each image the cache lacks first occurs (a batch may hold the same image twice).
        new: dict[bytes, int] = {}
        for index, key in enumerate(keys):
            if key not in cache:
                new.setdefault(key, index)
        if new:
            with torch.no_grad():
                features = self._run(images[list(new.values())], backbone_grad=False, use_cache=False).cls_feature
            cache.update(zip(new, features.detach(), strict=True))
        return torch.stack([cache[key] for key in keys]).to(images.device)

    def _run(
        self, images: Tensor, backbone_grad: bool, use_cache: bool = True, intervention: Intervention | None = None
    ) -> IVPTOutput:
        if use_cache and self.feature_cache is not None:
            cls_feature = self._cached_class_features(images)
            return IVPTOutput(logits=self.classifier(cls_feature), concept_maps=[], cls_feature=cls_feature)
        with contextlib.nullcontext() if backbone_grad else torch.no_grad():
            tokens = self.embed(images)
            attention_maps: list[Tensor] = []
            for index in range(self.num_blocks):
                if self.prompt_tokens is not None and (self.deep or index == 0):
                    tokens = self._with_prompts(tokens, index if self.deep else 0, replace=index > 0)
                if index == self.num_blocks - 1 and self.prompt_tokens is not None and not self.training:
                    attention_maps.append(self._prompt_attention(tokens))
                tokens = self.run_block(index, tokens)
            tokens = self.backbone.norm(tokens)
            if self.prompt_tokens is not None:
                start = self.num_prefix_tokens
                tokens = torch.cat([tokens[:, :start], tokens[:, start + self.num_prompts :]], dim=1)
            cls_feature = self.class_token(tokens)
            if self.classifier is not None:
                return IVPTOutput(
                    logits=self.classifier(cls_feature), concept_maps=attention_maps, cls_feature=cls_feature
                )

        kept_parts = None if intervention is None else intervention.kept_parts(self.n_pro[0] - 1, tokens.device)
        maps, regions, parts = classify_parts(
            self.stages[0],
            self.head,
            self.patch_tokens(tokens),
            self.hard_pooling,
            head_grad=backbone_grad,
            kept_parts=kept_parts,
        )
        return IVPTOutput(
            logits=parts.logits,
            part_logits=parts.part_logits,
            concept_maps=[maps],
            region_features=[regions.features],
            part_features=parts.part_features,
            cls_feature=cls_feature,
        )
