"""Prototypes initialised from the data (``train.prototype_init=data``) instead of N(0, 0.05^2).

The paper draws every prototype near the origin, equally far from every token. Which prototype then ends up
on the object, and which on the background, is decided in the first steps and by chance: on a small backbone
the outcome of a run changes with its seed (docs/demo.md). The data initialisation starts each stage from the
tokens themselves, with no label and no annotation, using the same prior the background-presence loss
already encodes (the background reaches the image border):

1. the stage's tokens of a few training images are split in two by 2-means, seeded with the mean token of the
   grid's border and the mean token of its central quarter; the border side's centroid is the background
   prototype;
2. the other side's tokens are clustered by k-means into the stage's foreground prototypes.

Stages are initialised shallow to deep, each on the tokens its prompts will actually see (a stage's
prompts change the tokens of the blocks after it).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ivpt.errors import IVPTError

# Tokens clustered per stage at most (a random subset of them beyond that): k-means on more adds little.
MAX_TOKENS = 65536
KMEANS_ITERATIONS = 30


def border_and_centre(grid_size: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(n,)`` bool masks of a ``(h, w)`` grid's outermost ring and of its central quarter (half of each side)."""
    h, w = grid_size
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
    centre = (rows >= h // 4) & (rows < h - h // 4) & (cols >= w // 4) & (cols < w - w // 4)
    return border.flatten(), centre.flatten()


def two_means(points: Tensor, first: Tensor, second: Tensor, iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """Split ``points (N, D)`` by 2-means from the seeds ``first`` and ``second`` ``(D,)``.

    Returns:
        ``(N,)`` bool: the points on the ``first`` seed's side.
    """
    centroids = torch.stack([first, second])
    on_first = torch.ones(len(points), dtype=torch.bool, device=points.device)
    for _ in range(iterations):
        on_first = torch.cdist(points, centroids).argmin(dim=1) == 0
        if on_first.all() or not on_first.any():
            break
        centroids = torch.stack([points[on_first].mean(dim=0), points[~on_first].mean(dim=0)])
    return on_first


def kmeans(points: Tensor, k: int, generator: torch.Generator, iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """Lloyd's k-means with k-means++ seeding.

    Args:
        points: ``(N, D)``, ``N >= k``.
        k: clusters.
        generator: draws the seeding (CPU generator).

    Returns:
        ``(k, D)`` centroids; a cluster that loses every point keeps its last centroid.
    """
    first = int(torch.randint(len(points), (1,), generator=generator))
    centroids = [points[first]]
    nearest = (points - points[first]).pow(2).sum(dim=1)
    for _ in range(1, k):
        weights = nearest.clamp_min(0).cpu().double()
        index = int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0 else 0
        centroids.append(points[index])
        nearest = torch.minimum(nearest, (points - points[index]).pow(2).sum(dim=1))
    centres = torch.stack(centroids)
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        counts = torch.bincount(assignment, minlength=k).to(points.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


def stage_prototypes(
    features: Tensor, grid_size: tuple[int, int], num_prototypes: int, generator: torch.Generator
) -> Tensor:
    """Data-initialised prototypes of one stage from its tokens.

    Args:
        features: ``(B, n, D)`` the stage's normalised patch tokens, ``n = h * w``.
        grid_size: ``(h, w)``.
        num_prototypes: K, background included (last).
        generator: draws the token subset and the k-means seeding.

    Returns:
        ``(K, D)``: K-1 k-means centroids of the object side, then the background side's centroid.

    Raises:
        IVPTError: too few tokens on the object side for K-1 clusters.
    """
    dim = features.shape[-1]
    border, centre = border_and_centre(grid_size, features.device)
    points = features.reshape(-1, dim).float()
    if len(points) > MAX_TOKENS:
        points = points[torch.randperm(len(points), generator=generator)[:MAX_TOKENS].to(points.device)]
    border_mean = features[:, border].reshape(-1, dim).float().mean(dim=0)
    centre_mean = features[:, centre].reshape(-1, dim).float().mean(dim=0)
    background = two_means(points, border_mean, centre_mean)
    objects = points[~background]
    if len(objects) < num_prototypes - 1:
        raise IVPTError(
            f"train.prototype_init=data: only {len(objects)} tokens look unlike the image border, fewer than the "
            f"{num_prototypes - 1} foreground prototypes of a stage; use more images (train.prototype_init_images) "
            "or train.prototype_init=random"
        )
    foreground = kmeans(objects, num_prototypes - 1, generator)
    background_centre = points[background].mean(dim=0) if background.any() else border_mean
    return torch.cat([foreground, background_centre[None]])


class _StageReached(Exception):
    """Raised by the capturing hook to end a forward pass at the stage being initialised."""


@torch.no_grad()
def initialise_prototypes(model: nn.Module, images: Tensor, seed: int = 0, batch_size: int = 64) -> None:
    """Set every stage's prototypes of an IVPT ``model`` from ``images`` (see the module docstring).

    Args:
        model: an :class:`ivpt.model.ivpt.IVPT` (or ``last_layer_proto``: its one stage).
        images: ``(B, 3, H, W)`` normalised training images (a few dozen to a few hundred), on the model's device.
        seed: seed of the token subset and the k-means seeding.
        batch_size: images per forward pass.

    Raises:
        IVPTError: ``model`` has no prototype stages, or the images show too few tokens unlike their border.
    """
    stages = getattr(model, "stages", None)
    if stages is None:
        raise IVPTError(
            f"config key 'train.prototype_init': 'data' needs IVPT's prototype stages; "
            f"{type(model).__name__} has none (use 'random')"
        )
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    captured: list[Tensor] = []

    def capture(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0])
        raise _StageReached  # the blocks after this stage cannot change its input: stop the pass here

    try:
        for stage in stages:
            captured.clear()
            handle = stage.register_forward_pre_hook(capture)
            try:
                for chunk in images.split(batch_size):
                    with contextlib.suppress(_StageReached):
                        model(chunk)
            finally:
                handle.remove()
            features = torch.cat(captured)
            stage.prototypes.copy_(
                stage_prototypes(features, stage.grid_size, stage.num_prototypes, generator).to(stage.prototypes)
            )
    finally:
        model.train(was_training)


__all__ = ["border_and_centre", "initialise_prototypes", "kmeans", "stage_prototypes", "two_means"]
