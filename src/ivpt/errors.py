"""User-facing errors.

Anything a user can cause (a bad config key, a missing file, a damaged checkpoint) raises
:class:`IVPTError` with a message that names the offending file / key / value and what was expected.
The CLI prints such errors as one line; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class IVPTError(Exception):
    """An error caused by the user's input, printed by the CLI without a traceback."""


class ConfigError(IVPTError):
    """A config file or ``key=value`` override is invalid."""


class DataError(IVPTError):
    """A data set on disk is missing, malformed or inconsistent."""


class CheckpointError(IVPTError):
    """A checkpoint cannot be read or does not fit the model."""
