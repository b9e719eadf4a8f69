"""sync_meter: meters of several ranks combine into the meter of the whole data."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ivpt.metrics import AccuracyMeter, ConsistencyMeter, PartDiscoveryMeter, sync_meter

IMAGES = 10


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(IMAGES, 4, 4, 4, generator=generator)
    keypoints = torch.cat([torch.rand(IMAGES, 3, 2, generator=generator) * 31, torch.ones(IMAGES, 3, 1)], dim=-1)
    labels = torch.randint(0, 3, (IMAGES,), generator=generator)
    logits = torch.randn(IMAGES, 3, generator=generator)
    return maps, keypoints, labels, logits


def _fill(rows: slice) -> tuple[AccuracyMeter, ConsistencyMeter, PartDiscoveryMeter]:
    maps, keypoints, labels, logits = _data()
    accuracy = AccuracyMeter(3)
    consistency = ConsistencyMeter(3, 3, 3, map_size=32, box_half_size=8)
    parts = PartDiscoveryMeter()
    accuracy.update(logits[rows], labels[rows])
    consistency.update(maps[rows], keypoints[rows], labels[rows], 32)
    parts.update(maps[rows], keypoints[rows], 32)
    return accuracy, consistency, parts


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # Uneven shards, as a distributed sampler without padding would give.
        rows = slice(0, 6) if rank == 0 else slice(6, IMAGES)
        synced = [sync_meter(meter) for meter in _fill(rows)]
        torch.save([meter.state_tensors() for meter in synced], Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sync_without_process_group_returns_an_equal_copy() -> None:
    for meter in _fill(slice(0, IMAGES)):
        synced = sync_meter(meter)
        assert synced is not meter
        assert synced.compute() == meter.compute()


def test_sync_merges_the_gathered_states_in_rank_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # This process plays rank 1 of 2 with the last four images; rank 0 holds the first six.
    own, rank0, expected = _fill(slice(6, IMAGES)), _fill(slice(0, 6)), _fill(slice(0, IMAGES))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for meter, rank0_meter, expected_meter in zip(own, rank0, expected, strict=True):

        def all_gather_object(gathered: list, local_state: list, rank0_meter=rank0_meter) -> None:
            gathered[:] = [rank0_meter.state_tensors(), local_state]

        monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
        synced = sync_meter(meter)
        for tensor, expected_tensor in zip(synced.state_tensors(), expected_meter.state_tensors(), strict=True):
            assert torch.equal(tensor, expected_tensor)
        assert synced.compute() == expected_meter.compute()


@pytest.mark.slow
def test_two_ranks_sync_to_the_single_process_result(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = [meter.state_tensors() for meter in _fill(slice(0, IMAGES))]
    for rank in range(2):
        states = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for meter_state, expected_state in zip(states, expected, strict=True):
            for tensor, expected_tensor in zip(meter_state, expected_state, strict=True):
                assert torch.equal(tensor, expected_tensor)
