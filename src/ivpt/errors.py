"""User-facing errors.

Anything a user can cause (a bad config key, a missing file, a damaged checkpoint) raises
:class:`IVPTError` with a message that names the offending file / key / value and what was expected.
The CLI prints such errors as one line; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# How torch's DataLoader re-raises an exception of one of its worker processes: the type is called with
# "Caught <Type> in DataLoader worker process <n>.\nOriginal Traceback (most recent call last):\n..."
# and the worker's traceback, whose last line is "<module>.<Type>: <message>".
_WORKER_WRAPPER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class IVPTError(Exception):
    """An error caused by the user's input, printed by the CLI without a traceback.

    Raised in a DataLoader worker, it reaches the main process with its one-line message, as it would
    with ``data.num_workers=0``; the worker's traceback is kept as a note (``--debug`` shows it).
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_WRAPPER.match(args[0]):
            wrapped = args[0]
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            start = wrapped.rfind(prefix)
            if start >= 0:
                super().__init__(wrapped[start + len(prefix) :].strip())
                if hasattr(self, "add_note"):  # Python 3.11+
                    self.add_note(wrapped)
                return
        super().__init__(*args)


class ConfigError(IVPTError):
    """A config file or ``key=value`` override is invalid."""


class DataError(IVPTError):
    """A data set on disk is missing, malformed or inconsistent."""


class CheckpointError(IVPTError):
    """A checkpoint cannot be read or does not fit the model."""
