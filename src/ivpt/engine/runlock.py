"""One training run per folder: a lock on ``train.out_dir``.

Two runs writing the same folder would resume from each other's checkpoints and overwrite each other's
files. :class:`RunLock` holds an exclusive ``flock`` on ``out_dir/.ivpt.lock`` for the life of the run;
the file says who holds it (pid, host, start time, command). The operating system releases the lock when
its process ends, however it ends, so a lock file left by a killed run is recognised as stale (it exists,
nobody holds it) and taken over, with a message naming the run that left it. Under ``torchrun`` only
rank 0 takes the lock, and every rank learns whether it got it (:func:`lock_run_folder`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ivpt.engine.distributed import DistributedContext, gather_objects
from ivpt.errors import IVPTError
from ivpt.outputs import describe_os_error, prepare_output_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; runs there are not guarded
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".ivpt.lock"
# Characters of the holder's command line an error message shows.
_COMMAND_SHOWN = 160


class RunLock:
    """An exclusive lock on a run folder, taken by :meth:`acquire` and given back by :meth:`release`.

    Args:
        out_dir: the run folder (created when missing).

    Attributes:
        path: the lock file, ``out_dir/.ivpt.lock``.
        stale: what the lock file said when a run that ended without releasing it left one (its pid,
            host...), ``None`` otherwise.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.stale: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; returns ``self``.

        Raises:
            IVPTError: another live process holds it (the message names the folder and the holder), or
                the folder cannot be created or written.
        """
        prepare_output_dir(self.out_dir, "run folder (train.out_dir)")
        if fcntl is None:  # pragma: no cover
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _cannot_lock(exc, self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise IVPTError(
                    f"run folder '{self.out_dir}' is in use by {_describe(holder)}; wait for that run to end, "
                    f"or give this one another train.out_dir"
                ) from None
            # The holder before us may have removed the file between our open and our lock: then we
            # locked a file nobody else sees, and must try again on the one now at this path.
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        left = _read_holder(fd)
        self.stale = left or None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        }
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as exc:
            self.release()
            raise _cannot_lock(exc, self.path) from None
        return self

    @property
    def stale_message(self) -> str | None:
        """A sentence about the stale lock taken over, or ``None``."""
        if self.stale is None:
            return None
        return (
            f"taking over the stale lock of run folder '{self.out_dir}': its holder, {_describe(self.stale)}, "
            "is no longer running"
        )

    def release(self) -> None:
        """Remove the lock file and give the lock back (nothing happens when it is not held)."""
        if self._fd is None:
            return
        # Unlinking while still holding the lock: a run that opened the old file notices (see acquire).
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # also for forked children sharing the descriptor
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_run_folder(out_dir: str | Path, ctx: DistributedContext) -> RunLock:
    """Rank 0 takes the lock of ``out_dir``; every rank raises the same error when it fails.

    Other ranks get a :class:`RunLock` that holds nothing (releasing it does nothing).
    """
    lock = RunLock(out_dir)
    problem: str | None = None
    if ctx.is_main:
        try:
            lock.acquire()
            if lock.stale_message is not None:
                print(f"ivpt train: {lock.stale_message}", file=sys.stderr, flush=True)
        except IVPTError as exc:
            problem = str(exc)
    problem = gather_objects(problem, ctx)[0]
    if problem is not None:
        raise IVPTError(problem)
    return lock


def _cannot_lock(exc: OSError, path: Path) -> IVPTError:
    return IVPTError(f"cannot lock run folder (train.out_dir) {describe_os_error(exc, path)}")


def _read_holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder (``{}`` when empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (its lock file is empty)"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("started"):
        text += f" since {holder['started']}"
    command = str(holder.get("command", ""))
    if command:
        text += f" (`{command if len(command) <= _COMMAND_SHOWN else command[: _COMMAND_SHOWN - 3] + '...'}`)"
    return text


__all__ = ["LOCK_NAME", "RunLock", "lock_run_folder"]
