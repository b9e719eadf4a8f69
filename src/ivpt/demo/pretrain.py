"""``ivpt pretrain-backbone``: train the demo ViT from scratch on images that never show the demo's task.

The demo adapts a frozen backbone to a new fine-grained task, as the paper adapts DINOv2 to birds. The
backbone must therefore know images of this kind without knowing the task. By default it is trained on the
``"generic"`` family of the synthetic generator: no classes at all, every attribute of every part (colours
from the whole colour solid, every pattern, beak and tail shape, sizes and places) drawn per image over ranges
that hold the demo classes' values; the objective uses no label of any kind but the renderer's per-pixel part
map and the pixels themselves. (The ``"pretrain"`` family, whose classes are defined by the breast pattern,
tail shape and tail colour, with its class-attribute term, trained the package's earlier files.)

Recipe (:class:`ivpt.demo.recipe.PretrainRecipe`; everything derives from ``seed``, so the same command writes
the same file on the same hardware, software and thread count). The default, which wrote the shipped file:
100 groups x 200 images of 64 px drawn in memory (:func:`ivpt.data.synthetic.render_synthetic`), one per group
held out; random horizontal flips; AdamW (lr 2e-3, weight decay 0.05, gradient norm clipped at 2), batch 32,
for ``compute=4``: four times the backbone passes of the earlier shipped file's 12 epochs (:func:`compute_multiple`),
writing finished snapshots at 0.125x and 2x on the way (warm-up, constant rate, and each snapshot and the run
decaying over the last fifth of its own compute); one token per 4 x 4 pixel cell (``token_stride``). The images
and the model live on the training device and batches are gathered there (the order and flips are those of the
engine's :class:`~ivpt.engine.rng.EpochSampler` and :class:`~ivpt.engine.rng.SeededSamples`), so the same code
scales to a GPU (bf16 autocast there) with more images (``per_class``), ``workers`` processes drawing them, and
``max_minutes`` as a guard for time-boxed machines.

Self-supervised signal (``distill_weight``, off by default, :mod:`ivpt.demo.distill`): each image seen in two
random crops, the student's tokens partly masked, matching an exponential-moving-average teacher across the
views (CLS) and on the masked tokens (patches), as DINO and iBOT do; every other term then reads the student's
two masked views, with the part map warped alike. At the default rate and batch (30 times DINO's rate per image,
an eighth of its smallest batch) both terms collapsed to the uniform distribution (loss ln 512) within 0.25x of
the compute, and the features came out worse than the dense terms' alone at the same compute (docs/demo.md).

Dense signals from the renderer (its part map) and the pixels, and the class term of a family with classes:

- ``attributes``: the class's three attributes (5 breast patterns, 4 tail shapes, 5 tail colours), one
  softmax each, from the CLS token and from the mean patch token (label smoothing 0.1);
- ``parts``: per token and per quarter of its pixel cell (4 x 4 px by default, see ``token_stride``), the
  share of each part and of the background (soft-target cross-entropy from the generator's part masks).
  Foreground tokens weigh ``1 + FOREGROUND_WEIGHT * foreground share``: background covers ~90 % of the
  tokens and would otherwise teach mostly "background";
- ``geometry``: the same token shares predicted as ``softmax_k(-||z - c_k||^2)`` with one learned centroid
  ``c_k`` per part and background, the very form of IVPT's concept maps (squared distance, no
  temperature). A linear head can read parts off features whose clusters mix; this term lays the
  tokens of one part out *near each other*, which is what prototypes need;
- ``appearance``: per token, what its cell's pixels look like (:func:`appearance_targets`, smooth-L1
  regression). Style ``"cell"`` (the default): the mean colour of each quarter of the cell, the colour
  spread, and the mean absolute horizontal and vertical pixel differences; ``"rich"``: the mean colour
  of each of 4 x 4 sub-cells and the differences in four directions at distances 1 and 2. A
  self-supervised signal about every pixel, not about the task: it keeps local colour, texture and
  orientation in the features, and the demo's classes are made of those;
- ``part_appearance`` (off unless ``part_appearance_weight`` > 0): every creature token predicts what its
  *whole part* looks like (:func:`part_descriptors`: the part's mean colour and colour spread, its
  texture in four directions at two distances, its size and elongation; standardised over the training
  images, smooth-L1). The same description for every part, whichever defines the pretraining classes:
  the cell targets say what a token's few pixels look like, this one makes the tokens of one part agree
  on what the part looks like, which is what pooling a region (IVPT's prompts and classifier) reads.

Every term weighs 1 in the minimised sum by default, the class-attribute term 0 (the generic family has no
classes; ``part_weight``, ``appearance_weight``, ``part_appearance_weight``, ``distill_weight`` and
``attribute_weight`` change them; a term at weight 0 is not computed). On the ``"pretrain"`` family the earlier
files weighed the class term 0.1: at attribute weight 1, the weight of the
package's first 16 x 16 file, that term's gradient dominates the sum and teaches the tokens to drop what
the pretraining classes do not need: the head colour, a random nuisance in every pretraining image, could
be read off the true head's tokens of the diagnostic images (below) only 67 % of the time, ideal part
prototypes split their foreground tokens with NMI 54, and the pretraining task itself was learnt worse (5 %
of held-out images with all three attributes right). At 0.1 the same recipe gives 84 %, 70 and 53 %, and
IVPT's part discovery on the demo reaches NMI 55-64 (docs/demo.md, "The demo backbone").

The three dense terms are applied to the normalised tokens after every block from the second on (shared
heads): those are the depths where IVPT's prototype stages read the features, so each of them must show
parts, not only the last one. The dense part signal stands in for what makes DINOv2's patch features
part-aware at scale; it uses part masks of the *pretraining* images only. The demo task's part
annotations are never seen, and the part metrics of the demo measure whether prototypes trained without
any part label find the parts in these features.

After training, :func:`feature_diagnostics` scores the frozen features on separate *demo-family* images
(seed ``seed + 2000``, not the demo's; part masks used for scoring only): the NMI between k-means
clusters of foreground tokens and their majority part, per block, the accuracy of a linear probe on the
mean patch token, that of a probe on the tokens pooled over each true part (what a perfect part
discovery would hand IVPT's classifier), and per class-defining attribute (head colour, wing pattern,
beak shape) that of a probe reading it from the tokens of its own part. The file's metadata records the
recipe, the held-out accuracy of the CLS attribute classifiers (all three attributes right) and these
diagnostics; docs/demo.md quotes those of the shipped file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from tqdm import tqdm

from ivpt.checkpoint import write_atomically
from ivpt.data.synthetic import SyntheticArrays, render_synthetic
from ivpt.demo.recipe import PRETRAIN_FAMILIES, TOKEN_STRIDES, PretrainRecipe
from ivpt.engine.oracle import part_pooled_features, probe_accuracy
from ivpt.errors import IVPTError
from ivpt.model.demo_vit import DEMO_ARCH, DEMO_VIT_ARGS, STEM_CHANNELS
from ivpt.outputs import prepare_output_dir

LABEL_SMOOTHING = 0.1
FOREGROUND_WEIGHT = 3.0
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 1.0
GRAD_CLIP = 2.0
# With snapshots, each run (and each snapshot's branch) decays its rate over this last share of its steps.
DECAY_SHARE = 0.2
# Each token's cell is split into PART_SPLIT x PART_SPLIT sub-cells for the part targets.
PART_SPLIT = 2


@dataclass(frozen=True)
class AppearanceStyle:
    """What :func:`appearance_targets` describes per token.

    Attributes:
        split: the token's cell is split into ``split x split`` sub-cells, each giving its mean colour.
        steps: pixel distances of the texture differences.
        directions: texture directions, the first of right, down, down-right, down-left.
    """

    split: int
    steps: tuple[int, ...]
    directions: int

    @property
    def dims(self) -> int:
        """Length of the target vector of one token."""
        return 3 * self.split * self.split + 3 + self.directions * len(self.steps)


APPEARANCE = {
    "cell": AppearanceStyle(split=2, steps=(1,), directions=2),
    "rich": AppearanceStyle(split=4, steps=(1, 2), directions=4),
}
# The dense heads read the tokens after blocks FIRST_SUPERVISED_BLOCK.. (0-based) and the final output.
FIRST_SUPERVISED_BLOCK = 1
# Keeps the pretraining images apart from every demo image even when both use seed 0.
_DATA_SEED_OFFSET = 1000
# The demo-family images the diagnostics score on: not the demo's own images (those use seed 0).
_DIAGNOSTIC_SEED_OFFSET = 2000
_DIAGNOSTIC_CLASSES = 10
_DIAGNOSTIC_PER_CLASS = 60


def attribute_targets(family: str, num_classes: int) -> tuple[Tensor, tuple[int, ...]]:
    """Attribute value of every class of a synthetic family.

    Returns:
        ``(targets, sizes)``: ``targets (C, A)`` the index of class ``c``'s value on attribute axis ``a``
        (axes and values in the order of :data:`ivpt.data.synthetic.FAMILIES`), and the number of values
        of each axis.
    """
    from ivpt.data.synthetic import FAMILIES, class_definitions

    axes = FAMILIES[family].axes
    value_index = {axis: {name: i for i, name in enumerate(values)} for axis, values in axes.items()}
    rows = [[value_index[axis][chosen[axis]] for axis in axes] for _, chosen in class_definitions(family, num_classes)]
    return torch.tensor(rows, dtype=torch.long), tuple(len(values) for values in axes.values())


def _cells(maps: Tensor, stride: int, split: int) -> Tensor:
    """``(B, C, H, W)`` per-pixel values -> ``(B, h*w, split*split, C)`` means over each token's sub-cells.

    Tokens in raster order (like the ViT's patch tokens), sub-cells in raster order within a token.
    """
    batch, channels = maps.shape[:2]
    sub = stride // split
    pooled = F.avg_pool2d(maps, sub)  # (B, C, h*split, w*split)
    height, width = pooled.shape[-2] // split, pooled.shape[-1] // split
    pooled = pooled.reshape(batch, channels, height, split, width, split)
    return pooled.permute(0, 2, 4, 3, 5, 1).reshape(batch, height * width, split * split, channels)


def part_shares(part_ids: Tensor, num_parts: int, stride: int, split: int = PART_SPLIT) -> Tensor:
    """Share of each part under every token's sub-cells.

    Args:
        part_ids: ``(B, H, W)`` integer part id per pixel (0: background, 1..P: parts).
        num_parts: P.
        stride: pixels per token side.
        split: sub-cells per token side.

    Returns:
        ``(B, h*w, split*split, P + 1)`` fractions that sum to 1 over the last axis (column 0: background).
    """
    one_hot = F.one_hot(part_ids.long(), num_parts + 1).permute(0, 3, 1, 2).float()
    return _cells(one_hot, stride, split)


def _texture(images: Tensor, step: int, directions: int) -> Tensor:
    """``(B, 3, H, W)`` -> ``(B, directions, H, W)``: per pixel, the channel-mean absolute difference to the
    pixel ``step`` away to the right, below, below-right and below-left (the first ``directions`` of those;
    border pixels repeat, so they differ by nothing)."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (step, step, step, step), mode="replicate")

    def shifted(down: int, right: int) -> Tensor:
        return padded[..., step + down : step + down + height, step + right : step + right + width]

    offsets = ((0, step), (step, 0), (step, step), (step, -step))[:directions]
    return torch.cat([(shifted(*offset) - images).abs().mean(1, keepdim=True) for offset in offsets], dim=1)


def appearance_targets(images: Tensor, stride: int, style: str = "cell") -> Tensor:
    """What each token's pixels look like, the regression target that keeps colour and texture in the features.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        stride: pixels per token side.
        style: a key of :data:`APPEARANCE`.

    Returns:
        ``(B, h*w, APPEARANCE[style].dims)``: per token, the mean colour of each sub-cell (raster order,
        3 channels each), the colour standard deviation over the cell, and the cell's mean of the
        :func:`_texture` differences, direction by direction for each step.
    """
    spec = APPEARANCE[style]
    batch = images.shape[0]
    means = _cells(images, stride, spec.split).flatten(2)  # (B, h*w, split*split*3)
    cell_mean = _cells(images, stride, 1)[:, :, 0]
    cell_square = _cells(images.square(), stride, 1)[:, :, 0]
    spread = (cell_square - cell_mean.square()).clamp_min(0.0).sqrt()  # (B, h*w, 3)
    texture = torch.cat([_texture(images, step, spec.directions) for step in spec.steps], dim=1)
    texture = _cells(texture, stride, 1)[:, :, 0]  # (B, h*w, directions * len(steps))
    return torch.cat([means, spread, texture], dim=2).reshape(batch, -1, spec.dims)


# Texture distances of :func:`part_descriptors` (in pixels; four directions each).
PART_TEXTURE_STEPS = (1, 2)
# Mean colour (3), colour spread (3), texture (4 directions per step) and shape (3) of one part.
PART_DESCRIPTOR_DIMS = 3 + 3 + 4 * len(PART_TEXTURE_STEPS) + 3


def part_descriptors(images: Tensor, part_ids: Tensor, num_parts: int) -> tuple[Tensor, Tensor]:
    """What each true part of every image looks like: the targets of the part-appearance term.

    The same description for every part, whatever it is: the mean colour and the colour spread over its
    pixels, the mean of the :func:`_texture` differences over its pixels (right, down and both diagonals,
    at each of :data:`PART_TEXTURE_STEPS`), and its shape: the log of its share of the creature's pixels
    and the logs of its two principal second moments over its pixel count (how long and how wide it is,
    independent of the creature's scale).

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        part_ids: ``(B, H, W)`` integer part id per pixel (0: background, 1..P: parts).
        num_parts: P.

    Returns:
        ``(descriptors, pixels)``: ``(B, P, PART_DESCRIPTOR_DIMS)`` (arbitrary but finite for a part that
        is not in the image) and ``(B, P)`` each part's pixel count.
    """
    height, width = images.shape[-2:]
    masks = F.one_hot(part_ids.long(), num_parts + 1)[..., 1:].permute(0, 3, 1, 2).to(images.dtype)  # (B,P,H,W)
    pixels = masks.sum(dim=(2, 3))
    count = pixels.clamp_min(1.0)

    def part_mean(values: Tensor) -> Tensor:  # (B, C, H, W) -> (B, P, C)
        return torch.einsum("bphw,bchw->bpc", masks, values) / count.unsqueeze(-1)

    colour = part_mean(images)
    spread = (part_mean(images.square()) - colour.square()).clamp_min(0.0).sqrt()
    texture = part_mean(torch.cat([_texture(images, step, 4) for step in PART_TEXTURE_STEPS], dim=1))
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=images.dtype, device=images.device),
        torch.arange(width, dtype=images.dtype, device=images.device),
        indexing="ij",
    )
    coordinates = torch.stack([xs, ys, xs * xs, ys * ys, xs * ys])  # (5, H, W)
    mx, my, mxx, myy, mxy = part_mean(coordinates.expand(images.shape[0], -1, -1, -1)).unbind(-1)
    var_x, var_y, cov = mxx - mx.square(), myy - my.square(), mxy - mx * my
    half_trace = (var_x + var_y) / 2
    offset = (half_trace.square() - (var_x * var_y - cov.square())).clamp_min(0.0).sqrt()
    # A one-pixel part has moments 0; the floor keeps the logs finite (a pixel's own variance is 1/12).
    major = (half_trace + offset).clamp_min(1.0 / 12) / count
    minor = (half_trace - offset).clamp_min(1.0 / 12) / count
    share = count / pixels.sum(dim=1, keepdim=True).clamp_min(1.0)
    shape = torch.stack([share.log(), major.log(), minor.log()], dim=-1)
    return torch.cat([colour, spread, texture, shape], dim=-1), pixels


