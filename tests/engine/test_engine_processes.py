"""End to end in separate processes: a run killed mid-epoch resumes exactly; two-process DDP on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ivpt.checkpoint import read_checkpoint
from ivpt.config import load_config
from ivpt.engine.evaluate import HEADLINE_KEYS, STAGE_KEYS, evaluate_checkpoint
from ivpt.engine.logger import read_log
from ivpt.engine.trainer import train

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 3


def environment() -> dict[str, str]:
    # One thread per process: the machine's few cores are shared by both DDP ranks and other tests.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def default_sigint() -> None:
    # A suite started in the background inherits SIGINT ignored, and Python (rightly) leaves an ignored
    # SIGINT alone; the child must start with the default disposition to see the interrupt at all.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_step_checkpoint(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if process.poll() is not None:
            pytest.fail(f"training ended (code {process.returncode}) before writing {path}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint {path} within {timeout} s")


def test_run_killed_mid_epoch_resumes_and_matches_an_uninterrupted_run(tiny_overrides, tmp_path: Path) -> None:
    overrides = tiny_overrides("train.epochs=3", "train.save_every_steps=1", f"train.out_dir={tmp_path / 'killed'}")
    command = [sys.executable, "-m", "ivpt.cli", "train", *overrides]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = tmp_path / "killed" / "last.pt"
    wait_for_step_checkpoint(last, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(last, training=True)["step"]
    assert killed_at < 3 * STEPS_PER_EPOCH

    resumed = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 * STEPS_PER_EPOCH and summary["epochs"] == 3
    records = read_log(tmp_path / "killed" / "log.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 10))
    starts = [r for r in records if r["event"] == "start"]
    assert starts[-1]["resumed_from"] == str(last)
    assert not list((tmp_path / "killed").glob("*.tmp"))

    # Uninterrupted, in a process like the others (the thread count changes float summation order).
    straight_overrides = tiny_overrides("train.epochs=3", f"train.out_dir={tmp_path / 'straight'}")
    straight = [sys.executable, "-m", "ivpt.cli", "train", "--no-resume", *straight_overrides]
    assert subprocess.run(straight, env=environment(), capture_output=True, timeout=300).returncode == 0
    a = read_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = read_checkpoint(last)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_ctrl_c_saves_last_pt_and_the_run_resumes_exactly(tiny_overrides, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    overrides = tiny_overrides("train.epochs=40", f"train.out_dir={out}")
    command = [sys.executable, "-m", "ivpt.cli", "train", *overrides]
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.monotonic() + 120
    while not any(r["event"] == "train" and r["step"] >= 2 for r in _records(out / "log.jsonl")):
        assert process.poll() is None and time.monotonic() < deadline, "training ended or stalled before step 2"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    stopped_at = read_checkpoint(out / "last.pt", training=True)["step"]
    assert 2 <= stopped_at < 40 * STEPS_PER_EPOCH
    assert stderr.splitlines()[-1] == (
        f"ivpt train: interrupted: saved {out / 'last.pt'} at step {stopped_at}; the same command resumes from it"
    )
    assert [(r["step"], r["signal"]) for r in read_log(out / "log.jsonl") if r["event"] == "interrupt"] == [
        (stopped_at, "SIGINT")
    ]
    assert not (out / ".ivpt.lock").exists()

    # Resumed to a few steps further, the weights are those of a run never interrupted (both in this
    # process, with one thread as the interrupted one had).
    until = f"train.max_steps={stopped_at + 3}"
    assert train(load_config(None, [*overrides, until]))["steps"] == stopped_at + 3
    assert [r["step"] for r in read_log(out / "log.jsonl") if r["event"] == "train"] == list(range(1, stopped_at + 4))
    train(load_config(None, tiny_overrides("train.epochs=40", f"train.out_dir={tmp_path / 'straight'}", until)))
    a = read_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = read_checkpoint(out / "last.pt")["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_sigterm_saves_last_pt_and_exits_143(tiny_overrides, tmp_path: Path) -> None:
    # What a cluster scheduler sends before it preempts a job: the same deferred save as Ctrl-C.
    out = tmp_path / "terminated"
    overrides = tiny_overrides("train.epochs=40", f"train.out_dir={out}")
    process = subprocess.Popen(
        [sys.executable, "-m", "ivpt.cli", "train", *overrides], env=environment(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not any(r["event"] == "train" and r["step"] >= 2 for r in _records(out / "log.jsonl")):
        assert process.poll() is None and time.monotonic() < deadline, "training ended or stalled before step 2"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    stopped_at = read_checkpoint(out / "last.pt", training=True)["step"]
    assert 2 <= stopped_at < 40 * STEPS_PER_EPOCH
    assert f"ivpt train: SIGTERM: saving {out / 'last.pt'} after this step" in stderr
    assert stderr.splitlines()[-1] == (
        f"ivpt train: stopped by SIGTERM: saved {out / 'last.pt'} at step {stopped_at}; "
        "the same command resumes from it"
    )
    interrupts = [r for r in read_log(out / "log.jsonl") if r["event"] == "interrupt"]
    assert [(r["step"], r["signal"]) for r in interrupts] == [(stopped_at, "SIGTERM")]
    assert not (out / ".ivpt.lock").exists()


def _records(log: Path) -> list[dict]:
    return read_log(log) if log.exists() else []


def torchrun(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # A session of its own, so that a hang takes the launcher and both workers down together.
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun {' '.join(args[:3])} hung for {timeout} s; stderr tail: {stderr[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_process_ddp_trains_and_evaluates_like_one_process(tiny_overrides, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    # Data-initialised prototypes: rank 0's are broadcast to the other rank before the first step.
    overrides = tiny_overrides(
        "train.epochs=1", "train.batch_size=4", f"train.out_dir={out}", "train.prototype_init=data"
    )
    result = torchrun("-m", "ivpt.cli", "train", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only rank 0 prints
    summary = json.loads(summaries[0])
    assert summary["steps"] == STEPS_PER_EPOCH  # 24 images / (2 ranks x 4)
    assert isinstance(summary["test_accuracy"], float)

    # Only rank 0 wrote, once.
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "log.jsonl"]
    records = read_log(out / "log.jsonl")
    events = [r["event"] for r in records]
    assert events.count("start") == 1 and events.count("test") == 1 and events.count("val") == 1
    assert records[0]["world_size"] == 2 and records[0]["global_batch"] == 8
    assert any(r["event"] == "note" and "prototypes initialised" in r["message"] for r in records)
    checkpoint = read_checkpoint(out / "last.pt", training=True)
    assert len(checkpoint["rng"]) == 2 and checkpoint["world_size"] == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])

    # The same checkpoint scored by two processes and by one gives the same numbers.
    two = torchrun("-m", "ivpt.cli", "eval", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1
    single = evaluate_checkpoint(out / "last.pt", out_dir=tmp_path / "one")
    double = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in HEADLINE_KEYS:
        assert double[key] == pytest.approx(single[key], abs=1e-6), key
    for stage, values in single["per_stage"].items():
        for key in STAGE_KEYS:
            assert double["per_stage"][str(stage)][key] == pytest.approx(values[key], abs=1e-6), (stage, key)
