"""``ivpt bench``: time a training step or inference against the bare backbone's own cost.

The *bound* is what any IVPT step has to pay for the backbone alone, measured in the same process, on
the same backbone object and the same inputs:

- ``train-step``: one forward with autograd on (the position embedding and prefix tokens train, the
  blocks are frozen), one forward of a second (transformed) batch without autograd, and one backward
  through the frozen blocks;
- ``eval``: one forward without autograd.

The step is everything the trainer does (:class:`ivpt.engine.step.TrainStep`: both passes, every loss
term, backward, clipping, the optimizer and the schedule), or the model's forward in eval mode.
``ratio = ms_per_step / bound_ms_per_step``; both are medians over ``steps`` timed calls after
``warmup`` untimed ones, the two alternating call by call so that a busy neighbour or drifting clocks
affect both alike.

The benchmarks that read a data set (``loader``, ``train``, ``eval-metrics``) are in :mod:`ivpt.bench.data`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ivpt.config import Config, apply_overrides, validate
from ivpt.engine.step import AUTOCAST_DTYPES, autocast_context, compile_blocks, compile_cache_counts, synchronize
from ivpt.errors import IVPTError

__all__ = [
    "BENCH_CLASSES",
    "MODES",
    "all_finite",
    "backbone_eval_bound",
    "backbone_train_bound",
    "bench_config",
    "check_arguments",
    "run_bench",
]

MODES: tuple[str, ...] = ("train-step", "eval")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
# CUB-200's class count: the classifier is the only layer whose size depends on it.
BENCH_CLASSES = 200


def _timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _process_peak_rss_gb() -> float | None:
    """Peak resident memory of this process in GB; ``None`` where the OS has no ``resource`` module (Windows)."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    scale = 1e9 if sys.platform == "darwin" else 1e6  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def backbone_train_bound(
    backbone: nn.Module, images: Tensor, transformed: Tensor, precision: str
) -> Callable[[], None]:
    """The training bound as a callable: forward with autograd, forward of ``transformed``, backward.

    Args:
        backbone: timm ViT with only its tokens and position embedding trainable.
        images, transformed: ``(B, 3, H, W)`` the original and the transformed batch.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast, as for the step.
    """
    device = images.device
    trainable = [p for p in backbone.parameters() if p.requires_grad]

    def step() -> None:
        with autocast_context(device, precision):
            with torch.no_grad():
                backbone.forward_features(transformed)
            features = backbone.forward_features(images)
        features.float().mean().backward()
        for parameter in trainable:
            parameter.grad = None

    return step


def backbone_eval_bound(backbone: nn.Module, images: Tensor, precision: str) -> Callable[[], None]:
    """The inference bound as a callable: one forward of ``images (B, 3, H, W)`` in inference mode."""

    def step() -> None:
        with torch.inference_mode(), autocast_context(images.device, precision):
            backbone.forward_features(images)

    return step


def bench_config(
    arch: str,
    img_size: int,
    batch: int,
    precision: str,
    device: str,
    compile: bool,
    method: str,
    n_pro: tuple[int, ...] | None = None,
    backbone_args: dict[str, Any] | None = None,
) -> Config:
    """The config of a benchmark run: randomly initialised weights, the default loss and optimizer."""
    cfg = Config()
    overrides = [
        f"model.arch={arch}",
        f"model.img_size={img_size}",
        f"model.method={method}",
        "model.pretrained=false",
        f"train.batch_size={batch}",
        f"train.precision={precision}",
        f"train.device={device}",
        f"train.compile={str(compile).lower()}",
        "train.progress=false",
    ]
    apply_overrides(cfg, overrides)
    if n_pro is not None:
        cfg.model.n_pro = tuple(int(k) for k in n_pro)
    if backbone_args:
        cfg.model.backbone_args = dict(backbone_args)
    validate(cfg)
    return cfg


