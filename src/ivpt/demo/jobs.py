"""The demo's training-and-scoring jobs, run side by side in worker processes.

Why: the demo's matrices are small (16 images of 256 tokens, width 96), so a second intra-op thread
does little; an IVPT step takes about 0.61 s with one thread and 0.51 s with two. Two single-threaded
workers (IVPT in one, VPT-Deep then the linear probe in the other) still slow each other down, so on
two cores the demo gains about 13 % over one two-threaded process doing the methods in turn (docs/demo.md,
"The demo's time"). IVPT's job only trains; the caller scores it with every core afterwards.

Where the platform has it (Linux, macOS), the workers fork from a ``forkserver`` process that has
imported the training code once: :func:`start_workers` starts it while the caller does other work (the
demo draws its data set meanwhile), so the workers begin at once instead of each spending several
seconds on imports. Elsewhere they are spawned.

The numbers a run gives depend slightly on the thread count (floating-point sums are split
differently), as with any PyTorch program; ``ivpt demo --jobs 1`` runs everything in the calling
process with all its threads.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from ivpt.config import Config
from ivpt.engine.logger import read_log
from ivpt.errors import IVPTError

# Name of each worker's captured console output, in its run folder.
WORKER_LOG = "demo.log"
# How often the parent re-reads the runs' training logs to move the progress bars.
_POLL_SECONDS = 1.0
# What every worker needs (torch and timm come with them): the fork server imports them once.
_WORKER_MODULES = ("ivpt.engine.trainer", "ivpt.engine.evaluate")


@dataclass(frozen=True)
class MethodOutcome:
    """What one method's job hands back: its checkpoint, ``ivpt eval`` results (``None`` when the job
    only trained) and the time each part took."""

    method: str
    checkpoint: str
    results: dict[str, Any] | None
    train_seconds: float
    eval_seconds: float


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_jobs() -> int:
    """Worker processes ``ivpt demo`` uses unless told: 2 where there are 2 cores or more, else 1."""
    return min(2, available_cores())


def start_workers() -> BaseContext:
    """The start method of the demo's workers, its fork server already starting if it has one.

    ``forkserver`` where the platform offers it: the server imports the training code in the
    background, so call this early, before other work. ``spawn`` elsewhere. Calling it again returns the
    same context and leaves a running server as it is.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_WORKER_MODULES))
    try:
        forkserver.ensure_running()
    except OSError:  # no Unix socket for the server here (a locked-down sandbox): spawn instead
        return multiprocessing.get_context("spawn")
    return context


def method_groups(methods: Sequence[str], jobs: int) -> list[list[str]]:
    """Split ``methods`` over at most ``jobs`` workers: IVPT (the longest job) alone, the rest dealt out
    in order over the other workers. One job: every method in one group, in the given order.

    Raises:
        IVPTError: ``jobs`` is below 1.
    """
    if jobs < 1:
        raise IVPTError(f"demo: --jobs must be at least 1, got {jobs}")
    if jobs == 1:
        return [list(methods)]
    first = [m for m in methods if m == "ivpt"] or [methods[0]]
    rest = [m for m in methods if m not in first]
    groups: list[list[str]] = [first] + [[] for _ in range(min(jobs - 1, len(rest)))]
    for index, method in enumerate(rest):
        groups[1 + index % (len(groups) - 1)].append(method)
    return groups


def train_and_score(method: str, cfg: Config, evaluate: bool = True) -> MethodOutcome:
    """Train ``method`` with ``cfg`` (``ivpt train``) and, with ``evaluate``, score its checkpoint
    (``ivpt eval``)."""
    from ivpt.engine.evaluate import evaluate_checkpoint
    from ivpt.engine.trainer import train

    begin = time.perf_counter()
    summary = train(cfg, None)
    trained = time.perf_counter()
    checkpoint = Path(summary["best_checkpoint"])
    results = evaluate_checkpoint(checkpoint) if evaluate else None
    return MethodOutcome(method, str(checkpoint), results, trained - begin, time.perf_counter() - trained)


