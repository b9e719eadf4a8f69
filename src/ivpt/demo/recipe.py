"""The recipe of ``ivpt pretrain-backbone``, apart from the training code so that the CLI can show its defaults
without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PRETRAIN_CLASSES = 100
# What the appearance targets describe per token (see ivpt.demo.pretrain.appearance_targets).
APPEARANCE_STYLES = ("cell", "rich")
# Pixels per token side the demo ViT's stem can give: the first 1, 2 or 3 of its resolutions halve the image
# (:data:`ivpt.model.demo_vit.TOKEN_STRIDES`, written out here so that the command line needs no torch).
TOKEN_STRIDES = (2, 4, 8)
# Synthetic families the backbone can be pretrained on (ivpt.data.synthetic.FAMILIES): "generic" has no
# classes, "pretrain" classes defined by parts the demo's classes do not use.
PRETRAIN_FAMILIES = ("generic", "pretrain")


@dataclass(frozen=True)
class PretrainRecipe:
    """What :func:`ivpt.demo.pretrain.pretrain_backbone` trains; the defaults wrote the shipped file.

    The default: 19 900 images of the class-free ``"generic"`` family, the renderer's dense part, appearance and
    part-appearance terms, no class labels, for four times the compute of the package's earlier file
    (``compute=4``), writing the 0.125x and 2x snapshots of the scaling curve on the way. Self-distillation
    (``distill_weight``) is off: at these settings it collapsed and cost the features (docs/demo.md, "The demo
    backbone").

    Attributes:
        seed: seed of the images, the initialisation, the data order and the flips.
        epochs: passes over the training images (unless ``compute`` is set).
        num_classes: classes of the pretraining task (at most 100, the family's attribute combinations); for the
            ``"generic"`` family, groups of images from one distribution.
        per_class: images per class, ``test_per_class`` of them held out.
        test_per_class: held-out images per class (for the reported attribute accuracy); ``None``: half.
        batch_size: training batch size.
        lr: peak AdamW learning rate.
        appearance: ``"cell"`` (each token's colour per quarter cell, colour spread, horizontal and
            vertical texture) or ``"rich"`` (colour per 4 x 4 sub-cell, and texture in four directions
            at two distances).
        appearance_weight: weight of the appearance term in the minimised sum (the other dense terms weigh 1).
            10 keeps each cell's colour readable but blurs the part structure (docs/demo.md, "The demo backbone").
        attribute_weight: weight of the class-attribute term (0: no class labels; the only value for the
            ``"generic"`` family). 0.1 wrote the earlier shipped weights; at 1, the first 16 x 16 file's weight,
            this term's gradient dominates
            the sum and teaches the tokens to drop what the pretraining classes do not need (the colour of
            the head among it), and the tokens of one part lie further apart.
        part_appearance_weight: weight of the part-appearance term: every creature token predicts what its whole
            part looks like (:func:`ivpt.demo.pretrain.part_descriptors`: colour, colour spread, texture,
            shape), so that a part's tokens, pooled, describe it. 0 switches it off.
        token_stride: pixels per token side of the trained ViT (4: a 16 x 16 grid at 64 px, the shipped
            weights; 8: an 8 x 8 grid at a quarter of the transformer's cost; 2: 32 x 32).
        family: the synthetic family the images are drawn from, one of :data:`PRETRAIN_FAMILIES`.
        part_weight: weight of the two dense part terms (per-token part shares, and their squared-distance
            form; 0 switches both off).
        distill_weight: weight of the two self-distillation terms (:mod:`ivpt.demo.distill`; 0: off).
        compute: when set, train for this multiple of the earlier shipped file's compute (its backbone passes,
            :func:`ivpt.demo.pretrain.compute_multiple`) instead of ``epochs`` epochs; the last epoch may be cut.
        snapshots: smaller compute multiples (with ``compute`` set) at which a finished backbone is also written,
            for a scaling curve from one run: the rate stays constant after the warm-up, and each snapshot
            branches off and decays it over the last fifth of its own compute, as the run does at its end.
    """

    seed: int = 0
    epochs: int = 12
    num_classes: int = PRETRAIN_CLASSES
    per_class: int = 200
    test_per_class: int | None = 1
    batch_size: int = 32
    lr: float = 2e-3
    appearance: Literal["cell", "rich"] = "cell"
    appearance_weight: float = 1.0
    attribute_weight: float = 0.0
    part_appearance_weight: float = 1.0
    token_stride: int = 4
    family: Literal["generic", "pretrain"] = "generic"
    part_weight: float = 1.0
    distill_weight: float = 0.0
    compute: float | None = 4.0
    snapshots: tuple[float, ...] = (0.125, 2.0)


__all__ = ["APPEARANCE_STYLES", "PRETRAIN_CLASSES", "PRETRAIN_FAMILIES", "TOKEN_STRIDES", "PretrainRecipe"]
