"""Concept intervention: run a model with some of its concepts switched off (docs/app.md, "Intervention").

An :class:`Intervention` names what one forward pass runs without. It acts where each concept acts in
the method (docs/method.md sections 4-6):

- a **final part** n (a foreground concept of stage S) contributes ``part_logits[:, n] / N`` to the
  class logits; switched off, that share is removed and the divisor stays N, so every class logit drops
  by exactly the part's share and the other parts keep theirs;
- a **concept k of an intermediate stage s** reaches the rest of the network only through the prompt
  tokens of its block (its region feature, weighted by its grouping row); switched off, it is left out
  of those prompts. With fine-to-coarse fusion each prompt becomes the grouping-weighted mean of the
  *enabled* concepts' region features; once every concept of the stage is off, no prompt is left and
  the block runs on the image tokens alone. Without fusion each concept is a prompt of its own and its
  token is removed (the prompts' joint LayerNorm then normalises the remaining ones).

The background concepts feed neither the prompts nor the logits, so they cannot be switched off.
Indices are 0-based within a stage, as in every figure (``s1:c5`` is concept 5 of stage 1).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ivpt.errors import IVPTError

PARTS_KEY = "parts"
_STAGE_KEY = re.compile(r"^stage([0-9]+)$")


@dataclass(frozen=True)
class Intervention:
    """Concepts a forward pass runs without.

    Attributes:
        parts: final foreground parts ``0..N-1`` whose logit share is removed.
        stage_concepts: 0-based intermediate stage ``s`` (``0..S-2``) -> its foreground concepts
            (``0..K_s-2``) left out of the stage's prompts.
    """

    parts: frozenset[int] = frozenset()
    stage_concepts: Mapping[int, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def from_disable(cls, disable: Mapping[str, Iterable[int]] | None, n_pro: Sequence[int]) -> Intervention:
        """Build and check an intervention from user keys: ``{"parts": [2], "stage1": [5]}``.

        Args:
            disable: ``"parts"`` -> final part indices; ``"stage<s>"`` (1-based, ``s < S``) -> concept
                indices of that stage. ``None`` or ``{}``: nothing is switched off.
            n_pro: the model's prototypes per stage, background included (``model.n_pro``).

        Raises:
            IVPTError: an unknown key, a stage that does not exist or is the final one, an index out of
                range, the background, or a model without concepts; the message names the key and value.
        """
        parts: set[int] = set()
        stage_concepts: dict[int, frozenset[int]] = {}
        for key, values in (disable or {}).items():
            indices = _indices(key, values)
            if key == PARTS_KEY:
                parts |= indices
                continue
            match = _STAGE_KEY.match(str(key))
            if match is None:
                raise IVPTError(
                    f"disable: unknown key {key!r}; expected 'parts' or 'stage<s>' with s = 1..{len(n_pro) - 1}"
                )
            stage = int(match.group(1)) - 1
            if len(n_pro) and stage == len(n_pro) - 1:
                raise IVPTError(f"disable: {key!r} is the final stage; its concepts are the parts: use 'parts'")
            stage_concepts[stage] = stage_concepts.get(stage, frozenset()) | indices
        intervention = cls(frozenset(parts), {s: c for s, c in stage_concepts.items() if c})
        intervention.check(n_pro)
        return intervention

    @property
    def is_empty(self) -> bool:
        return not self.parts and not any(self.stage_concepts.values())

    def check(self, n_pro: Sequence[int]) -> None:
        """Raise :class:`IVPTError` unless every index exists in a model with ``n_pro`` prototypes per stage."""
        if self.is_empty:
            return
        if not n_pro:
            raise IVPTError("disable: this model has no concepts or parts to switch off (a CLS-head method)")
        num_parts = n_pro[-1] - 1
        bad_parts = sorted(p for p in self.parts if not 0 <= p < num_parts)
        if bad_parts:
            raise IVPTError(
                f"disable: parts {bad_parts} do not exist; the model has final parts 0..{num_parts - 1} "
                f"(part {num_parts} is the background, which adds nothing to the logits)"
            )
        for stage, concepts in self.stage_concepts.items():
            if not 0 <= stage < len(n_pro) - 1:
                raise IVPTError(
                    f"disable: stage{stage + 1} is not an intermediate stage; this model has stage1.."
                    f"stage{len(n_pro) - 1} (and the final parts)"
                    if len(n_pro) > 1
                    else f"disable: stage{stage + 1}: this model has a single stage, whose concepts are the parts"
                )
            num_concepts = n_pro[stage] - 1
            bad = sorted(c for c in concepts if not 0 <= c < num_concepts)
            if bad:
                raise IVPTError(
                    f"disable: stage{stage + 1} concepts {bad} do not exist; it has concepts 0..{num_concepts - 1} "
                    f"(concept {num_concepts} is the background, which feeds no prompt)"
                )

    def kept_parts(self, num_parts: int, device: torch.device | str) -> Tensor | None:
        """``(N,)`` bool mask of the parts that still count, or ``None`` when none is switched off."""
        if not self.parts:
            return None
        mask = torch.ones(num_parts, dtype=torch.bool, device=device)
        mask[sorted(self.parts)] = False
        return mask

    def disabled_concepts(self, stage: int, num_concepts: int, device: torch.device | str) -> Tensor | None:
        """``(K_s - 1,)`` bool mask of stage ``stage``'s switched-off concepts, or ``None`` when there is none."""
        concepts = self.stage_concepts.get(stage)
        if not concepts:
            return None
        mask = torch.zeros(num_concepts, dtype=torch.bool, device=device)
        mask[sorted(concepts)] = True
        return mask

    def to_disable(self) -> dict[str, list[int]]:
        """The user-key form (``{"parts": [...], "stage1": [...]}``), sorted, empty entries left out."""
        named = {PARTS_KEY: sorted(self.parts)} if self.parts else {}
        for stage in sorted(self.stage_concepts):
            if self.stage_concepts[stage]:
                named[f"stage{stage + 1}"] = sorted(self.stage_concepts[stage])
        return named


def _indices(key: str, values: Iterable[int]) -> set[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise IVPTError(f"disable: {key!r} must map to a list of integer indices, got {values!r}")
    indices = set()
    for value in values:
        # numbers.Integral admits numpy and torch integers; bool is an int but never an index here.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise IVPTError(f"disable: {key!r} holds {value!r}; indices must be integers")
        indices.add(int(value))
    return indices


__all__ = ["PARTS_KEY", "Intervention"]
