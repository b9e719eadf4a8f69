"""Ctrl-C or SIGTERM during training: finish the step, save ``last.pt``, stop; a second signal stops at once.

Stopping in the middle of an optimizer step would leave weights, optimizer state and random streams
out of step with each other, so the first SIGINT or SIGTERM is only recorded (:class:`DeferredInterrupt`);
the training loop looks at it after each optimizer step, saves ``last.pt`` as its periodic saves do, and
raises :class:`TrainingInterrupted`, which resumes exactly like any other checkpoint. A second signal
raises :class:`Interrupted` at once, saving nothing. SIGTERM is what a cluster scheduler sends before it
preempts or times out a job (SLURM, Kubernetes) and what ``torchrun`` forwards to its workers when it is
stopped, so it gets the same deferred save as Ctrl-C; the process exits with ``128 + signal`` (130, 143).

DataLoader worker processes forked while the handlers are installed inherit them, so a signal sent to the
whole process group (Ctrl-C at the terminal, a scheduler signalling every process of a job) does not kill
them under the loop's feet; they still exit when the loader shuts them down or their parent dies.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

#: The signals a training run defers, and the disposition each must have for the run to take it over.
DEFERRED_SIGNALS: dict[signal.Signals, object] = {
    signal.SIGINT: signal.default_int_handler,
    signal.SIGTERM: signal.SIG_DFL,
}


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; ``signum`` is that signal (the command exits with ``128 + signum``)."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(*([message] if message else []))
        self.signum = int(signum)


class TrainingInterrupted(Interrupted):
    """Training stopped at a signal after saving; the message says where (``ivpt train`` exits 130 or 143)."""


class DeferredInterrupt:
    """Within ``with``, the first SIGINT or SIGTERM sets :attr:`requested`; a second raises :class:`Interrupted`.

    Each signal is taken over only in the main thread and only from its default disposition (a caller's
    own handler, or a signal the parent process ignores, is left alone); elsewhere :attr:`requested` stays
    false and the signal behaves as usual.

    Args:
        announce: called with the signal's name (``"SIGINT"``, ``"SIGTERM"``) when the first one arrives
            (e.g. to say what happens next).
    """

    def __init__(self, announce: Callable[[str], None] | None = None) -> None:
        self.announce = announce
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._owner = os.getpid()

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum, default in DEFERRED_SIGNALS.items():
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner:
            return  # a forked DataLoader worker: the training process decides
        if self.requested:
            raise Interrupted(signum=signum)
        self.requested = True
        self.signum = signum
        if self.announce is not None:
            self.announce(signal.Signals(signum).name)


__all__ = ["DEFERRED_SIGNALS", "DeferredInterrupt", "Interrupted", "TrainingInterrupted"]
