"""Learning-rate schedules evaluated per optimizer step.

Epoch-based recipes (StepLR every ``step_epochs``, cosine over the run) are converted to optimizer
steps, so that the learning rate is a pure function of the step counter: a run resumed mid-epoch
continues on exactly the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ivpt.config import OptimConfig


@dataclass
class StepSchedule:
    """Multiplier of the base learning rates at optimizer step ``t`` (0-based).

    A linear warm-up over the first ``warmup_steps`` steps ramps from ``1 / warmup_steps`` to 1; the
    decay runs on the step counter from 0 (warm-up included), as an epoch-based scheduler would.

    Attributes:
        kind: ``"step"`` (multiply by ``gamma`` every ``step_size`` steps), ``"cosine"`` (half a cosine
            from 1 to 0 between the end of warm-up and ``total_steps``) or ``"constant"``.
        total_steps: optimizer steps in the whole run.
        warmup_steps: length of the linear warm-up (0: none).
        step_size: steps between decays of the ``"step"`` schedule.
        gamma: decay factor of the ``"step"`` schedule.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    step_size: int = 1
    gamma: float = 1.0

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.kind == "step":
            decay = self.gamma ** (step // max(1, self.step_size))
        elif self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = 1.0
        return warmup * decay


def make_schedule(optim: OptimConfig, steps_per_epoch: int, epochs: int) -> StepSchedule:
    """The schedule ``optim`` describes, for ``steps_per_epoch`` optimizer steps in each of ``epochs``."""
    return StepSchedule(
        kind=optim.scheduler,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
        step_size=optim.step_epochs * steps_per_epoch,
        gamma=optim.step_gamma,
    )


def build_scheduler(optimizer: Optimizer, optim: OptimConfig, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """A :class:`LambdaLR` to be stepped once per optimizer step (its state dict resumes exactly)."""
    return LambdaLR(optimizer, make_schedule(optim, steps_per_epoch, epochs))


def lr_scale(optim: OptimConfig, global_batch: int) -> float:
    """``sqrt(global_batch / lr_ref_batch)`` when ``optim.lr_ref_batch`` is set, else 1."""
    if optim.lr_ref_batch <= 0:
        return 1.0
    return math.sqrt(global_batch / optim.lr_ref_batch)


__all__ = ["StepSchedule", "build_scheduler", "lr_scale", "make_schedule"]
