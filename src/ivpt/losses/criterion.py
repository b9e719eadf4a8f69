"""The IVPT training objective: the eight terms of docs/method.md section 8 from one model output."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ivpt.config import LossConfig
from ivpt.errors import ConfigError
from ivpt.losses import terms
from ivpt.losses.terms import StageMaps
from ivpt.model.output import IVPTOutput

__all__ = ["TERM_NAMES", "IVPTCriterion"]

TERM_NAMES = (
    "classification",
    "consistency",
    "presence",
    "bg_presence",
    "equivariance",
    "orthogonality",
    "total_variation",
    "entropy",
)


class IVPTCriterion:
    """Computes every loss term of an :class:`~ivpt.model.output.IVPTOutput` and their weighted total.

    Each weight comes from the ``cfg.loss`` key of the same name; a weight of 0 switches its term off:
    it is not computed at all and reported as 0. Terms the output cannot support are 0 too: without
    concept maps (baselines) only the classification term is computed; consistency needs fused maps,
    equivariance the output of the transformed batch and its ``affine``, orthogonality
    ``part_features``.

    The shaping terms (presence, bg_presence, equivariance, total_variation, entropy) are averaged
    over the ``S`` stages, consistency over the fused stages, orthogonality is computed once.

    Everything runs in fp32 with autocast off, even when called inside a bf16/fp16 autocast region, and
    nothing is read back to the host, so a training step never waits on the device here.

    Args:
        loss_cfg: the ``loss`` section of the config. ``loss_cfg.equivariance_mask_outside`` (optional,
            default ``True``) selects the masking of :func:`ivpt.losses.terms.equivariance_loss`.

    Raises:
        ConfigError: a weight is negative or not finite, or ``label_smoothing`` is outside ``[0, 1)``.
    """

    def __init__(self, loss_cfg: LossConfig) -> None:
        self.weights: dict[str, float] = {}
        for name in TERM_NAMES:
            weight = float(getattr(loss_cfg, name))
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"config key 'loss.{name}': expected a finite weight >= 0, got {weight}")
            self.weights[name] = weight
        self.label_smoothing = float(loss_cfg.label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"config key 'loss.label_smoothing': expected a value in [0, 1), got {self.label_smoothing}"
            )
        self.equivariance_mask_outside = bool(getattr(loss_cfg, "equivariance_mask_outside", True))

    def __repr__(self) -> str:
        active = ", ".join(f"{name}={weight:g}" for name, weight in self.weights.items() if weight > 0)
        return f"{type(self).__name__}({active})"

    def __call__(
        self,
        output: IVPTOutput,
        labels: Tensor,
        transformed: IVPTOutput | None = None,
        affine: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss terms.

        Args:
            output: the model's output on the batch ``x`` (``B`` samples).
            labels: ``(B,)`` class indices.
            transformed: the model's output on ``warp_images(x, affine)``, for the equivariance term.
            affine: ``(2, 3)`` the transform of ``transformed`` (:func:`ivpt.losses.sample_affine`).

        Returns:
            fp32 scalars keyed ``classification, consistency, presence, bg_presence, equivariance,
            orthogonality, total_variation, entropy`` holding the *unweighted* value of each term (for
            logging), and ``total``, the weighted sum to back-propagate.
        """
        if transformed is not None and affine is None:
            raise ValueError("IVPTCriterion: 'transformed' was given without the 'affine' it was made with")
        device = output.logits.device
        with terms.autocast_off(device.type):
            values = self._compute(output, labels, transformed, affine)
        zero = torch.zeros((), dtype=torch.float32, device=device)
        result = {name: values.get(name, zero) for name in TERM_NAMES}
        total = zero
        for name, value in values.items():
            total = total + self.weights[name] * value
        result["total"] = total
        return result

    def _is_on(self, name: str) -> bool:
        return self.weights[name] > 0

    def _compute(
        self, output: IVPTOutput, labels: Tensor, transformed: IVPTOutput | None, affine: Tensor | None
    ) -> dict[str, Tensor]:
        """The active, applicable terms only (unweighted)."""
        values: dict[str, Tensor] = {}
        if self._is_on("classification"):
            values["classification"] = terms.classification_loss(output.logits, labels, self.label_smoothing)
        if self._is_on("orthogonality") and output.part_features is not None:
            values["orthogonality"] = terms.orthogonality_loss(output.part_features)
        if not output.concept_maps:
            return values

        if self._is_on("consistency") and output.fused_maps:
            if len(output.fusion_targets) != len(output.fused_maps):
                raise ValueError(
                    f"IVPTCriterion: {len(output.fused_maps)} fused maps but {len(output.fusion_targets)} "
                    "fusion targets; the model must name the target stage of every fused map"
                )
            targets = [output.concept_maps[index] for index in output.fusion_targets]
            values["consistency"] = terms.consistency_loss(output.fused_maps, targets)

        # Smooth and stack the stages once; every shaping term reads the same prepared maps.
        shaping = ("presence", "bg_presence", "equivariance", "total_variation", "entropy")
        if not any(self._is_on(name) for name in shaping):
            return values
        maps = StageMaps(output.concept_maps)
        if self._is_on("presence"):
            values["presence"] = terms.presence_loss(maps)
        if self._is_on("bg_presence"):
            values["bg_presence"] = terms.background_presence_loss(maps)
        if self._is_on("total_variation"):
            values["total_variation"] = terms.total_variation_loss(maps)
        if self._is_on("entropy"):
            values["entropy"] = terms.entropy_loss(maps)
        if self._is_on("equivariance") and transformed is not None and transformed.concept_maps:
            values["equivariance"] = terms.equivariance_loss(
                maps,
                StageMaps(transformed.concept_maps),
                affine,
                mask_outside=self.equivariance_mask_outside,
            )
        return values
