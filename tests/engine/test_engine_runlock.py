"""One run per folder (``train.out_dir`` locked) and Ctrl-C handling of the training loop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ivpt.cli import main
from ivpt.engine.interrupt import DeferredInterrupt, Interrupted
from ivpt.engine.logger import read_log
from ivpt.engine.runlock import LOCK_NAME, RunLock
from ivpt.engine.trainer import train
from ivpt.errors import IVPTError


def test_a_second_lock_on_a_folder_fails_naming_the_holder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with RunLock(folder) as first:
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert first.stale is None
        with pytest.raises(IVPTError) as info:
            RunLock(folder).acquire()
        message = str(info.value)
        assert message.startswith(f"run folder '{folder}' is in use by pid {os.getpid()} on host {holder['host']} ")
        assert message.endswith("; wait for that run to end, or give this one another train.out_dir")
    assert not (folder / LOCK_NAME).exists()
    with RunLock(folder) as again:  # released: free again
        assert again.stale is None


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_message(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    # What a killed run leaves: the file, which nobody holds any more.
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "2024-01-01 00:00:00"}))
    with RunLock(folder) as lock:
        assert lock.stale is not None and lock.stale["pid"] == 999999
        assert lock.stale_message == (
            f"taking over the stale lock of run folder '{folder}': its holder, pid 999999 on host elsewhere since "
            "2024-01-01 00:00:00, is no longer running"
        )
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_train_on_a_locked_folder_fails_before_building_anything(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config()
    built: list[str] = []
    monkeypatch.setattr("ivpt.data.build_dataset", lambda *args, **kwargs: built.append("data"))
    with RunLock(cfg.train.out_dir), pytest.raises(IVPTError, match=f"is in use by pid {os.getpid()} "):
        train(cfg)
    assert built == []


def test_a_run_in_another_process_holds_the_folder_until_it_dies(tiny_overrides, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ivpt.engine.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["train", *tiny_overrides("train.epochs=1")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ivpt train: error: run folder '{folder}' is in use by pid {holder.pid} on host ")
        assert err.count("\n") == 1
    finally:
        holder.kill()  # SIGKILL: it cannot clean up, the operating system drops its lock
        holder.wait()
    assert (folder / LOCK_NAME).exists()
    assert main(["train", *tiny_overrides("train.epochs=1", "train.test_at_end=false")]) == 0
    err = capsys.readouterr().err
    assert (
        f"ivpt train: taking over the stale lock of run folder '{folder}': its holder, pid {holder.pid} on host "
        in err
    )
    assert not (folder / LOCK_NAME).exists()
    notes = [r["message"] for r in read_log(folder / "log.jsonl") if r["event"] == "note"]
    assert any(note.startswith(f"taking over the stale lock of run folder '{folder}'") for note in notes)


def test_the_first_interrupt_is_deferred_and_the_second_stops_at_once() -> None:
    # A suite started in the background may run with SIGINT ignored; the trainer only defers an interrupt a
    # user can send, so give this process Python's default handler for the test.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        announced: list[str] = []
        with DeferredInterrupt(announced.append) as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            assert interrupt.requested and announced == ["SIGINT"]  # no KeyboardInterrupt: the step may finish
            assert interrupt.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_sigterm_is_deferred_like_ctrl_c_and_the_default_comes_back() -> None:
    inherited = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        announced: list[str] = []
        with DeferredInterrupt(announced.append) as interrupt:
            # Without the handler a SIGTERM would end the test process itself.
            assert signal.getsignal(signal.SIGTERM) == interrupt._handle
            os.kill(os.getpid(), signal.SIGTERM)
            assert interrupt.requested and interrupt.signum == signal.SIGTERM and announced == ["SIGTERM"]
            with pytest.raises(Interrupted) as stopped:
                os.kill(os.getpid(), signal.SIGTERM)
            assert stopped.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, inherited)


def test_a_callers_own_sigterm_handler_is_left_alone() -> None:
    def own(signum, frame) -> None:  # a scheduler integration's handler, say
        received.append(signum)

    received: list[int] = []
    inherited = signal.signal(signal.SIGTERM, own)
    try:
        with DeferredInterrupt() as interrupt:
            assert signal.getsignal(signal.SIGTERM) is own
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM] and not interrupt.requested
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, inherited)