def check_arguments(
    mode: str, precision: str, device: str, batch: int, steps: int, warmup: int, modes: tuple[str, ...] = MODES
) -> None:
    """Raise a one-line :class:`IVPTError` for a mode outside ``modes``, a bad precision, device or count."""
    if mode not in modes:
        raise IVPTError(f"bench: unknown mode '{mode}' (expected one of {', '.join(modes)})")
    if precision not in AUTOCAST_DTYPES:
        raise IVPTError(f"bench --precision: expected one of {', '.join(AUTOCAST_DTYPES)}, got '{precision}'")
    if device not in DEVICES:
        raise IVPTError(f"bench --device: expected one of {', '.join(DEVICES)}, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise IVPTError("bench --device cuda: no CUDA device is visible to torch")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is not None and not torch.amp.is_autocast_available(device):
        raise IVPTError(f"bench --precision {precision}: this torch has no autocast on '{device}'")
    for name, value, minimum in (("--batch", batch, 1), ("--steps", steps, 1), ("--warmup", warmup, 0)):
        if value < minimum:
            raise IVPTError(f"bench {name}: must be >= {minimum}, got {value}")


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every value of every tensor is finite."""
    # One host read after the timing, never inside a timed call.
    return bool(torch.stack([torch.isfinite(t.float()).all() for t in tensors]).all())


def run_bench(
    mode: str,
    arch: str = "vit_small_patch16_224",
    img_size: int = 224,
    batch: int = 8,
    precision: str = "fp32",
    device: str = "cpu",
    compile: bool = False,
    method: str = "ivpt",
    steps: int = 10,
    warmup: int = 3,
    n_pro: tuple[int, ...] | None = None,
    *,
    backbone_args: dict[str, Any] | None = None,
    joint_transformed_pass: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``mode`` (``"train-step"`` or ``"eval"``) and its bound; return the fields of the JSON line.

    Args:
        mode: ``"train-step"`` or ``"eval"``.
        arch, img_size, method, n_pro, backbone_args: the model (``backbone_args`` for tiny test nets).
        batch: images per step ``B``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast.
        device: ``"cpu"`` or ``"cuda"``.
        compile: :func:`torch.compile` the backbone's blocks in place (:func:`ivpt.engine.step.compile_blocks`),
            which the model and the bound share.
        steps, warmup: timed and untimed calls of each of the step and the bound.
        joint_transformed_pass: train on the original and transformed batch in one ``2B`` autograd
            forward instead of a second pass without backbone autograd (for comparisons).
        seed: seed of the weights, the inputs and the affine draws.

    Returns:
        ``mode, method, arch, img_size, batch, precision, device, compile, ms_per_step, img_per_s,
        bound_ms_per_step, ratio, finite`` and ``peak_mem_gb`` with ``bound_peak_mem_gb`` (CUDA: peak
        allocated memory of the step and of the bound) or ``peak_rss_gb`` (CPU: the process's peak
        resident memory). ``finite`` tells whether every loss term and trainable parameter (train) or
        every logit (eval) stayed finite. ``compile_s``: seconds the first calls of the step and the bound
        took beyond their timed medians (compilation), ``compile_cache``: hits and misses of torch's
        on-disk compile caches (:func:`ivpt.engine.step.compile_cache_counts`); both ``None`` without
        ``compile``.

    Raises:
        IVPTError: a bad mode, precision, device or count, or a config error of the model.
    """
    from ivpt.engine.step import build_train_step
    from ivpt.losses import sample_affine, warp_images
    from ivpt.model import build_model

    check_arguments(mode, precision, device, batch, steps, warmup)
    dev = torch.device(device)
    cfg = bench_config(arch, img_size, batch, precision, device, compile, method, n_pro, backbone_args)
    torch.manual_seed(seed)
    model = build_model(cfg, BENCH_CLASSES).to(dev)
    # The bound runs the model's own backbone: the same weights, trainable flags and memory layout.
    backbone = model.backbone
    generator = torch.Generator(device=dev).manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, device=dev, generator=generator)
    labels = torch.randint(0, BENCH_CLASSES, (batch,), device=dev, generator=generator)
    transformed = warp_images(images, sample_affine(generator, dev))

    watched: list[Tensor] = []
    if mode == "train-step":
        model.train()
        bound_fn = backbone_train_bound(backbone, images, transformed, precision)
        train_step = build_train_step(
            model, cfg, steps_per_epoch=steps + warmup, joint_transformed_pass=joint_transformed_pass
        )

        def model_fn() -> None:
            watched[:] = list(train_step(images, labels).values())

        def final_check() -> list[Tensor]:
            return [*watched, *train_step.trainable]
    else:
        model.eval()
        if compile:
            compile_blocks(model)
        bound_fn = backbone_eval_bound(backbone, images, precision)

        def model_fn() -> None:
            with torch.inference_mode(), autocast_context(dev, precision):
                watched[:] = [model(images).logits]

        def final_check() -> list[Tensor]:
            return watched

    compile_s = None
    if compile:
        # The blocks compile on the first call of each (the bound shares them); the rest is one step's work.
        first_call_ms = _timed_ms(bound_fn, dev) + _timed_ms(model_fn, dev)
    for _ in range(warmup):
        bound_fn()
        model_fn()
    bound_times: list[float] = []
    model_times: list[float] = []
    bound_peak = model_peak = 0.0
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        bound_times.append(_timed_ms(bound_fn, dev))
        if dev.type == "cuda":
            bound_peak = max(bound_peak, torch.cuda.max_memory_allocated(dev) / 1e9)
            torch.cuda.reset_peak_memory_stats(dev)
        model_times.append(_timed_ms(model_fn, dev))
        if dev.type == "cuda":
            model_peak = max(model_peak, torch.cuda.max_memory_allocated(dev) / 1e9)

    ms = statistics.median(model_times)
    bound = statistics.median(bound_times)
    if compile:
        compile_s = round(max(0.0, first_call_ms - ms - bound) / 1e3, 2)
    result: dict[str, Any] = {
        "mode": mode,
        "method": method,
        "arch": arch,
        "img_size": img_size,
        "batch": batch,
        "precision": precision,
        "device": device,
        "compile": compile,
        "ms_per_step": round(ms, 2),
        "img_per_s": round(batch / ms * 1e3, 1),
        "bound_ms_per_step": round(bound, 2),
        "ratio": round(ms / bound, 3),
        "finite": all_finite(final_check()),
        "compile_s": compile_s,
        "compile_cache": compile_cache_counts() if compile else None,
    }
    if dev.type == "cuda":
        result.update(peak_mem_gb=round(model_peak, 3), bound_peak_mem_gb=round(bound_peak, 3))
    elif (peak_rss := _process_peak_rss_gb()) is not None:
        result["peak_rss_gb"] = round(peak_rss, 3)
    return result
