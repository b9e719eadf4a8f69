"""The demo's jobs: how methods are shared out over worker processes, how their progress is read and
shown, and what a failing worker reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ivpt.demo.jobs import (
    MethodOutcome,
    _training_progress,
    _Watch,
    default_jobs,
    method_groups,
    run_in_parallel,
)
from ivpt.demo.run import FAST_PLAN, METHODS, demo_config
from ivpt.errors import IVPTError


def test_ivpt_gets_a_worker_of_its_own_and_the_others_share_the_rest() -> None:
    assert method_groups(METHODS, 1) == [list(METHODS)]
    assert method_groups(METHODS, 2) == [["ivpt"], ["vpt_deep", "linear_probe"]]
    assert method_groups(METHODS, 3) == [["ivpt"], ["vpt_deep"], ["linear_probe"]]
    # Never an empty worker.
    assert method_groups(METHODS, 8) == [["ivpt"], ["vpt_deep"], ["linear_probe"]]
    assert method_groups(("ivpt",), 2) == [["ivpt"]]
    assert method_groups(("linear_probe", "ivpt", "vpt_deep"), 2) == [["ivpt"], ["linear_probe", "vpt_deep"]]
    with pytest.raises(IVPTError, match="--jobs must be at least 1, got 0"):
        method_groups(METHODS, 0)
    assert 1 <= default_jobs() <= 2


def _event(kind: str, step: int, time: float, **fields: object) -> str:
    return json.dumps({"event": kind, "step": step, "time": time, **fields})


def test_training_progress_reads_this_runs_events_only(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    assert _training_progress(log, since=0.0) == (0, 0, False)  # not written yet
    earlier_run = [_event("start", 0, 10.0, steps_per_epoch=3), _event("train", 30, 11.0), _event("end", 30, 12.0)]
    log.write_text("\n".join(earlier_run) + "\n")
    assert _training_progress(log, since=100.0) == (0, 0, False)
    this_run = [_event("start", 0, 101.0, steps_per_epoch=7), _event("train", 5, 102.0), _event("train", 10, 103.0)]
    log.write_text("\n".join(earlier_run + this_run) + '\n{"event": "tra')  # a line half written
    assert _training_progress(log, since=100.0) == (7, 10, False)
    log.write_text("\n".join([*earlier_run, *this_run, _event("end", 14, 104.0)]) + "\n")
    assert _training_progress(log, since=100.0) == (7, 14, True)


def test_watch_prints_a_line_per_epoch_and_phase_when_not_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = demo_config("ivpt", FAST_PLAN, tmp_path / "data", tmp_path / "runs" / "ivpt")
    log = Path(cfg.train.out_dir) / "log.jsonl"
    log.parent.mkdir(parents=True)
    watch = _Watch({"ivpt": cfg}, since=100.0)
    assert not watch.interactive  # pytest captures stderr

    watch.update({})
    assert capsys.readouterr().out == ""  # nothing logged yet: nothing to say
    events = [_event("start", 0, 101.0, steps_per_epoch=1), _event("train", 1, 102.0)]
    log.write_text("\n".join(events) + "\n")
    watch.update({})
    watch.update({})  # no change: no new line
    assert capsys.readouterr().out == f"  ivpt: training (epoch 1/{cfg.train.epochs}, step 1)\n"
    log.write_text("\n".join([*events, _event("end", 2, 103.0)]) + "\n")
    watch.update({})
    outcome = MethodOutcome("ivpt", "best.pt", {}, train_seconds=12.4, eval_seconds=3.0)
    watch.update({"ivpt": outcome})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"  ivpt: evaluating (epoch 2/{cfg.train.epochs}, step 2)",
        f"  ivpt: done: trained in 12 s, evaluated in 3 s (epoch 2/{cfg.train.epochs}, step 2)",
    ]
    watch.close()


def test_a_failing_worker_stops_the_demo_with_its_error(tmp_path: Path) -> None:
    # No data set at data.root: the worker's trainer raises a DataError, which reaches the caller as is.
    cfg = demo_config("linear_probe", FAST_PLAN, tmp_path / "missing", tmp_path / "runs" / "linear_probe")
    with pytest.raises(IVPTError, match="missing"):
        run_in_parallel({"linear_probe": cfg}, [["linear_probe"]], threads=1, progress=False)
    # The worker's console output is kept beside its run.
    assert (tmp_path / "runs" / "linear_probe" / "demo.log").is_file()


def test_a_worker_that_died_is_reported_with_the_likely_causes(tmp_path: Path) -> None:
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from ivpt.demo.jobs import _outcomes_of

    cfg = demo_config("vpt_deep", FAST_PLAN, tmp_path / "data", tmp_path / "runs" / "vpt_deep")
    future: Future[list[MethodOutcome]] = Future()
    future.set_exception(BrokenProcessPool("terminated abruptly"))
    with pytest.raises(RuntimeError) as raised:
        _outcomes_of(future, ["vpt_deep"], {"vpt_deep": cfg})
    message = str(raised.value)
    assert "worker process for vpt_deep died" in message
    assert "if __name__ == '__main__':" in message and "jobs=1" in message
    assert str(tmp_path / "runs" / "vpt_deep" / "demo.log") in message


def test_workers_start_with_the_training_code_already_imported() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ivpt.demo.jobs import start_workers

    context = start_workers()
    if "forkserver" not in multiprocessing.get_all_start_methods():
        assert context.get_start_method() == "spawn"
        return
    assert context.get_start_method() == "forkserver"
    assert start_workers() is context
    # A builtin as the job: unpickling it imports nothing, so the worker shows what it started with.
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        preloaded = pool.submit(eval, "sorted(m for m in __import__('sys').modules if m.startswith('ivpt.engine.'))")
        assert {"ivpt.engine.trainer", "ivpt.engine.evaluate"} <= set(preloaded.result(timeout=120))


def test_workers_are_spawned_where_the_fork_server_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing
    from multiprocessing import forkserver

    from ivpt.demo.jobs import start_workers

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("this platform has no fork server")

    def refuse() -> None:
        raise PermissionError("socket: operation not permitted")

    monkeypatch.setattr(forkserver, "ensure_running", refuse)
    assert start_workers().get_start_method() == "spawn"