class _DeviceImages:
    """Images of one split with their part id maps and labels, held as tensors on the training device.

    :meth:`batch` gathers, flips and normalises a batch there: no data loader, no host copies per step.
    """

    def __init__(self, data: SyntheticArrays, rows: np.ndarray, device: torch.device) -> None:
        self.images = torch.from_numpy(data.images[rows]).permute(0, 3, 1, 2).contiguous().to(device)  # (N,3,S,S)
        self.part_ids = torch.from_numpy(data.part_ids[rows]).to(device)  # (N, S, S) uint8
        self.labels = torch.from_numpy(data.labels[rows]).to(device)
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor, flip: Tensor | None = None) -> dict[str, Tensor]:
        """Rows ``index (B,)``, mirrored where ``flip (B,)`` is true.

        Returns:
            ``image (B, 3, S, S)`` normalised float, ``label (B,)``, ``part_ids (B, S, S)`` int64.
        """
        index = index.to(self.images.device)
        images = self.images[index].float() / 255.0
        part_ids = self.part_ids[index].long()
        if flip is not None:
            flip = flip.to(self.images.device)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            part_ids = torch.where(flip.view(-1, 1, 1), part_ids.flip(-1), part_ids)
        return {"image": (images - self.mean) / self.std, "label": self.labels[index], "part_ids": part_ids}

    def in_order(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """Every image once, in order, unflipped, as :meth:`batch` gives them ``batch_size`` at a time."""
        for first in range(0, len(self), batch_size):
            yield self.batch(torch.arange(first, min(first + batch_size, len(self))))


def epoch_order(size: int, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
    """The order in which an epoch visits the training images, and which of them it mirrors.

    The same streams as :class:`ivpt.engine.rng.EpochSampler` (one permutation from ``seed + epoch``)
    and :class:`ivpt.engine.rng.SeededSamples` (one draw per image from its ``(seed, epoch, index)``
    seed), so a recipe gives the same batches whatever the device.

    Returns:
        ``order (size,)`` image indices and ``flips (size,)`` bool, flip ``i`` belonging to ``order[i]``.
    """
    from ivpt.engine.rng import EpochSampler, sample_seed

    sampler = EpochSampler(size, seed)
    sampler.set_epoch(epoch)
    order = [index for index, _ in sampler]
    flips = []
    with torch.random.fork_rng(devices=[]):
        for index in order:
            torch.manual_seed(sample_seed(seed, epoch, index))
            flips.append(bool(torch.rand(()) < 0.5))
    return torch.tensor(order), torch.tensor(flips)


def token_stride(backbone: nn.Module) -> int:
    """Pixels per token side of a timm ViT (its input size over its token grid)."""
    return int(backbone.patch_embed.img_size[-1]) // int(backbone.patch_embed.grid_size[-1])


def normalised_depths(
    backbone: nn.Module,
    images: Tensor,
    first_block: int = 0,
    token_mask: Tensor | None = None,
    mask_token: Tensor | None = None,
) -> list[Tensor]:
    """Token sequences after blocks ``first_block..L-1``, each through the final norm (what IVPT's stages read).

    Args:
        backbone: a timm ViT.
        images: ``(B, 3, H, W)``.
        first_block: 0-based index of the first block whose output is returned.
        token_mask: ``(B, n)`` bool, patch tokens whose embedding is replaced by ``mask_token (D,)`` before the
            position embedding is added (the self-distillation's masked views).

    Returns:
        ``L - first_block`` tensors ``(B, T, D)`` (prefix tokens first); the last is the final output.
    """
    embedded = backbone.patch_embed(images)
    if token_mask is not None and mask_token is not None:
        embedded = torch.where(token_mask[..., None], mask_token.to(embedded.dtype), embedded)
    tokens = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(embedded)))
    outputs = []
    for index, block in enumerate(backbone.blocks):
        tokens = block(tokens)
        if index >= first_block:
            outputs.append(backbone.norm(tokens))
    return outputs


