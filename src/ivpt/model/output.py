"""What every model of the project returns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import Tensor


@dataclass
class IVPTOutput:
    """Forward result of an IVPT model or a baseline.

    Shapes: B batch, C classes, S prototype stages, K_s prototypes at stage s (background last),
    N final foreground parts (K_S - 1), h x w patch grid, D embedding width.

    Attributes:
        logits: ``(B, C)`` class scores.
        part_logits: ``(B, N, C)`` score of each final foreground part (``logits`` is their mean), or
            ``None`` for methods without parts.
        concept_maps: per stage, ``(B, K_s, h, w)`` soft assignment of patches to prototypes; sums to 1
            over ``K_s``; background is the last channel. Empty for methods without prototypes.
        groupings: per stage 1..S-1, ``(B, K_s - 1, N_target)`` soft assignment of the stage's
            foreground concepts to the concepts they feed (final parts, or the next stage in chain mode).
        fused_maps: per stage 1..S-1, ``(B, N_target + 1, h, w)`` the stage's maps grouped into its
            targets (background last); sums to 1 over channels. Empty when fusion is off.
        fusion_targets: for each entry of ``fused_maps``, the 0-based index of the stage whose
            ``concept_maps`` it is grouped into (the last stage in ``final`` mode, the next stage in
            ``chain`` mode); the consistency loss compares the two.
        region_features: per stage, ``(B, K_s, D)`` pooled feature of each prototype's region.
        part_features: ``(B, D, N + 1)`` modulated final region features (background last), or ``None``.
        prompts: per stage 1..S-1, ``(B, N_prompt, D)`` prompt tokens inserted before that stage's block.
        cls_feature: ``(B, D)`` final normalised CLS token (used by CLS-head baselines), or ``None``.
    """

    logits: Tensor
    part_logits: Tensor | None = None
    concept_maps: list[Tensor] = field(default_factory=list)
    groupings: list[Tensor] = field(default_factory=list)
    fused_maps: list[Tensor] = field(default_factory=list)
    fusion_targets: list[int] = field(default_factory=list)
    region_features: list[Tensor] = field(default_factory=list)
    part_features: Tensor | None = None
    prompts: list[Tensor] = field(default_factory=list)
    cls_feature: Tensor | None = None

    def split(self, first: int) -> tuple[IVPTOutput, IVPTOutput]:
        """Split along the batch: the first ``first`` samples, and the rest.

        Used when the original and the transformed batch run through one forward (2B).
        """
        head: dict[str, object] = {}
        tail: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                head[f.name], tail[f.name] = value[:first], value[first:]
            elif isinstance(value, list) and value and isinstance(value[0], Tensor):
                head[f.name] = [v[:first] for v in value]
                tail[f.name] = [v[first:] for v in value]
            else:
                head[f.name] = tail[f.name] = value
        return IVPTOutput(**head), IVPTOutput(**tail)

    @property
    def num_stages(self) -> int:
        return len(self.concept_maps)

    def detach(self) -> IVPTOutput:
        def _d(value: object) -> object:
            if isinstance(value, Tensor):
                return value.detach()
            if isinstance(value, list):
                return [v.detach() if isinstance(v, Tensor) else v for v in value]
            return value

        return IVPTOutput(**{f.name: _d(getattr(self, f.name)) for f in fields(self)})


__all__ = ["IVPTOutput"]
