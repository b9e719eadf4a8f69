"""Random state: seeding, saving it in checkpoints, and per-sample augmentation seeds.

Exact resumption needs every random stream that shapes training to be restored:

- the global torch CPU/CUDA generators (Gumbel noise in the model, anything else drawn on the fly),
- NumPy's and Python's global generators,
- the dedicated generator that draws the equivariance affine,
- data augmentation. Augmentations run in worker processes whose seeds depend on when the loader
  started, which a mid-epoch resume cannot replay; :class:`SeededSamples` instead seeds every sample
  from ``(seed, epoch, index)``, so a sample's augmentation is the same whatever the worker count and
  wherever the epoch was resumed.

States are stored as tensors, lists and numbers so that ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

# Mixes (seed, epoch, index) into one 63-bit seed; odd 64-bit constants from splitmix64.
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MASK63 = (1 << 63) - 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every GPU) global generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed seed for sample ``index`` in ``epoch`` of a run seeded with ``seed``."""
    value = 0
    for part, multiplier in zip((seed, epoch, index), _MIX, strict=True):
        value = ((value ^ (part & _MASK63)) * multiplier) & _MASK63
        value ^= value >> 31
    return value


def worker_init_fn(worker_id: int) -> None:
    """Give NumPy and Python in a loader worker seeds derived from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % (1 << 32)
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class SeededSamples(Dataset):
    """Wraps a data set so that sample ``(index, epoch)`` is drawn under its own fixed seed.

    Index it with the ``(index, epoch)`` pairs :class:`EpochSampler` yields. The caller's random state
    is restored afterwards, so loading in the main process (``num_workers=0``) leaves the training
    random streams untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        if get_worker_info() is not None:
            # A loader worker's random state belongs to nobody else: no need to save and restore it
            # (restoring NumPy's alone costs ~0.2 ms a sample).
            return self.draw(index, epoch)
        torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            return self.draw(index, epoch)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def draw(self, index: int, epoch: int) -> Any:
        """Sample ``index`` of ``epoch``, leaving the CPU generators seeded for it (what a worker does)."""
        seed = sample_seed(self.seed, epoch, index)
        # torch's CPU generator only: torch.manual_seed would also reseed every CUDA device's generator
        # (the training's own stream when samples load in the main process) and costs ~0.4 ms a call.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        return self.dataset[index]


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's share of a seeded per-epoch shuffle, optionally resuming part-way through.

    Every epoch is one permutation of the data set drawn from ``seed + epoch`` (identical on all
    ranks); it is padded by wrapping around to a multiple of ``world_size`` and dealt out round-robin,
    rank ``r`` taking positions ``r, r + world_size, ...``. Yields ``(index, epoch)`` pairs for
    :class:`SeededSamples`.

    Args:
        size: number of samples in the data set.
        seed: the run's seed (the same on every rank).
        rank, world_size: this process's place in the job.
        shuffle: permute (training) or keep the data set order.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and how many of this rank's first samples to leave out (a resumed epoch)."""
        self.epoch = epoch
        self.skip = skip

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded = -(-self.size // self.world_size) * self.world_size
        order += order[: padded - self.size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._rank_indices()[self.skip :]:
            yield index, self.epoch

    def __len__(self) -> int:
        return max(0, -(-self.size // self.world_size) - self.skip)


def capture_rng_state(affine_generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's random state, in a form ``torch.load(weights_only=True)`` accepts."""
    _, mt_keys, mt_pos, has_gauss, cached_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(mt_keys, dtype=np.int64)),
            "pos": int(mt_pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gauss),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "affine": affine_generator.get_state() if affine_generator is not None else None,
    }
    return state


def restore_rng_state(state: dict[str, Any], affine_generator: torch.Generator | None = None) -> None:
    """Undo :func:`capture_rng_state`: set every stream back to the stored state."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if affine_generator is not None and state["affine"] is not None:
        affine_generator.set_state(state["affine"])


__all__ = [
    "EpochSampler",
    "SeededSamples",
    "capture_rng_state",
    "restore_rng_state",
    "sample_seed",
    "seed_everything",
    "worker_init_fn",
]