def _run_group(group: list[tuple[str, Config]], threads: int, evaluate: bool) -> list[MethodOutcome]:
    """A worker process's whole job: its methods in turn, console output into each run's ``demo.log``."""
    import torch

    torch.set_num_threads(threads)
    outcomes = []
    for method, cfg in group:
        run_dir = Path(cfg.train.out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with (
            open(run_dir / WORKER_LOG, "w", encoding="utf-8") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            outcomes.append(train_and_score(method, cfg, evaluate))
    return outcomes


def _training_progress(log_path: Path, since: float) -> tuple[int, int, bool]:
    """``(steps per epoch, last logged step, finished)`` of the run logging to ``log_path``.

    Events older than ``since`` belong to an earlier run in the same folder and are skipped, and so
    (by :func:`~ivpt.engine.logger.read_log`) is a line being written at this moment.
    """
    per_epoch = step = 0
    finished = False
    try:
        events = read_log(log_path)
    except OSError:  # not written yet
        return per_epoch, step, finished
    for event in events:
        if event.get("time", 0.0) < since:
            continue
        if event.get("event") == "start":
            per_epoch = int(event.get("steps_per_epoch", 0))
        step = max(step, int(event.get("step", 0)))
        finished = finished or event.get("event") == "end"
    return per_epoch, step, finished


def run_in_parallel(
    configs: dict[str, Config],
    groups: list[list[str]],
    threads: int,
    progress: bool = True,
    train_only: Sequence[str] = (),
) -> dict[str, MethodOutcome]:
    """Run each group of methods in its own worker process with ``threads`` intra-op threads.

    The workers come from :func:`start_workers` (forked from its server where there is one).

    While they run, the parent follows each method's ``log.jsonl`` (:class:`_Watch`). A failing job
    stops the demo with its error and the path of its ``demo.log``.

    Args:
        train_only: groups holding any of these methods train without scoring (``results`` is
            ``None``): the caller scores them afterwards with every core. The demo does so for IVPT,
            the longest job, whose evaluation would otherwise run on one core after the others end.

    Returns:
        method -> :class:`MethodOutcome`, in the order of ``configs``.
    """
    watch = _Watch(configs, since=time.time(), enabled=progress)
    outcomes: dict[str, MethodOutcome] = {}
    try:
        with ProcessPoolExecutor(max_workers=len(groups), mp_context=start_workers()) as pool:
            futures: dict[Future[list[MethodOutcome]], list[str]] = {
                pool.submit(
                    _run_group, [(m, configs[m]) for m in group], threads, not set(group) & set(train_only)
                ): group
                for group in groups
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    for outcome in _outcomes_of(future, futures[future], configs):
                        outcomes[outcome.method] = outcome
                watch.update(outcomes)
    finally:
        watch.close()
    return {method: outcomes[method] for method in configs}


def _outcomes_of(
    future: Future[list[MethodOutcome]], group: list[str], configs: dict[str, Config]
) -> list[MethodOutcome]:
    try:
        return future.result()
    except IVPTError:
        raise
    except BrokenProcessPool as error:
        # What a worker dies of before it can report: killed (out of memory), or the caller's script
        # re-ran the demo in the worker because its top level lacks a __main__ guard (spawned and
        # fork-server workers import the main script, as with any multiprocessing code).
        raise RuntimeError(
            f"demo: the worker process for {', '.join(group)} died ({error}). If you call run_demo from a "
            "script, put the call under `if __name__ == '__main__':`, or pass jobs=1 to run everything in "
            f"this process; its output so far is in {_worker_logs(group, configs)}"
        ) from error
    except Exception as error:
        raise RuntimeError(
            f"demo: the job for {', '.join(group)} failed ({error!r}); its output is in {_worker_logs(group, configs)}"
        ) from error


def _worker_logs(group: list[str], configs: dict[str, Config]) -> str:
    return ", ".join(str(Path(configs[m].train.out_dir) / WORKER_LOG) for m in group)


@dataclass
class _RunState:
    steps: int = 0  # planned optimizer steps (0: not known yet)
    step: int = 0
    phase: str = "waiting"  # waiting, training, evaluating, done
    shown: tuple[int, str] = (-1, "")  # (epoch, phase) last printed in line mode


class _Watch:
    """How far each method's job has come, read from its ``log.jsonl``.

    On a terminal: one tqdm bar per method. Elsewhere (a log file, CI): one line per method whenever
    it finishes an epoch or changes phase, so the output stays readable.
    """

    def __init__(self, configs: dict[str, Config], since: float, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.configs = configs
        self.since = since
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.states = {method: _RunState() for method in configs}
        self.bars = {}
        if self.interactive:
            self.bars = {
                method: tqdm(total=None, desc=f"{method:<13}", unit="step", position=index)
                for index, method in enumerate(configs)
            }

    def update(self, outcomes: dict[str, MethodOutcome]) -> None:
        for method, state in self.states.items():
            if state.phase == "done":  # shown as done already; its log no longer changes
                continue
            cfg = self.configs[method]
            per_epoch, step, finished = _training_progress(Path(cfg.train.out_dir) / "log.jsonl", self.since)
            if per_epoch and not state.steps:
                planned = per_epoch * cfg.train.epochs
                state.steps = min(planned, cfg.train.max_steps) if cfg.train.max_steps > 0 else planned
            state.step = step
            outcome = outcomes.get(method)
            state.phase = "done" if outcome else "evaluating" if finished else "training" if per_epoch else "waiting"
            if self.interactive:
                self._draw(method, state, outcome)
            elif self.enabled:
                self._print(method, state, outcome, per_epoch)

    def _draw(self, method: str, state: _RunState, outcome: MethodOutcome | None) -> None:
        bar = self.bars[method]
        if state.steps and not bar.total:
            bar.total = state.steps
        bar.n = state.steps if outcome and state.steps else state.step
        bar.set_postfix_str(_phase_text(state, outcome), refresh=False)
        bar.refresh()

    def _print(self, method: str, state: _RunState, outcome: MethodOutcome | None, per_epoch: int) -> None:
        epoch = state.step // per_epoch if per_epoch else 0
        if (epoch, state.phase) == state.shown or state.phase == "waiting":
            return
        state.shown = (epoch, state.phase)
        where = f"epoch {epoch}/{self.configs[method].train.epochs}, step {state.step}" if per_epoch else ""
        print(f"  {method}: {_phase_text(state, outcome)}{' (' + where + ')' if where else ''}", flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _phase_text(state: _RunState, outcome: MethodOutcome | None) -> str:
    if outcome is not None and outcome.results is None:
        return f"trained in {outcome.train_seconds:.0f} s"
    if outcome is not None:
        return f"done: trained in {outcome.train_seconds:.0f} s, evaluated in {outcome.eval_seconds:.0f} s"
    return state.phase


__all__ = [
    "WORKER_LOG",
    "MethodOutcome",
    "available_cores",
    "default_jobs",
    "method_groups",
    "run_in_parallel",
    "start_workers",
    "train_and_score",
]
