"""Per-step learning-rate schedules and square-root batch scaling."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ivpt.config import OptimConfig
from ivpt.engine.schedule import StepSchedule, build_scheduler, lr_scale, make_schedule


def test_step_schedule_halves_every_step_size() -> None:
    schedule = StepSchedule("step", total_steps=100, step_size=10, gamma=0.5)
    assert [schedule(t) for t in (0, 9, 10, 19, 20, 35)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_linear_warmup_reaches_one_then_decays() -> None:
    schedule = StepSchedule("step", total_steps=100, warmup_steps=4, step_size=10, gamma=0.5)
    assert [schedule(t) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert schedule(10) == 0.5


def test_cosine_runs_from_one_to_zero_after_warmup() -> None:
    schedule = StepSchedule("cosine", total_steps=12, warmup_steps=2)
    assert schedule(0) == 0.5
    assert schedule(2) == 1.0
    assert schedule(7) == pytest.approx(0.5)
    assert schedule(12) == pytest.approx(0.0)
    assert schedule(50) == pytest.approx(0.0)


def test_make_schedule_converts_epochs_to_steps() -> None:
    optim = OptimConfig(scheduler="step", step_epochs=4, step_gamma=0.5, warmup_epochs=0.5)
    schedule = make_schedule(optim, steps_per_epoch=10, epochs=25)
    assert (schedule.total_steps, schedule.warmup_steps, schedule.step_size) == (250, 5, 40)
    assert schedule(39) == 1.0 and schedule(40) == 0.5


def test_constant_schedule() -> None:
    assert StepSchedule("constant", total_steps=5)(1000) == 1.0


def test_sqrt_lr_scaling() -> None:
    assert lr_scale(OptimConfig(lr_ref_batch=0), 64) == 1.0
    assert lr_scale(OptimConfig(lr_ref_batch=16), 64) == pytest.approx(2.0)
    assert lr_scale(OptimConfig(lr_ref_batch=32), 8) == pytest.approx(math.sqrt(0.25))


def test_scheduler_state_resumes_on_the_same_curve_and_loads_weights_only() -> None:
    optim = OptimConfig(scheduler="cosine", warmup_epochs=1.0)

    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, build_scheduler(opt, optim, steps_per_epoch=3, epochs=4)

    opt, sched = fresh()
    lrs = []
    for _ in range(12):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    opt2, sched2 = fresh()
    for _ in range(5):
        opt2.step()
        sched2.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt2.state_dict(), "sched": sched2.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt3, sched3 = fresh()
    opt3.load_state_dict(state["opt"])
    sched3.load_state_dict(state["sched"])
    resumed = []
    for _ in range(7):
        opt3.step()
        sched3.step()
        resumed.append(opt3.param_groups[0]["lr"])
    assert resumed == lrs[5:]
