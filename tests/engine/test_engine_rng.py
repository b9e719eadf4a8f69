"""Random state capture/restore, the per-epoch sampler and per-sample augmentation seeds."""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ivpt.engine.rng import (
    EpochSampler,
    SeededSamples,
    capture_rng_state,
    restore_rng_state,
    sample_seed,
    seed_everything,
)


def draws(generator: torch.Generator) -> tuple:
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),  # exercises numpy's cached Gaussian
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        torch.rand(2, generator=generator).tolist(),
    )


def test_rng_state_round_trips_through_a_weights_only_file() -> None:
    seed_everything(5)
    generator = torch.Generator().manual_seed(9)
    draws(generator)
    np.random.randn(1)  # leave a cached Gaussian behind
    state = capture_rng_state(generator)
    expected = draws(generator)
    buffer = io.BytesIO()
    torch.save({"rng": [state]}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"][0]
    seed_everything(123)
    other = torch.Generator().manual_seed(0)
    restore_rng_state(loaded, other)
    assert draws(other) == expected


def test_epoch_sampler_shares_one_permutation_among_ranks() -> None:
    size, world = 10, 3
    shares = []
    for rank in range(world):
        sampler = EpochSampler(size, seed=7, rank=rank, world_size=world)
        sampler.set_epoch(2)
        shares.append([index for index, epoch in sampler])
        assert all(epoch == 2 for _, epoch in sampler)
        assert len(sampler) == 4
    interleaved = [shares[r][i] for i in range(4) for r in range(world)]
    assert sorted(set(interleaved)) == list(range(size))
    assert interleaved[size:] == interleaved[: 12 - size]  # the padding wraps around
    single = EpochSampler(size, seed=7)
    single.set_epoch(2)
    assert [i for i, _ in single] == interleaved[:size]


def test_epoch_sampler_orders_differ_between_epochs_and_skip_resumes() -> None:
    sampler = EpochSampler(20, seed=0)
    sampler.set_epoch(0)
    first = [i for i, _ in sampler]
    sampler.set_epoch(1)
    second = [i for i, _ in sampler]
    assert first != second and sorted(first) == sorted(second) == list(range(20))
    sampler.set_epoch(1, skip=6)
    assert [i for i, _ in sampler] == second[6:]
    assert len(sampler) == 14
    ordered = EpochSampler(5, seed=0, shuffle=False)
    assert [i for i, _ in ordered] == [0, 1, 2, 3, 4]


class NoisySamples(Dataset):
    """Each sample draws from all three global generators, like an augmentation pipeline."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([torch.rand(()).item(), np.random.rand(), random.random(), float(index)])


def test_seeded_samples_depend_only_on_seed_epoch_and_index() -> None:
    data = SeededSamples(NoisySamples(), seed=1)
    seed_everything(0)
    a = data[(3, 0)]
    before = torch.get_rng_state()
    python_before = random.getstate()
    b = data[(3, 0)]
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before) and random.getstate() == python_before
    assert not torch.equal(data[(3, 1)], a)
    assert not torch.equal(data[(4, 0)][:3], a[:3])
    assert sample_seed(1, 0, 3) != sample_seed(1, 0, 4) != sample_seed(2, 0, 4)


def test_seeded_samples_are_identical_in_worker_processes() -> None:
    data = SeededSamples(NoisySamples(), seed=4)
    sampler = EpochSampler(6, seed=4)
    sampler.set_epoch(1)
    in_process = torch.cat(list(DataLoader(data, batch_size=2, sampler=sampler)))
    with_workers = torch.cat(list(DataLoader(data, batch_size=2, sampler=sampler, num_workers=2)))
    assert torch.equal(in_process, with_workers)
