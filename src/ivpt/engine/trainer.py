"""``ivpt train``: the training loop, on the CPU, one GPU, or many under ``torchrun``.

The run folder (``train.out_dir``) receives ``config.yaml`` (the resolved config), ``log.jsonl`` (loss
terms, learning rates, throughput, validation metrics), ``last.pt`` (every epoch and every
``train.save_every_steps`` optimizer steps) and ``best.pt`` (highest top-1 accuracy on the validation
split; the last checkpoint when ``data.val_fraction`` is 0 — the test split is never used to choose).

Resumption is exact: a checkpoint stores what training changed in the model (the frozen backbone
tensors come back from timm's pretrained weights, checked against their recorded sha256), the optimizer,
schedule, gradient scaler, every random stream of every rank, and the position in the epoch
(``epoch``, ``epoch_step``). The data order is a pure function of ``(train.seed, epoch)`` and each
sample's augmentation of ``(train.seed, epoch, index)`` (:mod:`ivpt.engine.rng`), so a resumed epoch
skips the batches already done and continues with the very batches the uninterrupted run would have
seen. A killed run loses at most the steps since its last checkpoint; an interrupted one (Ctrl-C,
SIGINT) loses nothing: it saves ``last.pt`` after the optimizer step in progress and exits
(:mod:`ivpt.engine.interrupt`).

One run per folder: ``train.out_dir`` is created, checked and locked before anything slow starts
(:mod:`ivpt.engine.runlock`); a second run on the same folder fails at once.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ivpt.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    frozen_record,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
)
from ivpt.config import Config, validate
from ivpt.engine.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    gather_objects,
    init_distributed,
    shutdown_distributed,
)
from ivpt.engine.evaluate import ACCURACY_KEYS, evaluate
from ivpt.engine.interrupt import DeferredInterrupt, TrainingInterrupted
from ivpt.engine.logger import RunLogger
from ivpt.engine.rng import (
    EpochSampler,
    SeededSamples,
    capture_rng_state,
    restore_rng_state,
    seed_everything,
    worker_init_fn,
)
from ivpt.engine.runlock import lock_run_folder
from ivpt.engine.step import TrainStep, build_train_step
from ivpt.errors import CheckpointError, ConfigError
from ivpt.model.preprocessing import resolve_preprocessing
from ivpt.model.pretrained import model_entries, pretrained_keys


@dataclass
class Progress:
    """Where training stands; all of it is stored in checkpoints.

    Attributes:
        epoch: the epoch in progress (0-based); equals ``train.epochs`` when training is complete.
        epoch_step: optimizer steps already done in ``epoch``.
        step: optimizer steps done in the whole run.
        best_metric: best validation top-1 accuracy so far (``None`` before the first validation or
            without a validation split).
    """

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    best_metric: float | None = None


def train(cfg: Config, resume: str | None = "auto") -> dict[str, Any] | None:
    """Train the model ``cfg`` describes; returns a summary on rank 0 (``None`` on other ranks).

    Args:
        cfg: the resolved config.
        resume: ``"auto"`` continues from ``train.out_dir/last.pt`` when it exists; a path continues
            from that checkpoint; ``None`` starts afresh (an existing ``last.pt`` is overwritten).

    Returns:
        ``final_train_loss`` (mean total loss of the last logged interval), ``best_val_accuracy``,
        ``test_accuracy`` (of ``best.pt``, measured once after training; ``None`` with
        ``train.test_at_end=false``), ``steps``, ``epochs`` and the
        paths ``out_dir``, ``last_checkpoint``, ``best_checkpoint``, ``log``.
    """
    validate(cfg)
    # config.yaml and the checkpoints keep the input size and normalisation the run used.
    cfg = resolve_preprocessing(cfg)
    ctx = init_distributed(cfg.train.device)
    try:
        # Before anything slow: an unusable folder, or one another run is writing, fails at once.
        lock = lock_run_folder(cfg.train.out_dir, ctx)
        try:
            notes = [lock.stale_message] if lock.stale_message is not None else []
            summary = Trainer(cfg, ctx).run(resume, notes)
        finally:
            lock.release()
    finally:
        shutdown_distributed(ctx)
    return summary if ctx.is_main else None


def train_loader(cfg: Config, dataset: Dataset, sampler: EpochSampler, ctx: DistributedContext) -> DataLoader:
    """The training data loader: ``cfg.data.num_workers`` workers, pinned memory on CUDA, seeded samples.

    Args:
        cfg: the run's config (``train.batch_size``, ``train.seed``, ``data.num_workers``).
        dataset: the training split.
        sampler: this rank's share of each epoch (``EpochSampler`` over ``dataset``).
        ctx: where this process computes (pinned memory for CUDA) and its rank (worker seeds).
    """
    return DataLoader(
        SeededSamples(dataset, cfg.train.seed),
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
        worker_init_fn=worker_init_fn,
        # Worker seeds come from this generator, not the global one: starting a loader mid-epoch
        # after a resume must not shift the global stream (Gumbel noise) against the original run.
        generator=torch.Generator().manual_seed(cfg.train.seed + ctx.rank),
    )


class Trainer:
    """One training run; :meth:`run` does everything :func:`train` promises."""

    def __init__(self, cfg: Config, ctx: DistributedContext) -> None:
        from ivpt.data import build_dataset, load_annotations
        from ivpt.model import build_model

        self.cfg = cfg
        self.ctx = ctx
        self.out_dir = Path(cfg.train.out_dir)
        self.last_path = self.out_dir / "last.pt"
        self.best_path = self.out_dir / "best.pt"
        seed_everything(cfg.train.seed + ctx.rank)

        annotations = load_annotations(cfg.data)
        self.train_set = build_dataset(cfg, "train", annotations=annotations)
        self.val_set = build_dataset(cfg, "val", annotations=annotations) if cfg.data.val_fraction > 0 else None
        self.class_names = list(self.train_set.class_names)
        self.part_names = list(getattr(self.train_set, "part_names", []))

        self.sampler = EpochSampler(len(self.train_set), cfg.train.seed, ctx.rank, ctx.world_size, shuffle=True)
        micro_batches = len(self.sampler) // cfg.train.batch_size
        self.steps_per_epoch = micro_batches // cfg.train.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"config keys 'train.batch_size' x 'train.grad_accum' x processes = "
                f"{cfg.train.batch_size} x {cfg.train.grad_accum} x {ctx.world_size} exceeds the "
                f"{len(self.train_set)} training images: not one optimizer step fits in an epoch"
            )
        self.loader = train_loader(cfg, self.train_set, self.sampler, ctx)

        self.model = build_model(cfg, num_classes=len(self.class_names)).to(ctx.device)
        # The frozen backbone tensors that timm's pretrained weights re-create stay out of the checkpoints;
        # their digest, taken once (they never change), lets a resume check it got the same ones.
        self.frozen = frozen_record(self.model.state_dict(), pretrained_keys(self.model))
        self.distributed_model: nn.Module | None = None
        if ctx.is_distributed:
            # Some trainable parameters get no gradient in some configurations (a loss weight of 0
            # leaves the grouping layers unused), so DDP must look for unused ones.
            self.distributed_model = DistributedDataParallel(
                self.model,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.step: TrainStep = build_train_step(
            self.model,
            cfg,
            self.steps_per_epoch,
            world_size=ctx.world_size,
            rank=ctx.rank,
            distributed_model=self.distributed_model,
            normalize=self.train_set.transform.normalize,  # the loader's uint8 images, on the device
        )
        self.progress = Progress()
        self.logger = RunLogger(self.out_dir, enabled=ctx.is_main, tensorboard=cfg.train.tensorboard)
        self._last_losses: dict[str, float] = {}
        self._interrupt: DeferredInterrupt | None = None
        self._compile_logged = False

    # --- the run ---------------------------------------------------------------------------------

    def run(self, resume: str | None, notes: Sequence[str] = ()) -> dict[str, Any]:
        """Train (resuming as :func:`train` says); ``notes`` are logged as ``note`` records at the start."""
        cfg, ctx = self.cfg, self.ctx
        resumed_from = self._resume(resume)
        initialised_from = 0
        if resumed_from is None and cfg.train.prototype_init == "data":
            initialised_from = self._initialise_prototypes()
        self.logger.rewind(self.progress.step if resumed_from else None)
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "config.yaml")
            if resumed_from is None:
                # A fresh run must not inherit the best checkpoint of an earlier run in this folder.
                self.best_path.unlink(missing_ok=True)
            for leftover in self.out_dir.glob(".*.pt.*.tmp"):
                # Written by a run killed in the middle of saving; the real file is intact.
                leftover.unlink(missing_ok=True)
        self.logger.log(
            "start",
            self.progress.step,
            epoch=self.progress.epoch,
            resumed_from=str(resumed_from) if resumed_from else None,
            world_size=ctx.world_size,
            device=str(ctx.device),
            steps_per_epoch=self.steps_per_epoch,
            global_batch=cfg.train.batch_size * cfg.train.grad_accum * ctx.world_size,
            train_images=len(self.train_set),
            val_images=len(self.val_set) if self.val_set is not None else 0,
            trainable_parameters=sum(p.numel() for p in self.step.trainable),
        )
        for message in notes:
            self.logger.log("note", self.progress.step, message=message)
        if initialised_from:
            self._note(f"prototypes initialised from the tokens of {initialised_from} training images (prototype_init)")
        if self.val_set is None:
            self._note(
                "data.val_fraction is 0: no validation split, so best.pt is the last checkpoint "
                "(the test split is never used to choose a checkpoint)"
            )
        try:
            with DeferredInterrupt(self._announce_interrupt) as self._interrupt:
                while self.progress.epoch < cfg.train.epochs and not self._reached_max_steps():
                    self._train_epoch()
            # The test pass after training loses nothing when interrupted: an interrupt stops it at once.
            summary = self._finish()
        finally:
            self.logger.close()
        return summary

    def _initialise_prototypes(self) -> int:
        """``train.prototype_init=data``: every stage's prototypes from a seeded subset of training images.

        Returns:
            How many images the prototypes were taken from.
        """
        from ivpt.model.prototype_init import initialise_prototypes

        cfg = self.cfg
        generator = torch.Generator().manual_seed(cfg.train.seed)
        count = min(cfg.train.prototype_init_images, len(self.train_set))
        indices = torch.randperm(len(self.train_set), generator=generator)[:count].tolist()
        images = torch.stack([self.train_set[index]["image"] for index in indices]).to(self.ctx.device)
        initialise_prototypes(
            self.model, self.train_set.transform.normalize(images), seed=cfg.train.seed, batch_size=cfg.eval.batch_size
        )
        for stage in self.model.stages:
            broadcast_from_main(stage.prototypes.data, self.ctx)
        return count

    def _reached_max_steps(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.progress.step

    def _train_epoch(self) -> None:
        cfg, progress = self.cfg, self.progress
        accum = cfg.train.grad_accum
        epoch = progress.epoch
        self.sampler.set_epoch(epoch, skip=progress.epoch_step * accum * cfg.train.batch_size)
        remaining_micro = (self.steps_per_epoch - progress.epoch_step) * accum
        self.model.train()
        bar = tqdm(
            total=remaining_micro,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not (self.ctx.is_main and cfg.train.progress),
            dynamic_ncols=True,
            leave=False,
        )
        window = _LossWindow(self.ctx.device)
        for micro_index, batch in enumerate(self.loader):
            if micro_index >= remaining_micro:
                break
            window.add(self.step(batch["image"], batch["label"]), batch["image"].shape[0])
            bar.update(1)
            if self.step.compile_seconds is not None and not self._compile_logged:
                self._compile_logged = True
                self._log_compile()
            if self.step.micro_step != 0:
                continue
            progress.step += 1
            progress.epoch_step += 1
            if progress.step % max(1, cfg.train.log_every_steps) == 0:
                self._log_train(window, bar)
            if self._reached_max_steps():
                break
            every = cfg.train.save_every_steps
            if progress.epoch_step == self.steps_per_epoch:
                continue  # the end of the epoch validates and saves, then looks for an interrupt
            saved = every > 0 and progress.step % every == 0
            if saved:
                self._save(is_best=False)
            # Between optimizer steps weights, optimizer and random streams agree: a checkpoint here
            # resumes exactly. Several processes agree on stopping at log steps (a collective).
            if (not self.ctx.is_distributed or progress.step % max(1, cfg.train.log_every_steps) == 0) and (
                self._interrupt_agreed()
            ):
                bar.close()
                if window.micro_batches:
                    self._log_train(window, bar)
                if not saved:
                    self._save(is_best=False)
                self._stop_interrupted()
        bar.close()
        if window.micro_batches:
            self._log_train(window, bar)
        if progress.epoch_step == self.steps_per_epoch:
            progress.epoch += 1
            progress.epoch_step = 0
        stopping = progress.epoch >= cfg.train.epochs or self._reached_max_steps()
        epoch_done = progress.epoch_step == 0
        # A run always ends validated, so that best.pt reflects its final weights too.
        if stopping or (epoch_done and progress.epoch % max(1, cfg.train.eval_every_epochs) == 0):
            is_best = self._validate()
        else:
            is_best = self.val_set is None
        self._save(is_best=is_best or not self.best_path.exists())
        if self._interrupt_agreed():
            self._stop_interrupted()

    def _announce_interrupt(self, signal_name: str) -> None:
        if self.ctx.is_main:
            when = "after this step" if not self.ctx.is_distributed else "at the next log step"
            if signal_name == "SIGINT":
                what, again = "interrupt", "interrupt again"
            else:
                what, again = signal_name, f"a second {signal_name}"
            tqdm.write(
                f"ivpt train: {what}: saving {self.last_path} {when}, then stopping "
                f"({again} to stop at once, without saving)",
                file=sys.stderr,
            )

    def _interrupt_agreed(self) -> bool:
        """Whether any process got an interrupt; a collective under ``torchrun`` (all ranks call it)."""
        requested = self._interrupt is not None and self._interrupt.requested
        if not self.ctx.is_distributed:
            return requested
        flag = torch.tensor([float(requested)], device=self.ctx.device)
        return all_reduce_sum(flag, self.ctx).item() > 0

    def _stop_interrupted(self) -> None:
        """Log the stop and raise :class:`TrainingInterrupted`; ``last.pt`` holds this very step."""
        step = self.progress.step
        # Under torchrun a rank may stop because another got the signal; it exits as if it were Ctrl-C.
        signum = self._interrupt.signum if self._interrupt is not None and self._interrupt.signum else signal.SIGINT
        self.logger.log(
            "interrupt", step, epoch=self.progress.epoch, checkpoint=str(self.last_path),
            signal=signal.Signals(signum).name,
        )
        if not self.ctx.is_main:
            raise TrainingInterrupted(signum=signum)  # rank 0 alone says where it saved
        raise TrainingInterrupted(
            f"saved {self.last_path} at step {step}; the same command resumes from it", signum=signum
        )

    def _log_train(self, window: _LossWindow, bar: tqdm) -> None:
        """Reduce the window's sums over ranks (the only host sync of the loop), log, reset it."""
        means, images, seconds = window.reduce(self.ctx)
        self._last_losses = means
        lrs = {
            str(group.get("name", index)): group["lr"] for index, group in enumerate(self.step.optimizer.param_groups)
        }
        record: dict[str, Any] = {
            "epoch": self.progress.epoch,
            "epoch_step": self.progress.epoch_step,
            "loss": means,
            "lr": lrs,
            "img_per_s": round(images / seconds, 2) if seconds > 0 else None,
        }
        if self.step.last_grad_norm is not None:
            record["grad_norm"] = float(self.step.last_grad_norm)
        self.logger.log("train", self.progress.step, **record)
        shown = {name: f"{value:.3f}" for name, value in means.items() if value}  # skip switched-off terms
        bar.set_postfix(shown, refresh=False)

    def _log_compile(self) -> None:
        """How long ``train.compile`` took: the first step's wall time, and torch's compile-cache hits."""
        from ivpt.engine.step import compile_cache_counts

        seconds = round(float(self.step.compile_seconds or 0.0), 2)
        self.logger.log("compile", self.progress.step, first_step_s=seconds, cache=compile_cache_counts())
        if self.ctx.is_main and self.cfg.train.progress:
            tqdm.write(f"ivpt train: compiled the backbone's blocks in the first step ({seconds:.1f} s)")

    def _validate(self) -> bool:
        """Accuracy on the validation split; returns whether it is the best so far."""
        if self.val_set is None:
            return True
        metrics = evaluate(self.model, self.cfg, ("accuracy",), self.ctx.device, split="val", ctx=self.ctx)
        self.model.train()
        accuracy = metrics["accuracy"]
        improved = self.progress.best_metric is None or accuracy > self.progress.best_metric
        if improved:
            self.progress.best_metric = accuracy
        self.logger.log(
            "val",
            self.progress.step,
            epoch=self.progress.epoch,
            **{key: metrics[key] for key in ACCURACY_KEYS},
            best=self.progress.best_metric,
        )
        return improved

    def _note(self, message: str) -> None:
        self.logger.log("note", self.progress.step, message=message)
        if self.ctx.is_main and self.cfg.train.progress:
            tqdm.write(f"ivpt train: {message}")

    # --- checkpoints -----------------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        progress = self.progress
        # Every rank's random streams, so that each one resumes where it was.
        rng = gather_objects(capture_rng_state(self.step.affine_generator), self.ctx)
        scheduler = self.step.scheduler
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "class_names": self.class_names,
            "part_names": self.part_names,
            **model_entries(self.model, self.frozen),
            "optimizer": self.step.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "scaler": self.step.scaler.state_dict(),
            "epoch": progress.epoch,
            "epoch_step": progress.epoch_step,
            "step": progress.step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.ctx.world_size,
            "rng": rng,
            "best_metric": progress.best_metric,
        }

    def _save(self, is_best: bool) -> None:
        payload = self._payload()  # a collective: every rank takes part
        if self.ctx.is_main:
            save_checkpoint(self.last_path, payload)
            written = [self.last_path.name]
            if is_best:
                save_checkpoint(self.best_path, payload)
                written.append(self.best_path.name)
            self.logger.log("checkpoint", self.progress.step, epoch=self.progress.epoch, files=written)
        barrier(self.ctx)

    def _resume(self, resume: str | None) -> Path | None:
        """Load the checkpoint ``resume`` designates, if any; returns its path."""
        if resume is None:
            return None
        path = self.last_path if resume == "auto" else Path(resume)
        if resume == "auto" and not path.exists():
            return None
        payload = read_checkpoint(path, training=True)
        stored_steps = payload.get("steps_per_epoch", self.steps_per_epoch)
        if stored_steps != self.steps_per_epoch:
            raise CheckpointError(
                f"checkpoint '{path}' was written with {stored_steps} optimizer steps per epoch, this run has "
                f"{self.steps_per_epoch}: resume with the same data, train.batch_size, train.grad_accum and "
                "number of processes, or start afresh with --no-resume"
            )
        load_model_state(self.model, payload["model"], path, frozen=payload.get("frozen"))
        try:
            self.step.optimizer.load_state_dict(payload["optimizer"])
            if self.step.scheduler is not None and payload["scheduler"]:
                scheduler_state = dict(payload["scheduler"])
                # Keep this run's schedule shape (e.g. more epochs); the counter comes from the file.
                scheduler_state["lr_lambdas"] = [None] * len(self.step.optimizer.param_groups)
                self.step.scheduler.load_state_dict(scheduler_state)
            if payload["scaler"]:
                self.step.scaler.load_state_dict(payload["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint '{path}': its optimizer state does not fit this run's parameter groups ({exc})"
            ) from None
        self.progress = Progress(
            epoch=int(payload["epoch"]),
            epoch_step=int(payload.get("epoch_step", 0)),
            step=int(payload["step"]),
            best_metric=payload["best_metric"],
        )
        rng_states = payload["rng"]
        if isinstance(rng_states, list) and len(rng_states) == self.ctx.world_size:
            restore_rng_state(rng_states[self.ctx.rank], self.step.affine_generator)
        else:
            self._note(
                f"checkpoint '{path}' holds random states for a different number of processes; "
                "continuing with fresh seeds (the run will not repeat an uninterrupted one exactly)"
            )
            seed_everything(self.cfg.train.seed + self.ctx.rank + 1_000_003 * self.progress.step)
        return path

    # --- the end ---------------------------------------------------------------------------------

    def _finish(self) -> dict[str, Any]:
        """Score ``best.pt`` on the test split (accuracy only; it chose nothing) and summarise."""
        test_accuracy = None
        # Rank 0 alone: the file may exist only on its node, and one accuracy needs no sharding.
        if self.ctx.is_main and self.cfg.train.test_at_end and self.best_path.exists():
            best = read_checkpoint(self.best_path)
            load_model_state(self.model, best["model"], self.best_path, frozen=best.get("frozen"))
            metrics = evaluate(self.model, self.cfg, ("accuracy",), self.ctx.device, split="test")
            test_accuracy = metrics["accuracy"]
            self.logger.log(
                "test",
                self.progress.step,
                checkpoint=str(self.best_path),
                checkpoint_epoch=best["epoch"],
                **{key: metrics[key] for key in ACCURACY_KEYS},
            )
        summary = {
            "final_train_loss": self._last_losses.get("total"),
            "best_val_accuracy": self.progress.best_metric,
            "test_accuracy": test_accuracy,
            "steps": self.progress.step,
            "epochs": self.progress.epoch,
            "out_dir": str(self.out_dir),
            "last_checkpoint": str(self.last_path),
            "best_checkpoint": str(self.best_path),
            "log": str(self.logger.path),
        }
        self.logger.log("end", self.progress.step, **summary)
        barrier(self.ctx)
        return summary


class _LossWindow:
    """Loss terms summed on the device between two log lines (no host sync until :meth:`reduce`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.sums: Tensor | None = None
        self.micro_batches = 0
        self.images = 0
        self.started = time.perf_counter()

    def add(self, terms: dict[str, Tensor], images: int) -> None:
        values = torch.stack([value.float() for value in terms.values()])
        if self.sums is None:
            self.names = list(terms)
            self.sums = torch.zeros_like(values)
        self.sums += values
        self.micro_batches += 1
        self.images += images

    def reduce(self, ctx: DistributedContext) -> tuple[dict[str, float], int, float]:
        """Mean of every term over the window and all ranks, images seen by all ranks, seconds; resets."""
        assert self.sums is not None
        packed = torch.cat([self.sums, self.sums.new_tensor([self.micro_batches, self.images])])
        all_reduce_sum(packed, ctx)
        totals = packed.tolist()
        micro_batches, images = totals[-2], int(totals[-1])
        means = {name: _finite(value / micro_batches) for name, value in zip(self.names, totals[:-2], strict=True)}
        seconds = time.perf_counter() - self.started
        self.sums.zero_()
        self.micro_batches = 0
        self.images = 0
        self.started = time.perf_counter()
        return means, images, seconds


def _finite(value: float) -> float | None:
    # JSON has no NaN/inf; a diverged run shows null, which is easy to spot.
    return value if math.isfinite(value) else None


__all__ = ["Progress", "Trainer", "train", "train_loader"]
