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
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ivpt.errors import ConfigError
from ivpt.model.backbone import ViTModel
from ivpt.model.concepts import ConceptStage, PartHead, classify_parts
from ivpt.model.output import IVPTOutput


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
        pooling: Literal["ifa", "soft"] = "ifa",
        freeze: str = "tokens",
        grad_checkpointing: bool = False,
    ):
        super().__init__(backbone, num_classes, freeze, grad_checkpointing)
        self.method = method
        if num_prompts < 0:
            raise ConfigError(f"config key 'model.vpt_prompts': must be >= 0, got {num_prompts}")
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

    def forward(self, images: Tensor) -> IVPTOutput:
        """``images (B, 3, H, W)`` -> :class:`IVPTOutput` (prototype fields filled only with a part head)."""
        tokens = self.embed(images)
        for index in range(self.num_blocks):
            if self.prompt_tokens is not None and (self.deep or index == 0):
                tokens = self._with_prompts(tokens, index if self.deep else 0, replace=index > 0)
            tokens = self.run_block(index, tokens)
        tokens = self.backbone.norm(tokens)
        if self.prompt_tokens is not None:
            start = self.num_prefix_tokens
            tokens = torch.cat([tokens[:, :start], tokens[:, start + self.num_prompts :]], dim=1)
        cls_feature = self.class_token(tokens)
        if self.classifier is not None:
            return IVPTOutput(logits=self.classifier(cls_feature), cls_feature=cls_feature)

        final = classify_parts(self.stages[0], self.head, self.patch_tokens(tokens), self.hard_pooling)
        return IVPTOutput(
            logits=final.parts.logits,
            part_logits=final.parts.part_logits,
            concept_maps=[final.maps],
            region_features=[final.regions.features],
            part_features=final.parts.part_features,
            cls_feature=cls_feature,
        )
