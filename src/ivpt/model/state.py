"""Comparing a stored state dict with the one a model expects."""

from __future__ import annotations

from collections.abc import Mapping


def _name_and_shape(name: str, shape: tuple[int, ...]) -> str:
    return f"{name} {tuple(shape)}"


def _listing(items: list[str], limit: int | None) -> str:
    if limit is None or len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def state_mismatches(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], limit: int | None = None
) -> list[str]:
    """Describe how ``found`` (key -> shape, from a file) differs from ``expected`` (from the model).

    Returns one string per kind of problem (missing keys, unexpected keys, shape mismatches), each
    naming the keys with their shapes (at most ``limit`` per kind); an empty list when they agree.
    """
    missing = [_name_and_shape(k, s) for k, s in expected.items() if k not in found]
    unexpected = [_name_and_shape(k, s) for k, s in found.items() if k not in expected]
    mismatched = [
        f"{k} file {tuple(found[k])} vs model {tuple(s)}"
        for k, s in expected.items()
        if k in found and tuple(found[k]) != tuple(s)
    ]
    kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    return [f"{label}: {_listing(items, limit)}" for label, items in kinds if items]
