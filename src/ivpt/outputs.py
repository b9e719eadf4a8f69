"""Output folders checked before the work, and operating-system errors told in one line.

Every command that writes calls :func:`prepare_output_dir` before its long work (training, the metrics'
passes, the figures), so an unusable ``--out`` or ``train.out_dir`` fails in a second instead of after
the work is done. Any other :class:`OSError` (a full disk, the file size limit, a permission) is turned
into one line by :func:`describe_os_error`: the path, what went wrong, and what was expected there.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ivpt.errors import IVPTError

# What the path should have been, by error number: the part of a message that says how to fix it.
_EXPECTED: dict[int, str] = {
    errno.ENOENT: "expected an existing file or folder",
    errno.ENOTDIR: "expected a folder",
    errno.EISDIR: "it is a folder, expected a file",
    errno.EEXIST: "something is already there, expected a folder or nothing",
    errno.EACCES: "expected a path this user may read and write",
    errno.EPERM: "expected a path this user may read and write",
    errno.EROFS: "expected a writable file system",
    errno.ENOSPC: "expected free space on its file system",
    errno.EDQUOT: "expected room within the disk quota",
    errno.EFBIG: "expected a file within the size limit of `ulimit -f` and of the file system",
    errno.ENAMETOOLONG: "expected a shorter name",
    errno.ELOOP: "expected a path without a cycle of symbolic links",
    errno.EMFILE: "expected fewer open files than `ulimit -n`",
}


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str:
    """One line for ``exc``: the path, the system's reason, and what was expected.

    Args:
        exc: the error.
        path: the path to name when the error carries none (writes to an open file do not).

    >>> describe_os_error(NotADirectoryError(errno.ENOTDIR, "Not a directory", "notes.txt/sub"))
    "'notes.txt/sub': not a directory ('notes.txt' is a file, expected a folder)"
    """
    reason = (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    name = exc.filename if exc.filename is not None else path
    expected = _EXPECTED.get(exc.errno) if exc.errno is not None else None
    if exc.errno == errno.ENOTDIR and name is not None:
        blocker = file_in_the_way(Path(os.fsdecode(name)))
        if blocker is not None:
            expected = f"'{blocker}' is a file, expected a folder"
    where = f"'{os.fsdecode(name)}'" if name is not None else ""
    if exc.filename2 is not None:
        where += f" -> '{os.fsdecode(exc.filename2)}'"
    text = f"{where}: {reason}" if where else reason
    return f"{text} ({expected})" if expected else text


def file_in_the_way(path: Path) -> Path | None:
    """The first existing part of ``path`` (itself included) that is not a folder, or ``None``."""
    for candidate in (*reversed(path.parents), path):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def prepare_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) and check that files can be written in it.

    ``what`` opens the error message (e.g. ``"eval: output folder"``).

    Raises:
        IVPTError: a file is in the way, the folder cannot be created, or a file cannot be written in it
            (permissions, a read-only or full file system); the message names the path.
    """
    path = Path(path)
    blocker = file_in_the_way(path)
    if blocker == path:
        raise IVPTError(f"{what} '{path}' is a file, expected a folder")
    if blocker is not None:
        raise IVPTError(f"{what} '{path}': '{blocker}' is a file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # An anonymous file (nothing is left behind) with one byte, so that a full disk shows too.
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"\0")
            probe.flush()
    except OSError as exc:
        raise IVPTError(f"{what} {describe_os_error(exc, path)}") from None
    return path


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Give the :class:`OSError` s raised inside the ``path`` they concern, when they carry none.

    A failed ``write`` on an open file (a full disk, the file size limit) names no file; this lets the
    one-line message of :func:`describe_os_error` name it.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text)`` in UTF-8, with any :class:`OSError` naming ``path``."""
    path = Path(path)
    with naming(path):
        path.write_text(text, encoding="utf-8")
    return path


__all__ = ["describe_os_error", "file_in_the_way", "naming", "prepare_output_dir", "write_text"]
