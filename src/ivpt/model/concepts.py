"""The building blocks of IVPT (docs/method.md sections 2-4 and 6).

- :class:`ConceptStage`: category-agnostic prototypes (and spatial bias) of one depth -> concept maps;
- :func:`pool_regions`: intra-region feature aggregation (IFA) or plain soft pooling;
- :class:`PromptFusion`: fine-to-coarse grouping of one stage's concepts into prompt tokens;
- :class:`PartHead`: the classifier on the final stage's region features.

Shapes: B batch, K prototypes of a stage (background last), N targets / parts, h x w patch grid,
n = h*w patches, D embedding width.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROTOTYPE_INIT_STD = 0.05


class ConceptStage(nn.Module):
    """Prototypes of one depth and the concept maps they induce.

    Args:
        num_prototypes: K, including the background prototype (the last one).
        embed_dim: D.
        grid_size: ``(h, w)``.
        spatial_bias: learn a per-prototype, per-position logit bias ``(K, h, w)`` (initialised to zero).

    Attributes:
        prototypes: ``(K, D)``, initialised from N(0, 0.05^2).
        spatial_bias: ``(K, h, w)`` or ``None``.
    """

    def __init__(self, num_prototypes: int, embed_dim: int, grid_size: tuple[int, int], spatial_bias: bool = True):
        super().__init__()
        self.num_prototypes = num_prototypes
        self.grid_size = grid_size
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, embed_dim) * PROTOTYPE_INIT_STD)
        self.spatial_bias = nn.Parameter(torch.zeros(num_prototypes, *grid_size)) if spatial_bias else None

    def forward(self, patch_features: Tensor) -> Tensor:
        """Concept maps ``A = softmax_k(-||z - q_k||^2 + b_k)``.

        Args:
            patch_features: ``(B, n, D)`` normalised patch tokens z; callers pass them detached.

        Returns:
            ``(B, K, h, w)`` float32 maps that sum to 1 over K, background last.
        """
        batch = patch_features.shape[0]
        # Distances of normalised ViT features are in the hundreds: under bf16/fp16 autocast their
        # differences, which decide the softmax, would be rounded away.
        with torch.autocast(device_type=patch_features.device.type, enabled=False):
            z = patch_features.float()
            q = self.prototypes.float()
            squared_distance = z.pow(2).sum(-1, keepdim=True) - 2.0 * (z @ q.t()) + q.pow(2).sum(-1)
            logits = -squared_distance.transpose(1, 2).reshape(batch, self.num_prototypes, *self.grid_size)
            if self.spatial_bias is not None:
                logits = logits + self.spatial_bias.float()
            return logits.softmax(dim=1)


class PooledRegions(NamedTuple):
    """Output of :func:`pool_regions`: ``features (B, K, D)`` and region ``mass (B, K)`` (0: empty)."""

    features: Tensor
    mass: Tensor


def pool_regions(maps: Tensor, patch_features: Tensor, hard: bool = True) -> PooledRegions:
    """Pool one feature per prototype from the patches it covers.

    With ``hard=True`` (IFA) the weight of a patch for prototype k is ``A_k`` where k is the patch's
    argmax and 0 elsewhere; with ``hard=False`` it is ``A_k`` everywhere (plain soft pooling).
    ``p_k = sum_i w_k(i) z_i / sum_i w_k(i)``; a prototype that wins no patch gets ``p_k = 0``.

    Args:
        maps: ``(B, K, h, w)`` concept maps.
        patch_features: ``(B, n, D)`` with ``n = h*w``.

    Returns:
        :class:`PooledRegions` with ``features (B, K, D)`` and ``mass (B, K)``.
    """
    weights = maps.flatten(2)
    if hard:
        # The argmax over K on a (B, n, K) copy: along a strided dimension it is several times slower.
        best = weights.detach().transpose(1, 2).contiguous().argmax(dim=2)  # (B, n)
        winner = torch.zeros_like(weights).scatter_(1, best.unsqueeze(1), 1.0)
        weights = weights * winner
    mass = weights.sum(dim=2)
    # One (B,K,n)x(B,n,D) contraction; never a (B, D, K, h, w) product.
    summed = torch.einsum("bkn,bnd->bkd", weights.to(patch_features.dtype), patch_features)
    # Empty regions divide their zero sum by 1, not by a tiny clamp: 1/1e-12 in the backward pass
    # overflows half precision and turns into NaN gradients. Divide in float32 for the same reason.
    safe_mass = torch.where(mass > 0, mass.float(), torch.ones_like(mass, dtype=torch.float32))
    features = (summed.float() / safe_mass.unsqueeze(-1)).to(summed.dtype)
    return PooledRegions(features, mass)


class FusionResult(NamedTuple):
    """Output of :class:`PromptFusion`: ``prompts (B, N, D)``, ``grouping (B, K-1, N)`` and
    ``fused_maps (B, N+1, h, w)``; the last two are ``None`` without grouping."""

    prompts: Tensor
    grouping: Tensor | None
    fused_maps: Tensor | None


class PromptFusion(nn.Module):
    """Turn one stage's foreground region features into the prompt tokens of its block.

    With grouping (fine-to-coarse fusion) the K-1 foreground concepts are softly assigned to
    ``num_targets`` coarser concepts, ``Gamma = GumbelSoftmax(Linear(p_k))`` in training and
    ``softmax`` in eval; prompt n is the Gamma-weighted mean of the region features (Gamma stop-gradient),
    then ``Linear(LayerNorm_[N, D](U))``. Without grouping the K-1 region features themselves are the
    prompts (through the same LayerNorm + Linear).

    Args:
        num_concepts: K-1 foreground concepts of the stage.
        num_targets: N concepts they are grouped into (ignored without grouping).
        embed_dim: D.
        grouping: fuse (True) or use each concept as a prompt (False).
        gumbel_tau: Gumbel-softmax temperature in training.

    Attributes:
        grouping: ``Linear(D, N)`` or ``None``.
        prompt_norm: ``LayerNorm((N, D))`` over all prompts of an image jointly.
        prompt_proj: ``Linear(D, D)``.
    """

    def __init__(
        self, num_concepts: int, num_targets: int, embed_dim: int, grouping: bool = True, gumbel_tau: float = 1.0
    ):
        super().__init__()
        self.num_concepts = num_concepts
        self.num_targets = num_targets if grouping else num_concepts
        self.gumbel_tau = gumbel_tau
        self.grouping = nn.Linear(embed_dim, num_targets) if grouping else None
        self.prompt_norm = nn.LayerNorm((self.num_targets, embed_dim))
        self.prompt_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, maps: Tensor, regions: PooledRegions, disabled: Tensor | None = None) -> FusionResult:
        """Build prompts (and fused maps) of one stage.

        Args:
            maps: ``(B, K, h, w)`` concept maps (with gradient, for the consistency loss).
            regions: the stage's pooled regions, ``features (B, K, D)`` (detached) and ``mass (B, K)``.
            disabled: ``(K-1,)`` bool, foreground concepts left out of the prompts (see
                :mod:`ivpt.model.intervention`); ``None``: all take part. With grouping, each prompt is
                then the weighted mean of the enabled concepts only, and there are no prompts once all
                are disabled; without grouping, a disabled concept's own prompt is removed. The grouping
                and the fused maps are those of the whole stage either way.

        Returns:
            :class:`FusionResult`; ``prompts`` is ``(B, N', D)`` with ``N' = N`` unless concepts are disabled.
        """
        concept_features = regions.features[:, :-1]
        if self.grouping is None:
            kept = None if disabled is None else ~disabled
            return FusionResult(self.project(concept_features, kept), None, None)

        grouping = self.group(concept_features, regions.mass[:, :-1])
        weights = grouping.detach()
        kept = None
        if disabled is not None:
            weights = weights * (~disabled).to(weights.dtype)[None, :, None]
            # Softmax rows are positive, so every target keeps some weight while one concept is enabled.
            kept = torch.full((self.num_targets,), bool((~disabled).any()), device=weights.device)
        # Every softmax entry is positive; the clamp only guards underflow at very low temperatures.
        targets = torch.einsum("bkn,bkd->bnd", weights.to(concept_features.dtype), concept_features)
        denominator = weights.float().sum(dim=1).clamp_min(1e-12).unsqueeze(-1)
        targets = (targets.float() / denominator).to(targets.dtype)
        prompts = self.project(targets, kept)

        # Kept in float32 like the maps: the consistency loss takes their logarithm.
        with torch.autocast(device_type=maps.device.type, enabled=False):
            fused = torch.einsum("bkhw,bkn->bnhw", maps[:, :-1].float(), grouping.float())
            fused_maps = torch.cat([fused, maps[:, -1:].float()], dim=1)
        return FusionResult(prompts, grouping, fused_maps)

    def project(self, targets: Tensor, kept: Tensor | None = None) -> Tensor:
        """``(B, N, D)`` pooled targets -> prompt tokens ``Linear(LayerNorm_[N, D](U))``.

        Args:
            kept: ``(N,)`` bool; only these rows become prompts, normalised jointly among themselves with
                their rows of the LayerNorm's affine parameters. ``None``: all rows (the method).

        Returns:
            ``(B, N', D)`` prompts, ``N'`` the number of kept rows (0 gives an empty tensor).
        """
        if kept is None:
            return self.prompt_proj(self.prompt_norm(targets))
        rows = targets[:, kept]
        if rows.shape[1] == 0:
            return rows
        norm = self.prompt_norm
        normed = F.layer_norm(rows, tuple(rows.shape[1:]), norm.weight[kept], norm.bias[kept], norm.eps)
        return self.prompt_proj(normed)

    def group(self, concept_features: Tensor, concept_mass: Tensor) -> Tensor:
        """Soft assignment ``(B, K-1, N)`` of concepts to targets; concepts with empty regions get 1/N."""
        logits = self.grouping(concept_features).float()  # type: ignore[misc]
        if self.training:
            assignment = F.gumbel_softmax(logits, tau=self.gumbel_tau, hard=False, dim=-1)
        else:
            assignment = logits.softmax(dim=-1)
        uniform = torch.full_like(assignment, 1.0 / self.num_targets)
        return torch.where((concept_mass == 0).unsqueeze(-1), uniform, assignment)


class PartOutput(NamedTuple):
    """Output of :class:`PartHead`: ``part_features (B, D, N+1)``, ``part_logits (B, N, C)``,
    ``logits (B, C)``."""

    part_features: Tensor
    part_logits: Tensor
    logits: Tensor


class PartHead(nn.Module):
    """Classifier on the final stage's region features (the CLS token is not used).

    The region features form a ``D x (N+1)`` matrix (background last) that one LayerNorm normalises as a
    whole (affine ``(D, N+1)``, the "modulation"); a shared bias-free ``Linear(D, C)`` scores each
    foreground part and the class logits are the mean over the N parts.

    Attributes:
        modulation: ``LayerNorm((D, N+1))``.
        classifier: ``Linear(D, C, bias=False)``.
    """

    def __init__(self, embed_dim: int, num_regions: int, num_classes: int):
        super().__init__()
        self.modulation = nn.LayerNorm((embed_dim, num_regions))
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)

    def forward(self, region_features: Tensor, kept_parts: Tensor | None = None) -> PartOutput:
        """``region_features (B, N+1, D)`` -> :class:`PartOutput`.

        Args:
            kept_parts: ``(N,)`` bool, the parts that count (see :mod:`ivpt.model.intervention`): the logits
                are the sum of their part logits divided by N, so a removed part takes away exactly its
                share. ``part_logits`` still holds every part. ``None``: all parts (the method's mean).
        """
        part_features = self.modulation(region_features.transpose(1, 2))
        part_logits = self.classifier(part_features[:, :, :-1].transpose(1, 2))
        if kept_parts is None:
            logits = part_logits.mean(dim=1)
        else:
            logits = part_logits[:, kept_parts].sum(dim=1) / part_logits.shape[1]
        return PartOutput(part_features, part_logits, logits)


class FinalStageOutput(NamedTuple):
    maps: Tensor
    regions: PooledRegions
    parts: PartOutput


def classify_parts(
    stage: ConceptStage,
    head: PartHead,
    patch_features: Tensor,
    hard: bool,
    head_grad: bool = True,
    kept_parts: Tensor | None = None,
) -> FinalStageOutput:
    """The last stage: maps from detached features, pooling and head WITH gradient to maps and features.

    Args:
        patch_features: ``(B, n, D)`` normalised output patch tokens of the last block.
        head_grad: ``False`` runs the pooling and the head without autograd; the maps keep theirs (to the
            prototypes and the spatial bias), which is all the equivariance view needs.
        kept_parts: ``(N,)`` bool parts that count in the logits (:meth:`PartHead.forward`), or ``None``.
    """
    maps = stage(patch_features.detach())
    with contextlib.nullcontext() if head_grad else torch.no_grad():
        regions = pool_regions(maps if head_grad else maps.detach(), patch_features, hard=hard)
        return FinalStageOutput(maps, regions, head(regions.features, kept_parts))
