"""One training step, shared by ``ivpt train`` and ``ivpt bench``.

:class:`TrainStep` is everything the trainer does per micro-batch: the equivariance warp, the forward
passes of the original and the transformed batch, all loss terms, the backward pass, and on the last
micro-batch of an accumulation group the gradient unscaling, clipping, optimizer step and
learning-rate step. It never copies a value to the host (no ``.item()``), so a GPU can run ahead; the
trainer adds the returned loss tensors up on the device and reads them only at log intervals.
(With fp16 the :class:`torch.amp.GradScaler` itself checks the gradients for infinities on the host:
that is inherent to loss scaling.)

The transformed batch only feeds the equivariance loss, whose gradient reaches nothing but the stage
prototypes and spatial biases (concept maps are computed from detached features). Models that offer
``forward_without_backbone_grad`` (IVPT and the prototype baselines) therefore run it as a second pass
that stores no backbone activations and needs no backward through the blocks; in one ``2B`` autograd
forward the backward would run over both halves although the transformed half's gradient is zero.
Other models get the original and the transformed batch in one ``2B`` forward.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ivpt.config import Config
from ivpt.engine.schedule import build_scheduler, lr_scale

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Baselines whose output has no concept maps: the equivariance loss has nothing to compare, so the
# transformed half of the batch would be wasted work.
METHODS_WITHOUT_MAPS = frozenset({"vpt_shallow", "vpt_deep", "linear_probe"})


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``"bf16"`` / ``"fp16"`` on ``device``; a no-op for ``"fp32"``."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_blocks(model: nn.Module) -> int:
    """:func:`torch.compile` every transformer block of ``model.backbone`` in place; returns their number.

    Compiling the blocks rather than the whole model ("regional compilation") keeps the prototype stages,
    losses and metrics eager and compiles one graph that all the blocks share (they run the same code on
    weights of the same shapes), so compiling takes about as long for 12 blocks as for one. Prompted
    blocks see longer token sequences, which makes torch recompile that graph once with a dynamic length.
    Compiled kernels are cached on disk by torch (``TORCHINDUCTOR_CACHE_DIR``, by default
    ``/tmp/torchinductor_$USER``), so later runs with the same shapes load them instead of compiling.
    """
    bare = model.module if isinstance(model, DistributedDataParallel) else model
    blocks = bare.backbone.blocks
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_cache_counts() -> dict[str, int]:
    """Hits and misses of torch's on-disk compile caches (inductor's FX graphs, AOTAutograd) in this process."""
    from torch._dynamo.utils import counters

    inductor, autograd = counters["inductor"], counters["aot_autograd"]
    return {
        "hits": int(inductor["fxgraph_cache_hit"] + autograd["autograd_cache_hit"]),
        "misses": int(inductor["fxgraph_cache_miss"] + autograd["autograd_cache_miss"]),
    }


def uses_equivariance(cfg: Config) -> bool:
    """Whether training runs the second, transformed pass (the equivariance loss is on and can apply)."""
    return cfg.loss.equivariance > 0 and cfg.model.method not in METHODS_WITHOUT_MAPS


class TrainStep:
    """A callable that trains on one micro-batch: ``step(images, labels) -> loss terms``.

    Args:
        model: the model to train, or its :class:`DistributedDataParallel` wrapper (non-final micro-batches
            of an accumulation group then skip the gradient all-reduce).
        criterion: ``criterion(out, labels, transformed=..., affine=...) -> dict`` of fp32 scalar terms
            including ``"total"``.
        optimizer: over the trainable parameters.
        scheduler: stepped after every optimizer step (``None``: constant learning rate).
        scaler: fp16 gradient scaler (``None``: a disabled one, i.e. plain backward and step).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast of the forward pass; losses stay fp32.
        grad_accum: micro-batches per optimizer step; each contributes ``1 / grad_accum`` of the gradient.
        grad_clip: maximum total gradient norm (0: no clipping).
        affine_generator: generator on the model's device that draws the equivariance transforms;
            ``None`` turns the transformed pass off.
        compile: :func:`torch.compile` each transformer block of the model's backbone (in place, see
            :func:`compile_blocks`); the first call then compiles, and :attr:`compile_seconds` says how long
            it took.
        joint_transformed_pass: run the transformed batch in the same ``2B`` autograd forward as the
            original even when the model offers ``forward_without_backbone_grad`` (the same gradients,
            more work; for comparisons).
        normalize: applied to every batch of images once it is on the model's device (e.g. a data set's
            ``transform.normalize``: the ``uint8`` images of a data loader -> the model's input); ``None``:
            the images are fed as they come.

    Attributes:
        micro_step: micro-batches accumulated towards the next optimizer step.
        optimizer_steps: optimizer steps taken by this object.
        last_grad_norm: ``()`` tensor, the gradient norm before clipping at the last optimizer step
            (``None`` before the first step or without clipping).
        compile_seconds: with ``compile``, the wall time of the first call (compilation and that step's
            own work); ``None`` before it and without ``compile``.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., dict[str, Tensor]],
        optimizer: Optimizer,
        scheduler: LRScheduler | None = None,
        scaler: torch.amp.GradScaler | None = None,
        *,
        precision: str = "fp32",
        grad_accum: int = 1,
        grad_clip: float = 0.0,
        affine_generator: torch.Generator | None = None,
        compile: bool = False,
        joint_transformed_pass: bool = False,
        normalize: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = next(model.parameters()).device
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.precision = precision
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.affine_generator = affine_generator
        self.normalize = normalize
        self.forward = model
        # The transformed pass goes through the bare module even under DDP: its outputs carry gradient
        # only to parameters the main pass uses as well, so autograd accumulates each of them once and
        # DDP's hooks see one gradient per parameter, as without the second pass.
        bare = model.module if isinstance(model, DistributedDataParallel) else model
        view_forward = None if joint_transformed_pass else getattr(bare, "forward_without_backbone_grad", None)
        self.forward_transformed: Callable[[Tensor], Any] | None = view_forward
        self.compile_seconds: float | None = None
        self._time_first_call = compile
        if compile:
            compile_blocks(bare)
        self.trainable = [p for group in optimizer.param_groups for p in group["params"]]
        self.micro_step = 0
        self.optimizer_steps = 0
        self.last_grad_norm: Tensor | None = None

    def __call__(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Train on ``images (B, 3, H, W)`` with ``labels (B,)``; returns the detached loss terms (fp32 ``()``).

        ``images`` are copied to the model's device, then go through :attr:`normalize` (when set).
        """
        if self._time_first_call:
            self._time_first_call = False
            synchronize(self.device)
            start = time.perf_counter()
            terms = self(images, labels)
            synchronize(self.device)
            self.compile_seconds = time.perf_counter() - start
            return terms
        images = images.to(self.device, non_blocking=True)
        if self.normalize is not None:
            images = self.normalize(images)
        labels = labels.to(self.device, non_blocking=True)
        closes_group = self.micro_step + 1 == self.grad_accum
        skip_sync = not closes_group and isinstance(self.model, DistributedDataParallel)
        with self.model.no_sync() if skip_sync else contextlib.nullcontext():
            terms = self.losses(images, labels)
            self.scaler.scale(terms["total"] / self.grad_accum).backward()
        self.micro_step += 1
        if closes_group:
            self._apply_gradients()
        return {name: value.detach() for name, value in terms.items()}

    def losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Forward pass(es) and loss terms, with autograd, without backward."""
        theta = transformed = None
        batch = images.shape[0]
        if self.affine_generator is not None:
            from ivpt.losses import sample_affine, warp_images

            theta = sample_affine(self.affine_generator, self.device)
            transformed = warp_images(images, theta)
        with autocast_context(self.device, self.precision):
            if transformed is None:
                out, out_transformed = self.forward(images), None
            elif self.forward_transformed is not None:
                # First: its transient activations are freed before the main pass stores its own.
                out_transformed = self.forward_transformed(transformed)
                out = self.forward(images)
            else:
                out, out_transformed = self.forward(torch.cat([images, transformed])).split(batch)
        # Outside autocast: the criterion computes every term in fp32.
        return self.criterion(out, labels, transformed=out_transformed, affine=theta)

    def _apply_gradients(self) -> None:
        if self.grad_clip > 0:
            # Clip the true gradients: under fp16 they are still multiplied by the loss scale here.
            self.scaler.unscale_(self.optimizer)
            self.last_grad_norm = nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            with warnings.catch_warnings():
                # The fp16 scaler skips optimizer steps with overflowing gradients; the schedule still
                # advances (it counts attempted steps), which torch would otherwise warn about.
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_step = 0
        self.optimizer_steps += 1


def build_optimizer(model: nn.Module, cfg: Config, global_batch: int) -> Adam:
    """Adam over :func:`ivpt.model.param_groups`, every group's rate scaled by :func:`lr_scale`."""
    from ivpt.model import param_groups

    scale = lr_scale(cfg.optim, global_batch)
    groups: list[dict[str, Any]] = []
    for group in param_groups(model, cfg.optim, cfg.model.freeze):
        group = dict(group)
        group["lr"] = group["lr"] * scale
        groups.append(group)
    return Adam(groups, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)


def build_train_step(
    model: nn.Module,
    cfg: Config,
    steps_per_epoch: int,
    *,
    world_size: int = 1,
    rank: int = 0,
    distributed_model: nn.Module | None = None,
    criterion: Callable[..., dict[str, Tensor]] | None = None,
    joint_transformed_pass: bool = False,
    normalize: Callable[[Tensor], Tensor] | None = None,
) -> TrainStep:
    """The training step ``cfg`` describes for ``model`` (which must already be on its device).

    Builds the criterion, the Adam optimizer over the parameter groups, the per-step learning-rate
    schedule, the fp16 gradient scaler and the affine generator (seeded with ``train.seed + rank``).

    Args:
        model: the bare model (parameter groups are read from it).
        cfg: the run's config.
        steps_per_epoch: optimizer steps per epoch, to place the epoch-based schedule on steps.
        world_size, rank: this process's place in a distributed job (for lr scaling and seeding).
        distributed_model: ``model`` wrapped in :class:`DistributedDataParallel`, used for the forward.
        criterion: replaces the default ``IVPTCriterion(cfg.loss)``.
        joint_transformed_pass, normalize: see :class:`TrainStep` (the trainer passes its training set's
            ``transform.normalize``: its batches hold ``uint8`` images).
    """
    device = next(model.parameters()).device
    if criterion is None:
        from ivpt.losses import IVPTCriterion

        criterion = IVPTCriterion(cfg.loss)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world_size
    optimizer = build_optimizer(model, cfg, global_batch)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    generator = None
    if uses_equivariance(cfg):
        generator = torch.Generator(device=device).manual_seed(cfg.train.seed + rank)
    return TrainStep(
        distributed_model if distributed_model is not None else model,
        criterion,
        optimizer,
        scheduler,
        scaler,
        precision=cfg.train.precision,
        grad_accum=cfg.train.grad_accum,
        grad_clip=cfg.optim.grad_clip,
        affine_generator=generator,
        compile=cfg.train.compile,
        joint_transformed_pass=joint_transformed_pass,
        normalize=normalize,
    )


__all__ = [
    "AUTOCAST_DTYPES",
    "METHODS_WITHOUT_MAPS",
    "TrainStep",
    "autocast_context",
    "build_optimizer",
    "build_train_step",
    "compile_blocks",
    "compile_cache_counts",
    "synchronize",
    "uses_equivariance",
]
