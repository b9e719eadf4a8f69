"""Combining the meters of the ranks of a distributed run."""

from __future__ import annotations

import torch.distributed as dist

from ivpt.metrics._base import MeterT


def sync_meter(meter: MeterT) -> MeterT:
    """Return a meter holding the data of every rank (the same on all ranks); ``meter`` is unchanged.

    Every rank must call this with a like meter (same class and settings). The states travel as CPU
    tensors through ``all_gather_object`` and are merged in rank order, so list-like states come out in
    the same order everywhere. Without an initialised process group (or with one rank) it returns a
    copy of ``meter``'s data unchanged.
    """
    synced = meter.empty_like()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return synced.merge(meter)
    local_state = [tensor.detach().cpu() for tensor in meter.state_tensors()]
    gathered: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local_state)
    for rank_state in gathered:
        part = meter.empty_like()
        part.load_state_tensors(rank_state)
        synced.merge(part)
    return synced
