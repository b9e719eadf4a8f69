"""The IVPT loss terms (docs/method.md section 8) and the random affine transform of the equivariance term.

>>> theta = sample_affine(generator, device)                       # one transform per batch
>>> out, out_t = model(torch.cat([x, warp_images(x, theta)])).split(len(x))
>>> terms = IVPTCriterion(cfg.loss)(out, labels, transformed=out_t, affine=theta)
>>> terms["total"].backward()
"""

from __future__ import annotations

from ivpt.losses.affine import affine_matrix, invert_affine, sample_affine, unwarp_maps, unwarp_validity, warp_images
from ivpt.losses.criterion import TERM_NAMES, IVPTCriterion
from ivpt.losses.terms import (
    StageMaps,
    background_presence_loss,
    classification_loss,
    consistency_loss,
    entropy_loss,
    equivariance_loss,
    orthogonality_loss,
    presence_loss,
    smooth_maps,
    total_variation_loss,
)

__all__ = [
    "TERM_NAMES",
    "IVPTCriterion",
    "StageMaps",
    "affine_matrix",
    "background_presence_loss",
    "classification_loss",
    "consistency_loss",
    "entropy_loss",
    "equivariance_loss",
    "invert_affine",
    "orthogonality_loss",
    "presence_loss",
    "sample_affine",
    "smooth_maps",
    "total_variation_loss",
    "unwarp_maps",
    "unwarp_validity",
    "warp_images",
]