class _PretrainModel(nn.Module):
    """The demo ViT with the pretraining heads (see the module docstring).

    ``forward(images (B, 3, S, S), token_mask=None)`` returns ``(cls_logits, patch_logits, depths, cls_token)``:
    two lists of ``(B, V_a)`` attribute logits, one per attribute axis ``a`` with ``V_a`` values (empty for a
    family without classes), the normalised patch tokens ``(B, h*w, D)`` of every supervised depth (the last
    is the final output) and the final normalised CLS token ``(B, D)``; :meth:`dense` maps one of the depths
    to part logits and appearance predictions. With ``distill``, :attr:`distillation` holds the
    self-distillation's head, mask token and teacher (:mod:`ivpt.demo.distill`), and ``token_mask (B, h*w)``
    masks the student's tokens.
    """

    def __init__(
        self,
        backbone: nn.Module,
        sizes: tuple[int, ...],
        num_parts: int,
        appearance: str = "cell",
        distill: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.token_stride = token_stride(backbone)
        self.sizes = sizes
        self.num_parts = num_parts
        self.appearance = appearance
        dim = backbone.embed_dim
        # A family without classes has no attribute heads (nn.Linear(dim, 0) would warn at initialisation).
        self.cls_head = nn.Linear(dim, sum(sizes)) if sizes else nn.Identity()
        self.patch_head = nn.Linear(dim, sum(sizes)) if sizes else nn.Identity()
        self.part_head = nn.Linear(dim, PART_SPLIT * PART_SPLIT * (num_parts + 1))
        self.appearance_head = nn.Linear(dim, APPEARANCE[appearance].dims)
        # One centroid per part (and background) scored like IVPT's concept maps: softmax(-||z - c||^2).
        self.part_centroids = nn.Parameter(torch.randn(num_parts + 1, dim))
        # Created last: the heads above start as they did before this one existed.
        self.part_appearance_head = nn.Linear(dim, PART_DESCRIPTOR_DIMS)
        self.distillation = None
        if distill:
            from ivpt.demo.distill import SelfDistillation

            self.distillation = SelfDistillation(backbone)

    def forward(
        self, images: Tensor, token_mask: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
        mask_token = None if self.distillation is None else self.distillation.mask_token
        sequences = normalised_depths(self.backbone, images, FIRST_SUPERVISED_BLOCK, token_mask, mask_token)
        start = self.backbone.num_prefix_tokens
        depths = [sequence[:, start:] for sequence in sequences]
        cls_token = sequences[-1][:, 0]
        if not self.sizes:
            return [], [], depths, cls_token
        cls_logits = self.cls_head(cls_token).split(self.sizes, dim=1)
        patch_logits = self.patch_head(depths[-1].mean(dim=1)).split(self.sizes, dim=1)
        return list(cls_logits), list(patch_logits), depths, cls_token

    def dense(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, h*w, D)`` -> part logits ``(B, h*w, split*split, P + 1)``, centroid logits ``(B, h*w, P + 1)``
        and appearance ``(B, h*w, A)``."""
        part_logits = self.part_head(tokens).unflatten(-1, (PART_SPLIT * PART_SPLIT, self.num_parts + 1))
        centroid_logits = -(tokens.float().unsqueeze(-2) - self.part_centroids).pow(2).sum(dim=-1)
        return part_logits, centroid_logits, self.appearance_head(tokens)


def loss_weights(recipe: PretrainRecipe) -> dict[str, float]:
    """The weight of each term of :func:`_losses` in the minimised sum (terms at weight 0 are not computed)."""
    return {
        "attributes": recipe.attribute_weight,
        "parts": recipe.part_weight,
        "geometry": recipe.part_weight,
        "appearance": recipe.appearance_weight,
        "part_appearance": recipe.part_appearance_weight,
        "distill_cls": recipe.distill_weight,
        "distill_patch": recipe.distill_weight,
    }


def descriptor_statistics(images: _DeviceImages, num_parts: int, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of :func:`part_descriptors` over the parts present in ``images``.

    The part-appearance term regresses standardised descriptors, so that colour, texture and shape count
    alike whatever their units.

    Returns:
        ``(mean, std)``, each ``(PART_DESCRIPTOR_DIMS,)``.
    """
    total = torch.zeros(PART_DESCRIPTOR_DIMS, dtype=torch.float64, device=images.images.device)
    total_square = torch.zeros_like(total)
    present = 0
    for batch in images.in_order(batch_size):
        descriptors, pixels = part_descriptors(batch["image"], batch["part_ids"], num_parts)
        rows = descriptors[pixels > 0].double()
        total += rows.sum(dim=0)
        total_square += rows.square().sum(dim=0)
        present += rows.shape[0]
    mean = total / max(present, 1)
    std = (total_square / max(present, 1) - mean.square()).clamp_min(1e-6).sqrt()
    return mean.float(), std.float()


def _final_sequence(backbone: nn.Module, images: Tensor) -> Tensor:
    """``(B, T, D)``: the final normalised token sequence (CLS first) of a timm ViT."""
    return normalised_depths(backbone, images, len(backbone.blocks) - 1)[-1]


def _losses(
    model: _PretrainModel,
    batch: dict[str, Tensor],
    targets: Tensor,
    names: list[str],
    descriptor_scale: tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The pretraining terms ``names`` (see the module docstring), unweighted, in fp32; :func:`loss_weights`
    gives the weights of their minimised sum. ``descriptor_scale`` (:func:`descriptor_statistics`) is needed by
    the part-appearance term.

    Without self-distillation every term reads the batch as it is. With it (``model.distillation``), each
    image is seen in two random views (:func:`ivpt.demo.distill.random_views`, drawn from ``generator``), the
    student's tokens partly masked; the teacher reads the unmasked views, and every other term the student's
    masked views with their warped part maps (averaged over the two views).
    """
    if model.distillation is None:
        return _view_terms(model, batch["image"], batch["part_ids"], batch["label"], targets, names, descriptor_scale)
    from ivpt.demo.distill import random_token_mask, random_views

    if generator is None:
        raise IVPTError("pretrain-backbone: self-distillation needs a generator for its views and masks")
    distillation = model.distillation
    views = [random_views(batch["image"], batch["part_ids"], generator) for _ in range(2)]
    batch_size, tokens = batch["image"].shape[0], len(batch["part_ids"][0].flatten()) // model.token_stride**2
    masks = [random_token_mask(batch_size, tokens, generator, batch["image"].device) for _ in range(2)]
    teacher = [distillation.teacher_outputs(view, _final_sequence) for view, _ in views]
    student_cls, student_patches = [], []
    per_view: list[dict[str, Tensor]] = []
    for (view, view_ids), mask in zip(views, masks, strict=True):
        per_view.append(
            _view_terms(model, view, view_ids, batch["label"], targets, names, descriptor_scale, mask, student_cls)
        )
        student_patches.append(per_view[-1].pop("_final_tokens"))
    terms = {name: (per_view[0][name] + per_view[1][name]) / 2 for name in per_view[0]}
    distilled = distillation.losses(
        (student_cls[0], student_cls[1]),
        (student_patches[0], student_patches[1]),
        (masks[0], masks[1]),
        (teacher[0][0], teacher[1][0]),
        (teacher[0][1], teacher[1][1]),
    )
    terms.update({name: value for name, value in distilled.items() if name in names})
    return {name: terms[name] for name in names}


def _view_terms(
    model: _PretrainModel,
    images: Tensor,
    part_ids: Tensor,
    labels: Tensor,
    targets: Tensor,
    names: list[str],
    descriptor_scale: tuple[Tensor, Tensor] | None,
    token_mask: Tensor | None = None,
    cls_tokens: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """The terms of ``names`` other than the distillation's on one view of the batch.

    With ``cls_tokens`` (a list), the view's final CLS token is appended to it and the final patch tokens are
    returned under ``_final_tokens`` (what the distillation needs from the student).
    """
    cls_logits, patch_logits, depths, cls_token = model(images, token_mask)
    terms: dict[str, Tensor] = {}
    if "attributes" in names:
        wanted = targets[labels]  # (B, A)
        terms["attributes"] = sum(
            F.cross_entropy(logits.float(), wanted[:, axis], label_smoothing=LABEL_SMOOTHING)
            for head in (cls_logits, patch_logits)
            for axis, logits in enumerate(head)
        )
    shares = part_shares(part_ids, model.num_parts, model.token_stride)  # (B, n, cells, P + 1)
    weights = 1.0 + FOREGROUND_WEIGHT * (1.0 - shares[..., 0])  # (B, n, cells)
    token_shares = shares.mean(dim=2)  # (B, n, P + 1)
    token_weights = weights.mean(dim=2)
    dense = [name for name in ("parts", "geometry", "appearance") if name in names]
    if dense:
        appearance = appearance_targets(images, model.token_stride, model.appearance)
        sums = dict.fromkeys(dense, images.new_zeros(()))
        for tokens in depths:
            part_logits, centroid_logits, predicted = model.dense(tokens)
            if "parts" in sums:
                per_cell = -(shares * part_logits.float().log_softmax(dim=-1)).sum(dim=-1)
                sums["parts"] = sums["parts"] + (per_cell * weights).sum() / weights.sum()
            if "geometry" in sums:
                per_token = -(token_shares * centroid_logits.log_softmax(dim=-1)).sum(dim=-1)
                sums["geometry"] = sums["geometry"] + (per_token * token_weights).sum() / token_weights.sum()
            if "appearance" in sums:
                sums["appearance"] = sums["appearance"] + F.smooth_l1_loss(predicted.float(), appearance)
        terms.update({name: value / len(depths) for name, value in sums.items()})
    if "part_appearance" in names:
        if descriptor_scale is None:
            raise IVPTError("pretrain-backbone: the part-appearance term needs the descriptor statistics")
        view = {"image": images, "part_ids": part_ids}
        terms["part_appearance"] = _part_appearance(model, view, depths, token_shares, descriptor_scale)
    if cls_tokens is not None:
        cls_tokens.append(cls_token)
        terms["_final_tokens"] = depths[-1]
    return terms


def _part_appearance(
    model: _PretrainModel,
    batch: dict[str, Tensor],
    depths: list[Tensor],
    token_shares: Tensor,
    descriptor_scale: tuple[Tensor, Tensor],
) -> Tensor:
    """Smooth-L1 error of each creature token's prediction of its whole part's standardised
    :func:`part_descriptors`, mean over the creature tokens and the supervised depths.

    ``token_shares (B, n, P + 1)``: part shares under each token; a token counts as the creature's when
    most of it is (:func:`_foreground`), and its part is the largest one under it.
    """
    mean, std = descriptor_scale
    descriptors, _ = part_descriptors(batch["image"], batch["part_ids"], model.num_parts)
    descriptors = (descriptors - mean) / std  # (B, P, dims)
    part = token_shares[..., 1:].argmax(dim=-1)  # (B, n) 0-based foreground part
    wanted = torch.gather(descriptors, 1, part.unsqueeze(-1).expand(-1, -1, descriptors.shape[-1]))
    creature = _foreground(token_shares).to(wanted.dtype)  # (B, n)
    total = wanted.new_zeros(())
    for tokens in depths:
        error = F.smooth_l1_loss(model.part_appearance_head(tokens).float(), wanted, reduction="none").mean(-1)
        total = total + (error * creature).sum() / creature.sum().clamp_min(1.0)
    return total / len(depths)


@torch.no_grad()
def _test_accuracy(model: _PretrainModel, images: _DeviceImages, targets: Tensor, batch_size: int) -> float:
    """Held-out share (%) of images whose three CLS attribute predictions are all right."""
    model.eval()
    correct = 0
    for batch in images.in_order(batch_size):
        cls_logits, _, _, _ = model(batch["image"])
        predicted = torch.stack([logits.argmax(dim=1) for logits in cls_logits], dim=1)  # (B, A)
        correct += int((predicted == targets[batch["label"]]).all(dim=1).sum())
    model.train()
    return 100.0 * correct / max(len(images), 1)


def _foreground(shares: Tensor) -> Tensor:
    """``(..., P + 1)`` part shares -> ``(...)``: the tokens the part diagnostics count as creature (background
    share below one half)."""
    return shares[..., 0] < 0.5


def part_cluster_nmi(features: Tensor, shares: Tensor, num_clusters: int, seed: int = 0) -> float:
    """How well k-means on foreground tokens recovers their parts: NMI x 100 with the majority part.

    Args:
        features: ``(N, n, D)`` token features of N images.
        shares: ``(N, n, P + 1)`` part shares under each token (column 0: background).
        num_clusters: k of k-means.
        seed: k-means seed.

    Returns:
        NMI (sklearn, arithmetic normalisation) x 100 over the tokens whose background share is below 0.5.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    foreground = _foreground(shares)
    points = features[foreground].double().numpy()
    parts = shares[foreground].argmax(dim=-1).numpy()
    if len(points) < num_clusters:
        raise IVPTError(f"part_cluster_nmi: {len(points)} foreground tokens are fewer than {num_clusters} clusters")
    clusters = KMeans(num_clusters, n_init=3, random_state=seed).fit_predict(points)
    return 100.0 * float(normalized_mutual_info_score(parts, clusters))


def part_centroid_nmi(features: Tensor, shares: Tensor, is_train: Tensor) -> float:
    """How well ideal prototypes split foreground tokens into parts: NMI x 100 with the majority part.

    The prototypes are the mean token of each majority part (background included) over the training
    images; every test token goes to the nearest one by squared distance, the form of IVPT's concept
    maps without their spatial bias. An upper reference for the part discovery prototypes can reach on
    these features.

    Args:
        features: ``(N, n, D)`` token features of N images.
        shares: ``(N, n, P + 1)`` part shares under each token (column 0: background).
        is_train: ``(N,)`` which images give the prototypes; the others are scored.

    Returns:
        NMI (sklearn, arithmetic normalisation) x 100 over the test tokens whose background share is below 0.5.
    """
    from sklearn.metrics import normalized_mutual_info_score

    majority = shares.argmax(dim=-1)  # (N, n)
    train, test = is_train.bool(), ~is_train.bool()
    train_points, train_parts = features[train].flatten(0, 1).double(), majority[train].flatten()
    present = torch.unique(train_parts)
    prototypes = torch.stack([train_points[train_parts == part].mean(dim=0) for part in present])
    foreground = _foreground(shares[test]).flatten()
    test_points = features[test].flatten(0, 1).double()[foreground]
    if len(test_points) == 0:
        raise IVPTError("part_centroid_nmi: the test images have no foreground tokens")
    nearest = present[torch.cdist(test_points, prototypes).argmin(dim=1)]
    parts = majority[test].flatten()[foreground]
    return 100.0 * float(normalized_mutual_info_score(parts.numpy(), nearest.numpy()))


def attribute_probes(tokens: Tensor, shares: Tensor, data: SyntheticArrays, family: str) -> dict[str, float | None]:
    """How well each class-defining attribute can be read off the tokens of its own part.

    For every attribute axis of ``family`` (e.g. the head colour), a :func:`probe_accuracy` probe predicts
    each image's value on that axis from its tokens pooled over the axis's true part (the head), on the
    images where that part is visible. A backbone whose tokens lost what a part looks like scores low here
    even when its parts are easy to find.

    Args:
        tokens: ``(N, n, D)`` patch tokens of the images of ``data``.
        shares: ``(N, n, P + 1)`` part shares under each token (column 0: background).
        data: the images (their labels and split).
        family: the synthetic family ``data`` was drawn from.

    Returns:
        ``{axis: test accuracy (%)}``, ``None`` for an axis whose training images show fewer than two of
        its values.
    """
    from ivpt.data.synthetic import AXIS_PART, FAMILIES, PART_ID

    labels, is_train = torch.from_numpy(data.labels), torch.from_numpy(data.is_train)
    class_values, _ = attribute_targets(family, int(labels.max()) + 1)  # (C, A)
    per_part = part_pooled_features(tokens, shares).unflatten(1, (shares.shape[-1] - 1, tokens.shape[-1]))
    result: dict[str, float | None] = {}
    for axis_index, axis in enumerate(FAMILIES[family].axes):
        target = class_values[labels, axis_index]  # (N,) each image's value on this axis
        part = PART_ID[AXIS_PART[axis]]
        visible = shares[..., part].sum(dim=1) > 0
        if len(target[visible & is_train].unique()) < 2 or not (visible & ~is_train).any():
            result[axis] = None
            continue
        pooled = per_part[:, part - 1]  # (N, D); part ids count from 1, the background is not pooled
        result[axis] = round(probe_accuracy(pooled[visible], target[visible], is_train[visible]), 1)
    return result


@torch.no_grad()
def feature_diagnostics(
    backbone: nn.Module,
    data: SyntheticArrays,
    batch_size: int = 200,
    device: str | torch.device = "cpu",
    family: str = "default",
) -> dict[str, Any]:
    """Part-awareness and linear separability of a frozen backbone's tokens on a synthetic data set.

    Part masks of ``data`` are used for scoring only. Cheap enough (seconds) to compare pretraining
    recipes.

    Args:
        backbone: the demo ViT (any :func:`token_stride`).
        data: a synthetic data set (:func:`ivpt.data.synthetic.render_synthetic`; any family).
        batch_size: images per forward.
        device: where the backbone runs.
        family: the synthetic family ``data`` was drawn from (its attribute axes).

    Returns:
        ``foreground_tokens``: tokens per image that are mostly part, not background (how much of a
        creature the token grid sees); ``part_nmi``: per block (0-based), :func:`part_cluster_nmi` of its
        normalised output with ``P + 1`` clusters; ``part_centroid_nmi``: per block,
        :func:`part_centroid_nmi` (prototypes from the data set's training images, scored on its test
        images); ``probe_accuracy``: :func:`probe_accuracy` of the mean final patch token;
        ``part_probe_accuracy``: the same probe on :func:`part_pooled_features` of the final tokens over
        the true parts; ``attribute_probe_accuracy``: :func:`attribute_probes` of the final tokens.
    """
    num_parts = int(data.part_ids.max())
    images = _DeviceImages(data, np.arange(len(data.labels)), torch.device(device))
    was_training = backbone.training
    backbone.eval()
    start = backbone.num_prefix_tokens
    stride = token_stride(backbone)
    per_depth: list[list[Tensor]] = []
    shares = []
    for batch in images.in_order(batch_size):
        depths = normalised_depths(backbone, batch["image"])
        per_depth = per_depth or [[] for _ in depths]
        for store, sequence in zip(per_depth, depths, strict=True):
            store.append(sequence[:, start:].float().cpu())
        shares.append(part_shares(batch["part_ids"], num_parts, stride, split=1)[:, :, 0].cpu())
    backbone.train(was_training)
    part_share = torch.cat(shares)
    features = [torch.cat(store) for store in per_depth]
    labels, is_train = torch.from_numpy(data.labels), torch.from_numpy(data.is_train)
    return {
        "foreground_tokens": round(float(_foreground(part_share).sum(dim=1).float().mean()), 1),
        "part_nmi": [round(part_cluster_nmi(f, part_share, num_parts + 1), 1) for f in features],
        "part_centroid_nmi": [round(part_centroid_nmi(f, part_share, is_train), 1) for f in features],
        "probe_accuracy": round(probe_accuracy(features[-1].mean(dim=1), labels, is_train), 1),
        "part_probe_accuracy": round(
            probe_accuracy(part_pooled_features(features[-1], part_share), labels, is_train), 1
        ),
        "attribute_probe_accuracy": attribute_probes(features[-1], part_share, data, family),
    }


def _pretraining_images(recipe: PretrainRecipe, data_dir: Path | None, workers: int) -> SyntheticArrays:
    """The recipe's images, drawn with ``workers`` processes, or read from ``data_dir``'s cache of them."""
    size = int(DEMO_VIT_ARGS["img_size"])
    settings = dict(
        num_classes=recipe.num_classes,
        per_class=recipe.per_class,
        size=size,
        seed=recipe.seed + _DATA_SEED_OFFSET,
        family=recipe.family,
        test_per_class=recipe.test_per_class,
    )
    cache = None
    if data_dir is not None:
        held_out = "half" if recipe.test_per_class is None else recipe.test_per_class
        name = (
            f"{recipe.family}_seed{settings['seed']}_{size}px_{recipe.num_classes}x{recipe.per_class}"
            f"_test{held_out}.npz"
        )
        cache = Path(data_dir) / name
        if cache.is_file():
            with np.load(cache) as stored:
                return SyntheticArrays(**{field.name: stored[field.name] for field in fields(SyntheticArrays)})
    data = render_synthetic(**settings, workers=workers)
    if cache is not None:
        write_atomically(cache, lambda file: np.savez(file, **asdict(data)))
    return data


# Backbone passes of the recipe that wrote the package's earlier shipped file (12 epochs of 156 batches of 32
# images, one forward and a backward counted as two): the unit of :func:`compute_multiple`.
REFERENCE_PASSES = 12 * (5000 // 32) * 32 * 3


def passes_per_image(recipe: PretrainRecipe) -> int:
    """Backbone passes a training image costs: a student's forward and backward count 3, a teacher's forward
    1; with self-distillation each image is seen in two views by both. The small heads are not counted."""
    return 2 * (3 + 1) if recipe.distill_weight > 0 else 3


def compute_multiple(recipe: PretrainRecipe, steps: int) -> float:
    """Training compute of ``steps`` optimizer steps of ``recipe``, in units of the earlier shipped file's
    (:data:`REFERENCE_PASSES`)."""
    return steps * recipe.batch_size * passes_per_image(recipe) / REFERENCE_PASSES


def training_steps(recipe: PretrainRecipe, steps_per_epoch: int) -> int:
    """Optimizer steps of ``recipe``: ``epochs`` full epochs, or with ``compute`` set the steps that spend
    that multiple of :data:`REFERENCE_PASSES` (at least one)."""
    if recipe.compute:
        return max(1, round(recipe.compute * REFERENCE_PASSES / (recipe.batch_size * passes_per_image(recipe))))
    return steps_per_epoch * recipe.epochs


def _command(out: Path, recipe: PretrainRecipe) -> str:
    """The ``ivpt pretrain-backbone`` line that reproduces ``recipe`` (non-default options only)."""
    parts = ["ivpt", "pretrain-backbone", "--out", shlex.quote(out.name)]
    default = PretrainRecipe()
    for field in fields(PretrainRecipe):
        value = getattr(recipe, field.name)
        # The seed and the epochs are always written: they are what one changes to get another file.
        if field.name in ("seed", "epochs") or value != getattr(default, field.name):
            if isinstance(value, tuple):
                shown = ",".join(f"{v:g}" for v in value) or "none"
            else:
                shown = "none" if value is None else str(value)
            parts += [f"--{field.name.replace('_', '-')}", shown]
    return " ".join(parts)


def pretrain_backbone(
    out: str | Path,
    recipe: PretrainRecipe | None = None,
    *,
    data_dir: str | Path | None = None,
    device: str = "auto",
    workers: int = 1,
    diagnose: bool = True,
    progress: bool = True,
    arch_args: dict[str, Any] | None = None,
    max_minutes: float | None = None,
) -> Path:
    """Train ``ivpt_demo_vit`` on the ``"pretrain"`` synthetic family and save its backbone weights.

    Args:
        out: output ``.safetensors`` file (the shipped one is ``src/ivpt/assets/ivpt_demo_vit.safetensors``).
        recipe: what to train (default: the shipped file's :class:`PretrainRecipe`).
        data_dir: a folder that keeps the drawn pretraining images for the next run (default: drawn anew).
        device: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda[:N]``; bf16 autocast on a GPU.
        workers: processes that draw the images.
        diagnose: score the trained features with :func:`feature_diagnostics` on demo-family images
            drawn for it, and store the result in the file's metadata.
        progress: show progress bars and per-epoch lines.
        arch_args: ``timm.create_model`` overrides of :data:`DEMO_VIT_ARGS` (to try other sizes; a file
            trained with them loads only into a model built with the same ones).
        max_minutes: stop after the first epoch that ends past this many minutes of training and save
            the backbone as it is then (the learning rate has not decayed to zero; the file's recipe
            records ``epochs_completed``). A guard for time-boxed machines, not part of a recipe.

    Returns:
        The path of the written file.

    Raises:
        IVPTError: ``out`` does not end in ``.safetensors``, a recipe value is out of range, the device is
            unavailable, or the training split is smaller than one batch.
    """
    import timm

    from ivpt.engine.distributed import resolve_device
    from ivpt.engine.rng import sample_seed, seed_everything

    recipe = recipe or PretrainRecipe()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise IVPTError(f"pretrain-backbone: output '{out}' must be a .safetensors file")
    for name in ("epochs", "batch_size", "per_class", "test_per_class"):
        value = getattr(recipe, name)
        if value is not None and value < 1:
            raise IVPTError(f"pretrain-backbone: --{name.replace('_', '-')} must be at least 1, got {value}")
    if recipe.appearance not in APPEARANCE:
        raise IVPTError(
            f"pretrain-backbone: --appearance must be one of {', '.join(APPEARANCE)}, got {recipe.appearance!r}"
        )
    if recipe.test_per_class is not None and recipe.test_per_class >= recipe.per_class:
        raise IVPTError(
            f"pretrain-backbone: --test-per-class ({recipe.test_per_class}) must be below --per-class "
            f"({recipe.per_class}): some images of each class must be left for training"
        )
    for name in ("appearance_weight", "attribute_weight", "part_appearance_weight", "part_weight", "distill_weight"):
        value = getattr(recipe, name)
        if not math.isfinite(value) or value < 0:
            raise IVPTError(f"pretrain-backbone: --{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if recipe.family not in PRETRAIN_FAMILIES:
        raise IVPTError(
            f"pretrain-backbone: --family must be one of {', '.join(PRETRAIN_FAMILIES)}, got {recipe.family!r}"
        )
    if recipe.family == "generic" and recipe.attribute_weight > 0:
        raise IVPTError(
            "pretrain-backbone: the 'generic' family has no classes; set --attribute-weight 0 "
            f"(got {recipe.attribute_weight})"
        )
    if recipe.compute is not None and not (math.isfinite(recipe.compute) and recipe.compute > 0):
        raise IVPTError(f"pretrain-backbone: --compute must be a positive number, got {recipe.compute}")
    if recipe.snapshots and recipe.compute is None:
        raise IVPTError("pretrain-backbone: --snapshots needs --compute (the run's own length)")
    for snapshot in recipe.snapshots:
        if not 0 < snapshot < (recipe.compute or 0):
            raise IVPTError(
                f"pretrain-backbone: every --snapshots value must lie between 0 and --compute ({recipe.compute}), "
                f"got {snapshot}"
            )
    if not any(value > 0 for value in loss_weights(recipe).values()):
        raise IVPTError("pretrain-backbone: every loss weight is 0; nothing would be trained")
    if recipe.lr <= 0:
        raise IVPTError(f"pretrain-backbone: --lr must be positive, got {recipe.lr}")
    if recipe.token_stride not in TOKEN_STRIDES:
        raise IVPTError(
            f"pretrain-backbone: --token-stride must be one of {', '.join(map(str, TOKEN_STRIDES))}, "
            f"got {recipe.token_stride}"
        )
    if "token_stride" in (arch_args or {}):
        raise IVPTError("pretrain-backbone: set the token stride in the recipe (--token-stride), not in arch_args")
    prepare_output_dir(out.parent)  # before the minutes of training
    target_device = resolve_device(device, setting="pretrain-backbone --device")
    started = time.perf_counter()
    if progress:
        print(
            f"pretrain-backbone: drawing the synthetic '{recipe.family}' family, {recipe.num_classes} classes x "
            f"{recipe.per_class} images ({workers} worker(s))",
            flush=True,
        )
    data = _pretraining_images(recipe, None if data_dir is None else Path(data_dir), workers)
    train_set = _DeviceImages(data, np.flatnonzero(data.is_train), target_device)
    test_set = _DeviceImages(data, np.flatnonzero(~data.is_train), target_device)
    steps_per_epoch = len(train_set) // recipe.batch_size
    if steps_per_epoch < 1:
        raise IVPTError(
            f"pretrain-backbone: {len(train_set)} training images are fewer than one batch of {recipe.batch_size}"
        )

    seed_everything(recipe.seed)
    arch_args = {**(arch_args or {}), "token_stride": recipe.token_stride}
    backbone = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0, **arch_args)
    targets, sizes = attribute_targets(recipe.family, recipe.num_classes)
    distill = recipe.distill_weight > 0
    model = _PretrainModel(backbone, sizes, int(data.part_ids.max()), recipe.appearance, distill).to(target_device)
    targets = targets.to(target_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=WEIGHT_DECAY)
    total_steps = training_steps(recipe, steps_per_epoch)
    snapshot_steps = {
        compute: training_steps(dataclasses.replace(recipe, compute=compute), steps_per_epoch)
        for compute in sorted(recipe.snapshots)
    }
    # The warm-up takes the share of the run it takes in the 12-epoch recipe (one epoch): of the smallest
    # snapshot's run when there are snapshots (every branch then warms up alike), of the run when --compute
    # sets its length, and one epoch otherwise.
    if snapshot_steps:
        warmup_steps = round(min(snapshot_steps.values()) * WARMUP_EPOCHS / 12)
    elif recipe.compute:
        warmup_steps = round(total_steps * WARMUP_EPOCHS / 12)
    else:
        warmup_steps = round(WARMUP_EPOCHS * steps_per_epoch)
    # Without snapshots: one cosine decay after the warm-up. With them (warm-up, stable, decay): a constant
    # rate, each snapshot a branch that decays over the last DECAY_SHARE of its own length, as does the run.
    decay_start = round((1 - DECAY_SHARE) * total_steps) if snapshot_steps else warmup_steps
    use_bf16 = target_device.type == "cuda"
    weights = loss_weights(recipe)
    # A switched-off term is not computed at all.
    names = [name for name, weight in weights.items() if weight > 0]
    descriptor_scale = None
    if "part_appearance" in names:
        descriptor_scale = descriptor_statistics(train_set, model.num_parts)
    orders: dict[int, tuple[Tensor, Tensor]] = {}
    training_started = time.perf_counter()

    def run(net: _PretrainModel, opt: torch.optim.Optimizer, first: int, last: int, decay_from: int, label: str) -> int:
        """Optimizer steps ``first..last - 1`` of ``net``, the rate decaying from step ``decay_from`` to ``last``;
        returns the steps done (fewer when --max-minutes passes)."""
        net.train()
        sums = torch.zeros(len(names), device=target_device)
        counted, done = 0, first
        for step in tqdm(range(first, last), desc=f"pretrain {label}", disable=not progress, leave=False):
            epoch, position = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders.clear()
                orders[epoch] = epoch_order(len(train_set), recipe.seed, epoch)
            order, flips = orders[epoch]
            rows = slice(position * recipe.batch_size, (position + 1) * recipe.batch_size)
            batch = train_set.batch(order[rows], flips[rows])
            generator = None
            if distill:
                generator = torch.Generator().manual_seed(sample_seed(recipe.seed, epoch, position))
            for group in opt.param_groups:
                group["lr"] = recipe.lr * _rate_multiplier(step, last, warmup_steps, decay_from)
            with torch.autocast(target_device.type, dtype=torch.bfloat16, enabled=use_bf16):
                terms = _losses(net, batch, targets, names, descriptor_scale, generator)
            opt.zero_grad(set_to_none=True)
            sum(weights[name] * value for name, value in terms.items()).backward()
            nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            opt.step()
            done = step + 1
            if net.distillation is not None:
                net.distillation.update_teacher(net.backbone, done / total_steps)
            sums += torch.stack([value.detach() for value in terms.values()])
            counted += 1
            if position == steps_per_epoch - 1 or done == last:
                if progress:
                    means = " ".join(f"{n} {v:.3f}" for n, v in zip(names, (sums / counted).tolist(), strict=True))
                    rate = (done - first) * recipe.batch_size / (time.perf_counter() - training_started)
                    print(f"pretrain-backbone: {label} step {done}/{last} {means} ({rate:.0f} img/s)", flush=True)
                sums.zero_()
                counted = 0
                out_of_time = max_minutes is not None and time.perf_counter() - training_started > 60.0 * max_minutes
                if out_of_time and done < last:
                    if progress:
                        print(f"pretrain-backbone: --max-minutes {max_minutes} passed after step {done}; saving")
                    break
        return done

    def finish(net: _PretrainModel, path: Path, steps_done: int) -> None:
        """Score ``net`` and write its backbone to ``path``."""
        accuracy = None
        if sizes:  # a family without classes has no pretraining task to score
            accuracy = _test_accuracy(net, test_set, targets, batch_size=max(recipe.batch_size, 256))
        diagnostics: dict[str, Any] = {}
        if diagnose:
            demo_images = render_synthetic(
                num_classes=_DIAGNOSTIC_CLASSES,
                per_class=_DIAGNOSTIC_PER_CLASS,
                size=int(DEMO_VIT_ARGS["img_size"]),
                seed=recipe.seed + _DIAGNOSTIC_SEED_OFFSET,
            )
            diagnostics = feature_diagnostics(net.backbone, demo_images, device=target_device)
        record: dict[str, Any] = dict(
            asdict(recipe),
            epochs_completed=steps_done // steps_per_epoch,
            train_images=len(train_set),
            test_images=len(test_set),
            test_accuracy=None if accuracy is None else round(accuracy, 2),
            steps=steps_done,
            compute=round(compute_multiple(recipe, steps_done), 3),
            diagnostics=diagnostics,
            device=torch.cuda.get_device_name(target_device) if use_bf16 else "cpu",
            precision="bf16" if use_bf16 else "fp32",
            minutes=round((time.perf_counter() - started) / 60.0, 1),
            threads=torch.get_num_threads(),
            command=_command(out, recipe),
        )
        _save_backbone(copy.deepcopy(net.backbone).cpu(), path, record, arch_args)
        if progress:
            if accuracy is not None:
                print(f"pretrain-backbone: held-out attribute accuracy {accuracy:.2f}% on {len(test_set)} images")
            if diagnostics:
                print(f"pretrain-backbone: {path.name}: demo-family diagnostics {json.dumps(diagnostics)}")

    done = 0
    for compute, branch_end in snapshot_steps.items():
        branch_start = round((1 - DECAY_SHARE) * branch_end)
        done = run(model, optimizer, done, branch_start, decay_start, "trunk")
        if done < branch_start:
            break
        branch = copy.deepcopy(model)
        branch_optimizer = torch.optim.AdamW(branch.parameters(), lr=recipe.lr, weight_decay=WEIGHT_DECAY)
        branch_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        branch_done = run(branch, branch_optimizer, branch_start, branch_end, branch_start, f"snapshot {compute:g}x")
        finish(branch, snapshot_path(out, compute), branch_done)
        del branch, branch_optimizer
    done = run(model, optimizer, done, total_steps, decay_start, "run")
    finish(model, out, done)
    return out


def snapshot_path(out: Path, compute: float) -> Path:
    """Where :func:`pretrain_backbone` writes the snapshot at ``compute`` of a run writing ``out``."""
    return out.with_name(f"{out.stem}_c{compute:g}{out.suffix}")


def _rate_multiplier(step: int, last: int, warmup_steps: int, decay_from: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) over the peak: a linear warm-up over
    ``warmup_steps``, then constant until ``decay_from``, then half a cosine to 0 at ``last``. With
    ``decay_from == warmup_steps`` this is :class:`ivpt.engine.schedule.StepSchedule`'s cosine."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    progress = min(1.0, max(0.0, (step - decay_from) / max(1, last - decay_from)))
    return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


def _save_backbone(backbone: nn.Module, out: Path, recipe: dict[str, Any], arch_args: dict[str, Any]) -> None:
    """Write the backbone (no classifier) atomically as a 0644 file, with ``recipe`` as JSON in its metadata."""
    tensors = {name: value.detach().contiguous() for name, value in backbone.state_dict().items()}
    tensors = {name: value for name, value in tensors.items() if not name.startswith("head.")}
    metadata = {
        "arch": DEMO_ARCH,
        "arch_args": json.dumps({**DEMO_VIT_ARGS, **arch_args, "stem_channels": list(STEM_CHANNELS)}),
        "recipe": json.dumps(recipe),
    }
    # A shipped package file: readable by everyone, whatever the umask of the machine that trained it.
    write_atomically(out, lambda file: file.write(safetensors_bytes(tensors, metadata=metadata)), mode=0o644)


def weight_file_recipe(path: str | Path) -> dict[str, Any]:
    """The pretraining recipe stored in a weight file written by :func:`pretrain_backbone`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "recipe" not in metadata:
        raise IVPTError(f"weight file '{path}' has no pretraining recipe in its metadata")
    return json.loads(metadata["recipe"])


__all__ = [
    "PretrainRecipe",
    "appearance_targets",
    "attribute_probes",
    "feature_diagnostics",
    "loss_weights",
    "part_centroid_nmi",
    "part_cluster_nmi",
    "part_pooled_features",
    "part_shares",
    "pretrain_backbone",
    "probe_accuracy",
    "token_stride",
    "weight_file_recipe",
]
