"""Shared machinery of the metric accumulators: the error type, input checks and the two meter kinds.

Every accumulator keeps only small per-batch summaries. Its whole state is a list of tensors
(:meth:`Meter.state_tensors`), so that ranks of a distributed run can exchange it and fold it together
with :meth:`Meter.merge` (see :func:`ivpt.metrics.sync_meter`). Two kinds exist:

- :class:`CountMeter`: the state is a fixed set of count / sum tensors; merging adds them.
- :class:`CollectMeter`: the state is a set of per-item rows (one per image or per keypoint); merging
  concatenates them. Rows are kept on the CPU, where they grow without taking accelerator memory.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

from ivpt.errors import IVPTError

MeterT = TypeVar("MeterT", bound="Meter")


class MetricError(IVPTError):
    """Metric inputs do not fit the metric (wrong shapes, labels out of range, nothing accumulated)."""


def image_size(input_size: int | Sequence[int], what: str = "input_size") -> tuple[int, int]:
    """Normalise an image size given as ``S`` or ``(H, W)`` to ``(H, W)``."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        size = (input_size, input_size)
    elif isinstance(input_size, Sequence) and not isinstance(input_size, str) and len(input_size) == 2:
        size = (int(input_size[0]), int(input_size[1]))
    else:
        raise MetricError(f"{what}: expected an int or a pair (height, width), got {input_size!r}")
    if min(size) < 1:
        raise MetricError(f"{what}: expected positive sizes, got {input_size!r}")
    return size


