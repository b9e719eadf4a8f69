"""Ctrl-C during training: finish the step, save ``last.pt``, stop; a second Ctrl-C stops at once.

Stopping in the middle of an optimizer step would leave weights, optimizer state and random streams
out of step with each other, so the first SIGINT is only recorded (:class:`DeferredInterrupt`); the
training loop looks at it after each optimizer step, saves ``last.pt`` as its periodic saves do, and
raises :class:`TrainingInterrupted`, which resumes exactly like any other checkpoint. A second SIGINT
raises :class:`KeyboardInterrupt` at once, saving nothing.

DataLoader worker processes forked while the handler is installed inherit it, so a Ctrl-C at the
terminal (which reaches the whole process group) does not kill them under the loop's feet.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a SIGINT after saving; the message says where (``ivpt train`` exits 130)."""


class DeferredInterrupt:
    """Within ``with``, the first SIGINT sets :attr:`requested`; the second raises ``KeyboardInterrupt``.

    Installed only in the main thread and only over Python's default handler (a caller's own SIGINT
    handler is left alone); elsewhere :attr:`requested` stays false and SIGINT behaves as usual.

    Args:
        announce: called when the first SIGINT arrives (e.g. to say what happens next).
    """

    def __init__(self, announce: Callable[[], None] | None = None) -> None:
        self.announce = announce
        self.requested = False
        self._previous: object = None
        self._installed = False
        self._owner = os.getpid()

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner:
            return  # a forked DataLoader worker: the training process decides
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce is not None:
            self.announce()


__all__ = ["DeferredInterrupt", "TrainingInterrupted"]
