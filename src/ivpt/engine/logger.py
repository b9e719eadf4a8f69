"""The run's records: ``log.jsonl`` (one JSON object per line) and optional TensorBoard scalars.

Only rank 0 writes; on other ranks a :class:`RunLogger` is inert. Every record carries an ``event``
(``"start"``, ``"train"``, ``"val"``, ``"note"``, ``"checkpoint"``, ``"interrupt"``, ``"test"``, ``"end"``) and the
global optimizer ``step``; nested dicts (loss terms, learning rates) become ``a/b`` TensorBoard tags.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ivpt.errors import ConfigError
from ivpt.outputs import naming, write_text


class RunLogger:
    """Appends records to ``out_dir/log.jsonl`` (and TensorBoard when asked).

    Args:
        out_dir: the run folder.
        enabled: whether this process writes (rank 0).
        tensorboard: also write TensorBoard event files to ``out_dir/tensorboard``.

    Raises:
        ConfigError: TensorBoard is asked for but the ``tensorboard`` package is not installed.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "log.jsonl"
        self._writer: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "config key 'train.tensorboard': the tensorboard package is not installed "
                    "(pip install 'ivpt[tensorboard]'), or set train.tensorboard=false"
                ) from None
            self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def rewind(self, step: int | None) -> None:
        """Drop the records a resumed run will write again: those after ``step`` (all when ``None``).

        A run killed after its last checkpoint logged steps that the resumed run repeats; without this
        they would appear twice.
        """
        if not self.enabled or not self.path.exists():
            return
        kept = [] if step is None else [r for r in read_log(self.path) if r.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        """Write one record ``{"event", "step", "time", **fields}``; returns it."""
        record = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        if not self.enabled:
            return record
        with naming(self.path), self.path.open("a") as file:
            file.write(json.dumps(record, default=_plain) + "\n")
        if self._writer is not None:
            for tag, value in _scalars(fields):
                self._writer.add_scalar(f"{event}/{tag}", value, step)
            self._writer.flush()
        return record

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(value: Any) -> Any:
    # Path objects and the like: their text; anything with .tolist() (tensors, arrays): plain numbers.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _scalars(fields: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    found: list[tuple[str, float]] = []
    for key, value in fields.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            found += _scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found.append((tag, float(value)))
    return found


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``log.jsonl`` file, in order (a torn last line from a killed run is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


__all__ = ["RunLogger", "read_log"]