def check_maps(maps: Tensor, name: str = "maps", channels: int | None = None) -> None:
    """Require finite ``(B, K, h, w)`` maps, with ``K == channels`` when given.

    A NaN or an infinity would not fail on its own: it wins every argmax and poisons every centroid, so
    a broken model would get a score. The caller (``ivpt eval``) adds which stage and batch it was.
    """
    if maps.dim() != 4:
        raise MetricError(f"{name}: expected a (B, K, h, w) tensor, got shape {tuple(maps.shape)}")
    if channels is not None and maps.shape[1] != channels:
        raise MetricError(f"{name}: expected {channels} channels, got shape {tuple(maps.shape)}")
    finite = maps.isfinite()
    if not bool(finite.all()):
        bad = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist()
        shown = ", ".join(str(i) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise MetricError(
            f"{name}: {int((~finite).sum())} NaN or infinite values, in image(s) {shown} of the batch "
            f"(shape {tuple(maps.shape)}); the model's maps must be finite"
        )


def check_keypoints(keypoints: Tensor, batch: int, num_keypoints: int | None = None) -> None:
    """Require ``(B, P, 3)`` keypoints (x, y, visible) for a batch of ``batch`` images."""
    if keypoints.dim() != 3 or keypoints.shape[0] != batch or keypoints.shape[2] != 3:
        raise MetricError(
            f"keypoints: expected a ({batch}, P, 3) tensor of (x, y, visible), got shape {tuple(keypoints.shape)}"
        )
    if num_keypoints is not None and keypoints.shape[1] != num_keypoints:
        raise MetricError(
            f"keypoints: expected {num_keypoints} keypoints per image, got shape {tuple(keypoints.shape)}"
        )


def check_labels(labels: Tensor, batch: int, num_classes: int) -> None:
    """Require ``(B,)`` integer labels in ``[0, num_classes)``."""
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise MetricError(f"labels: expected shape ({batch},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise MetricError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise MetricError(
            f"labels: expected class indices in [0, {num_classes - 1}], got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise MetricError(f"{name}: expected a positive value, got {value!r}")


class Meter:
    """Base of all accumulators: ``update(...)`` per batch, ``compute()`` at the end.

    Subclasses define ``reset()``, ``state_tensors()`` and ``load_state_tensors()``; ``merge`` and
    ``empty_like`` follow from those.
    """

    def reset(self) -> None:
        raise NotImplementedError

    def state_tensors(self) -> list[Tensor]:
        """The whole accumulated state as tensors (what ranks exchange)."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Replace the state by ``tensors`` as returned by :meth:`state_tensors` of a like meter."""
        raise NotImplementedError

    def merge(self: MeterT, other: MeterT) -> MeterT:
        """Fold ``other`` (a meter built with the same arguments) into this one; returns ``self``."""
        raise NotImplementedError

    def empty_like(self: MeterT) -> MeterT:
        """A new meter with the same settings and no data."""
        fresh = copy.copy(self)
        fresh.reset()
        return fresh

    def _check_like(self, other: Meter, tensors: Sequence[Tensor]) -> None:
        if type(other) is not type(self):
            raise MetricError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        own = self.state_tensors()
        if len(tensors) != len(own):
            raise MetricError(f"{type(self).__name__}: expected {len(own)} state tensors, got {len(tensors)}")


class CountMeter(Meter):
    """A meter whose state is a fixed set of count / sum tensors that merge by addition.

    Subclasses list the state attribute names in ``_state_names`` and create them in ``reset()``
    on ``self.device``.
    """

    _state_names: tuple[str, ...] = ()

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def state_tensors(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._state_names]

    def load_state_tensors(self, tensors: Sequence[Tensor]) -> None:
        self._check_like(self, tensors)
        for name, tensor in zip(self._state_names, tensors, strict=True):
            own = getattr(self, name)
            if tensor.shape != own.shape:
                raise MetricError(
                    f"{type(self).__name__}: state '{name}' has shape {tuple(own.shape)}, got {tuple(tensor.shape)}"
                )
            setattr(self, name, tensor.to(device=self.device, dtype=own.dtype).clone())

    def merge(self: MeterT, other: MeterT) -> MeterT:
        self._check_like(other, other.state_tensors())
        for name in self._state_names:
            own, theirs = getattr(self, name), getattr(other, name)
            if own.shape != theirs.shape:
                raise MetricError(
                    f"cannot merge {type(self).__name__}s with different settings: state '{name}' has "
                    f"shape {tuple(own.shape)} here and {tuple(theirs.shape)} there"
                )
            setattr(self, name, own + theirs.to(own.device))
        return self


class CollectMeter(Meter):
    """A meter whose state is a set of row tensors (one row per item) that merge by concatenation.

    Subclasses list the state names in ``_state_names`` and call :meth:`_append` with one tensor per
    name, all with the same number of rows. Rows are stored on the CPU.
    """

    _state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._chunks: dict[str, list[Tensor]] = {name: [] for name in self._state_names}

    def _append(self, *rows: Tensor) -> None:
        for name, tensor in zip(self._state_names, rows, strict=True):
            self._chunks[name].append(tensor.detach().cpu())

    @property
    def num_rows(self) -> int:
        return sum(chunk.shape[0] for chunk in self._chunks[self._state_names[0]])

    def state_tensors(self) -> list[Tensor]:
        tensors = []
        for name in self._state_names:
            chunks = self._chunks[name]
            # Concatenating also compacts the chunk list, so later calls are cheap.
            if len(chunks) > 1:
                self._chunks[name] = [torch.cat(chunks)]
            tensors.append(self._chunks[name][0] if self._chunks[name] else self._empty_state(name))
        return tensors

    def _empty_state(self, name: str) -> Tensor:
        """A zero-row tensor with the row shape and dtype of state ``name``."""
        raise NotImplementedError

    def _check_rows(self, tensors: Sequence[Tensor]) -> None:
        if len({tensor.shape[0] for tensor in tensors}) > 1:
            counts = ", ".join(str(tensor.shape[0]) for tensor in tensors)
            raise MetricError(f"{type(self).__name__}: state tensors must have equal row counts, got {counts}")
        for name, tensor in zip(self._state_names, tensors, strict=True):
            own = self._empty_state(name)
            if tensor.shape[1:] != own.shape[1:]:
                raise MetricError(
                    f"{type(self).__name__}: rows of '{name}' have shape {tuple(own.shape[1:])} here, "
                    f"got {tuple(tensor.shape[1:])}"
                )

    def load_state_tensors(self, tensors: Sequence[Tensor]) -> None:
        self._check_like(self, tensors)
        self._check_rows(tensors)
        self.reset()
        self._append(*tensors)

    def merge(self: MeterT, other: MeterT) -> MeterT:
        theirs = other.state_tensors()
        self._check_like(other, theirs)
        self._check_rows(theirs)
        for name, tensor in zip(self._state_names, theirs, strict=True):
            self._chunks[name].append(tensor.cpu())
        return self
