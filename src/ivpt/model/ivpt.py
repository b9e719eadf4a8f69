"""Interpretable Visual Prompt Tuning on a frozen timm ViT (docs/method.md sections 1-6)."""

from __future__ import annotations

import contextlib

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ivpt.config import FUSION_TARGETS, POOLINGS, FreezeMode, FusionTarget, Pooling
from ivpt.errors import ConfigError
from ivpt.model.backbone import ViTModel
from ivpt.model.concepts import ConceptStage, PartHead, PromptFusion, classify_parts, pool_regions
from ivpt.model.intervention import Intervention
from ivpt.model.output import IVPTOutput


def check_n_pro(n_pro: tuple[int, ...]) -> tuple[int, ...]:
    """Return ``n_pro`` as a tuple of ints; every stage needs a foreground and a background prototype."""
    values = tuple(int(k) for k in n_pro)
    if not values or any(k < 2 for k in values):
        raise ConfigError(
            f"config key 'model.n_pro': every stage needs at least 2 prototypes (>= 1 foreground + "
            f"background), got {list(n_pro)}"
        )
    return values


class IVPT(ViTModel):
    """IVPT: concept prototypes at the last S depths whose region features become the prompts.

    Stages 1..S-1 sit at the inputs of the last S-1 blocks; each turns its concept maps into prompt
    tokens that are appended to the sequence for that block only. Stage S sits on the output of the last
    block and feeds the part classifier. See :func:`ivpt.model.create_model` for the switches.

    Attributes:
        stages: one :class:`ConceptStage` per stage, shallow to deep (only the last with ``cross_layer=False``).
        fusions: one :class:`PromptFusion` per stage 1..S-1.
        head: the :class:`PartHead` on stage S.
    """

    method = "ivpt"

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        n_pro: tuple[int, ...] = (17, 14, 11, 8, 5),
        *,
        spatial_bias: bool = True,
        pooling: Pooling = "ifa",
        cross_layer: bool = True,
        fusion: bool = True,
        fusion_target: FusionTarget = "final",
        gumbel_tau: float = 1.0,
        freeze: FreezeMode = "tokens",
        grad_checkpointing: bool = False,
    ):
        super().__init__(backbone, num_classes, freeze, grad_checkpointing)
        n_pro = check_n_pro(n_pro)
        if pooling not in POOLINGS:
            raise ConfigError(f"config key 'model.pooling': expected one of {', '.join(POOLINGS)}, got {pooling!r}")
        if fusion_target not in FUSION_TARGETS:
            raise ConfigError(
                f"config key 'model.fusion_target': expected one of {', '.join(FUSION_TARGETS)}, got {fusion_target!r}"
            )
        if not gumbel_tau > 0:
            raise ConfigError(f"config key 'model.gumbel_tau': must be positive, got {gumbel_tau}")
        if not cross_layer:
            n_pro = n_pro[-1:]
        if self.num_blocks < len(n_pro):
            raise ConfigError(
                f"config key 'model.n_pro': {len(n_pro)} stages need at least {len(n_pro)} transformer blocks, "
                f"the backbone has {self.num_blocks}"
            )
        self.n_pro = n_pro
        self.hard_pooling = pooling == "ifa"
        self.fusion = fusion
        self.fusion_target = fusion_target
        num_intermediate = len(n_pro) - 1
        # Block index that receives the prompts of the first intermediate stage.
        self.first_prompted_block = self.num_blocks - num_intermediate

        dim, grid = self.embed_dim, self.grid_size
        self.stages = nn.ModuleList(ConceptStage(k, dim, grid, spatial_bias) for k in n_pro)
        self.fusions = nn.ModuleList(
            PromptFusion(n_pro[s] - 1, self.target_count(s), dim, grouping=fusion, gumbel_tau=gumbel_tau)
            for s in range(num_intermediate)
        )
        self.head = PartHead(dim, n_pro[-1], num_classes)

    def target_count(self, stage: int) -> int:
        """Number of concepts stage ``stage`` (0-based, intermediate) is grouped into."""
        return self.n_pro[self.target_stage(stage)] - 1

    def target_stage(self, stage: int) -> int:
        """0-based index of the stage whose maps the fused maps of ``stage`` are compared with."""
        return stage + 1 if self.fusion_target == "chain" else len(self.n_pro) - 1

    def forward(self, images: Tensor, intervention: Intervention | None = None) -> IVPTOutput:
        """``images (B, 3, H, W)`` -> :class:`IVPTOutput` with every prototype field filled.

        Args:
            intervention: concepts to switch off (:class:`ivpt.model.intervention.Intervention`): final
                parts leave the logits, intermediate concepts leave their stage's prompts. ``None`` or an
                empty one runs the method unchanged (bit for bit). ``prompts`` then holds ``(B, N', D)``
                with the prompts actually inserted, ``logits`` the intervened scores and ``part_logits``
                every part's scores.

        Raises:
            IVPTError: the intervention names a part or concept this model does not have.
        """
        if intervention is not None:
            intervention.check(self.n_pro)
        return self._run(images, backbone_grad=True, intervention=intervention)

    def forward_without_backbone_grad(self, images: Tensor) -> IVPTOutput:
        """The forward pass of the equivariance view: only the concept maps keep their autograd graph.

        Gives the same values as :meth:`forward` (same Gumbel draws aside), but the blocks, the pooling,
        the fusion and the head run without autograd, so no activation is stored for a backward pass.
        That loses nothing the equivariance loss needs: concept maps are computed from detached features
        (docs/method.md section 2), so in :meth:`forward` too their only gradient path leads to the stage
        prototypes and spatial biases, and this pass keeps exactly that path.

        Returns:
            :class:`IVPTOutput` whose ``concept_maps`` carry gradient to ``stages.*.prototypes`` and
            ``stages.*.spatial_bias``; every other field is detached.
        """
        return self._run(images, backbone_grad=False)

    def _run(self, images: Tensor, backbone_grad: bool, intervention: Intervention | None = None) -> IVPTOutput:
        maps_per_stage: list[Tensor] = []
        regions_per_stage: list[Tensor] = []
        prompts: list[Tensor] = []
        groupings: list[Tensor] = []
        fused_maps: list[Tensor] = []
        # Everything but the concept maps runs under this context.
        tracked = contextlib.nullcontext if backbone_grad else torch.no_grad
        with tracked():
            tokens = self.embed(images)
            for index in range(self.first_prompted_block):
                tokens = self.run_block(index, tokens)
        for stage, index in enumerate(range(self.first_prompted_block, self.num_blocks)):
            with tracked():
                # Stage maps see the features, never shape them: their gradient must not reach the tokens.
                patch_features = self.backbone.norm(self.patch_tokens(tokens)).detach()
            maps = self.stages[stage](patch_features)
            with tracked():
                regions = pool_regions(maps.detach(), patch_features, hard=self.hard_pooling)
                disabled = None
                if intervention is not None:
                    disabled = intervention.disabled_concepts(stage, self.n_pro[stage] - 1, maps.device)
                fused = self.fusions[stage](maps, regions, disabled)
                num_prompts = fused.prompts.shape[1]
                if num_prompts:
                    tokens = self.run_block(index, torch.cat([tokens, fused.prompts.to(tokens.dtype)], dim=1))
                    tokens = tokens[:, :-num_prompts]
                else:  # every concept of the stage switched off: the block sees the image tokens alone
                    tokens = self.run_block(index, tokens)
            maps_per_stage.append(maps)
            regions_per_stage.append(regions.features)
            prompts.append(fused.prompts)
            if fused.grouping is not None:
                groupings.append(fused.grouping)
                fused_maps.append(fused.fused_maps)

        with tracked():
            tokens = self.backbone.norm(tokens)
        kept_parts = None
        if intervention is not None:
            kept_parts = intervention.kept_parts(self.n_pro[-1] - 1, tokens.device)
        final_maps, final_regions, parts = classify_parts(
            self.stages[-1],
            self.head,
            self.patch_tokens(tokens),
            self.hard_pooling,
            head_grad=backbone_grad,
            kept_parts=kept_parts,
        )
        return IVPTOutput(
            logits=parts.logits,
            part_logits=parts.part_logits,
            concept_maps=[*maps_per_stage, final_maps],
            groupings=groupings,
            fused_maps=fused_maps,
            fusion_targets=[self.target_stage(s) for s in range(len(fused_maps))],
            region_features=[*regions_per_stage, final_regions.features],
            part_features=parts.part_features,
            prompts=prompts,
            cls_feature=self.class_token(tokens),
        )
