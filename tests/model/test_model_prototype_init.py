"""Prototypes initialised from the data: each step on tokens whose right answer is known."""

from __future__ import annotations

import pytest
import torch

from ivpt.errors import IVPTError
from ivpt.model.prototype_init import (
    border_and_centre,
    initialise_prototypes,
    kmeans,
    stage_prototypes,
    two_means,
)


def test_border_and_centre_of_a_6x8_grid() -> None:
    border, centre = border_and_centre((6, 8), torch.device("cpu"))
    assert int(border.sum()) == 2 * 8 + 2 * 4  # two full rows, two columns without their corners
    grid = centre.reshape(6, 8)
    # Half of each side, in the middle: rows 1..4, columns 2..5.
    assert int(centre.sum()) == 4 * 4
    assert grid[1:5, 2:6].all() and not grid[0].any() and not grid[:, :2].any()
    assert not (border & centre).any()


def test_two_means_splits_two_blobs_and_keeps_the_first_seeds_side() -> None:
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(50, 3, generator=generator) * 0.1 + torch.tensor([5.0, 0.0, 0.0])
    right = torch.randn(30, 3, generator=generator) * 0.1 - torch.tensor([5.0, 0.0, 0.0])
    points = torch.cat([left, right])
    # Seeds far off, each nearer one blob: Lloyd's steps must still find the blobs.
    on_first = two_means(points, torch.tensor([1.0, 3.0, 0.0]), torch.tensor([-1.0, -3.0, 0.0]))
    assert on_first[:50].all() and not on_first[50:].any()


def test_kmeans_finds_well_separated_centres() -> None:
    generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.2 * torch.randn(40, 2, generator=generator) for c in centres])
    found = kmeans(points, 4, torch.Generator().manual_seed(0))
    # Every true centre has exactly one centroid within 0.2 of it.
    distances = torch.cdist(centres, found)
    assert (distances.min(dim=1).values < 0.2).all()
    assert sorted(distances.argmin(dim=1).tolist()) == [0, 1, 2, 3]


def _scene(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens of an 8 x 8 grid: background ``a`` everywhere, an object in the middle whose top half is ``b``
    and bottom half ``c`` (D = 4, small noise)."""
    a, b, c = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 4.0, 0, 0]), torch.tensor([0, 0, 4.0, 0])
    grid = a.repeat(8, 8, 1)
    grid[2:4, 2:6] = b
    grid[4:6, 2:6] = c
    noise = 0.01 * torch.randn(batch, 64, 4, generator=torch.Generator().manual_seed(2))
    return grid.reshape(1, 64, 4) + noise, a, b, c


def test_stage_prototypes_put_the_background_last_and_the_objects_parts_first() -> None:
    features, a, b, c = _scene()
    prototypes = stage_prototypes(features, (8, 8), 3, torch.Generator().manual_seed(0))
    assert prototypes.shape == (3, 4)
    assert torch.allclose(prototypes[-1], a, atol=0.02)
    foreground = sorted(prototypes[:2].tolist(), key=lambda v: -v[1])
    assert torch.allclose(torch.tensor(foreground), torch.stack([b, c]), atol=0.02)


def test_stage_prototypes_refuse_more_foreground_prototypes_than_object_tokens() -> None:
    features = torch.ones(1, 64, 4)
    features[0, 27] = 5.0  # one token unlike the border
    with pytest.raises(IVPTError, match="only 1 tokens look unlike the image border.*3 foreground prototypes"):
        stage_prototypes(features, (8, 8), 4, torch.Generator().manual_seed(0))


def test_initialise_prototypes_on_a_model_maps_border_to_background_and_is_seeded(make_model) -> None:
    model = make_model(n_pro=(6, 5, 4))
    # Images with a plain border and a bright square in the middle.
    images = torch.full((6, 3, 32, 32), -1.0)
    images[:, :, 10:22, 10:22] = 2.0
    images += 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    before = [stage.prototypes.detach().clone() for stage in model.stages]
    model.train()
    initialise_prototypes(model, images, seed=5, batch_size=4)
    assert model.training  # the mode is restored
    border, _ = border_and_centre(model.grid_size, torch.device("cpu"))
    with torch.no_grad():
        output = model(images)
    for stage, (maps, old) in enumerate(zip(output.concept_maps, before, strict=True)):
        assert not torch.equal(model.stages[stage].prototypes, old)
        winner = maps.argmax(dim=1).flatten(1)  # (B, n)
        background = maps.shape[1] - 1
        assert (winner[:, border] == background).float().mean() > 0.9, f"stage {stage}"
    again = make_model(n_pro=(6, 5, 4))
    initialise_prototypes(again, images, seed=5, batch_size=6)
    for first, second in zip(model.stages, again.stages, strict=True):
        torch.testing.assert_close(first.prototypes, second.prototypes)


def test_initialise_prototypes_refuses_a_model_without_stages(make_model) -> None:
    model = make_model(method="vpt_deep")
    with pytest.raises(IVPTError, match="needs IVPT.s prototype stages"):
        initialise_prototypes(model, torch.zeros(1, 3, 32, 32))
