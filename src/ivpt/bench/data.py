"""``ivpt bench loader | train | eval-metrics``: the real data path and ``ivpt eval`` against their bounds.

``loader``
    The training split's samples as the trainer's loader workers draw them
    (:meth:`ivpt.engine.rng.SeededSamples.draw`: seed, decode, plan, resize, warp, ``uint8`` tensor,
    keypoints, box; the training step normalises whole batches on the device), one at a time in this
    process, against the *loader bound*: the same file decoded, resized and warped to the same geometry
    with the same library (PIL), nothing else. There are two bounds:
    ``full_decode_bound_ms`` decodes every JPEG at full size, ``bound_ms`` decodes it at 1/2, 1/4 or 1/8
    scale wherever the resize shrinks it that much (libjpeg's DCT scaling: the faster decoder). The sample
    and the two bounds alternate image by image, each going first in turn, ``rounds`` times over
    ``samples`` images; ``ratio = getitem_ms / bound_ms`` is the median of the rounds' ratios. These times
    are CPU time of the calling thread (``time.thread_time``; every library call involved runs on it), so
    that on a shared machine the time spent waiting for a core does not count: what a worker with a core
    of its own would take. Then the trainer's own :class:`~torch.utils.data.DataLoader` (``workers``
    processes, pinned memory on CUDA) runs alone: ``img_per_s`` and ``img_per_s_per_worker``.
``train``
    The training step fed by that loader (``img_per_s``) against the same step on one batch held in
    memory (``step_img_per_s``); ``ratio = ms per step end to end / ms per step alone`` (1.0: the data
    path costs the step nothing), ``data_wait_ms``: how long each step waited for its batch.
``eval-metrics``
    :func:`ivpt.engine.evaluate.evaluate` with every metric, against the backbone forwards its passes
    need, one per image and pass (``passes``): the scored split, the two faithfulness removals, the
    box crops, their noisy copies, the training split for the KPR regressors. The bound is
    ``forward_images`` times one image's share of a backbone forward of a batch of ``batch`` images.

Timings alternate between what is measured and its bound (``rounds`` times), so that a busy neighbour
or drifting clocks affect both alike; ``ratio_spread`` is the smallest and largest ratio of the rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ivpt.bench import all_finite, bench_config, check_arguments
from ivpt.config import Config, apply_overrides, validate
from ivpt.engine.step import autocast_context, compile_blocks, compile_cache_counts, synchronize
from ivpt.errors import IVPTError

__all__ = ["DATA_MODES", "loader_bound", "run_eval_bench", "run_loader_bench", "run_train_bench"]

DATA_MODES: tuple[str, ...] = ("loader", "train", "eval-metrics")
# The result key of ``evaluate`` that is not null when a metric ran.
_HEADLINE_KEY = {
    "accuracy": "accuracy",
    "consistency": "consistency",
    "stability": "stability",
    "part_discovery": "nmi",
    "kpr": "kpr",
    "fg_iou": "fg_iou",
    "faithfulness": "faithfulness",
}


def _data_overrides(data: str | Path, dataset: str, workers: int | None, augment: str | None) -> list[str]:
    overrides = [f"data.root={data}", f"data.dataset={dataset}"]
    if workers is not None:
        if workers < 0:
            raise IVPTError(f"bench --workers: must be >= 0, got {workers}")
        overrides.append(f"data.num_workers={workers}")
    if augment is not None:
        overrides.append(f"data.augment={augment}")
    return overrides


def _timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds of one call of ``fn`` (with ``device``'s queue drained before and after)."""
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    fn()
    if device is not None:
        synchronize(device)
    return time.perf_counter() - start


def _cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU seconds this thread spends in one call of ``fn``: time waiting for a busy core does not count."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def _process_cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU seconds of all of this process's threads during one call of ``fn``."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def _spread(ratios: list[float]) -> list[float]:
    return [round(min(ratios), 3), round(max(ratios), 3)]


# --- loader --------------------------------------------------------------------------------------------


def loader_bound(path: Path, plan: Any, draft: bool) -> Callable[[], Image.Image]:
    """What a sample's pixels cost at least with PIL: decode ``path``, one resize and one affine warp.

    Args:
        path: the image file.
        plan: the sample's :class:`ivpt.data.transforms.GeometryPlan` (its resize and remainder).
        draft: decode a JPEG at 1/2, 1/4 or 1/8 scale where the resize allows it (PIL's ``draft``).

    Returns:
        A callable doing the work, returning the ``S x S`` image; the warp's coefficients are computed
        beforehand.
    """
    from ivpt.data.images import jpeg_reduction
    from ivpt.data.transforms import translation_matrix

    side = plan.output_size
    inverse = translation_matrix(0.5, 0.5) @ np.linalg.inv(plan.remainder) @ translation_matrix(-0.5, -0.5)
    coefficients = tuple(float(v) for v in inverse[:2].reshape(-1))
    limit = plan.max_reduction if draft else 1.0

    def run() -> Image.Image:
        with Image.open(path) as image:
            reduction, (width, height) = 1, image.size
            if image.format == "JPEG":
                factor = jpeg_reduction(limit, (width, height))
                if factor > 1:
                    drafted = image.draft("RGB", (width // factor, height // factor))
                    reduction = round(width / drafted[1][2]) if drafted is not None else 1
            image.load()
            box = tuple(v / reduction for v in plan.source_box)
            resized = image.resize(plan.resized_size, Image.Resampling.BILINEAR, box=box)
        return resized.transform(
            (side, side), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR, fillcolor=0
        )

    return run


def _epochs(loader: Any, sampler: Any) -> Iterator[dict[str, Any]]:
    """The loader's batches epoch after epoch, as the trainer draws them (a new shuffle each epoch)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _loader_config(
    data: str | Path, dataset: str, img_size: int, batch: int, workers: int | None, augment: str | None, seed: int
) -> Config:
    cfg = Config()
    apply_overrides(
        cfg,
        [
            *_data_overrides(data, dataset, workers, augment),
            f"model.img_size={img_size}",
            f"train.batch_size={batch}",
            f"train.seed={seed}",
        ],
    )
    validate(cfg)
    return cfg


def run_loader_bench(
    data: str | Path,
    dataset: str = "cub",
    img_size: int = 224,
    batch: int = 16,
    workers: int | None = None,
    augment: str | None = None,
    device: str = "cpu",
    steps: int = 10,
    warmup: int = 2,
    samples: int = 32,
    rounds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the training split's data path against the loader bound, then the trainer's loader alone.

    Args:
        data, dataset: the data set (``data.root``, ``data.dataset``).
        img_size: output side ``S``.
        batch: the loader's batch size.
        workers: loader processes (default ``data.num_workers``); 0 loads in this process.
        augment: ``data.augment`` (default ``"paper"``).
        device: ``"cuda"`` pins the batches' memory, as the trainer does.
        steps, warmup: timed and untimed batches of the loader.
        samples: images of the in-process comparison (the first ones of the split).
        rounds: passes of the in-process comparison over those images.
        seed: the run's seed (each sample's augmentation is seeded from it, as in training).

    Returns:
        The JSON line's fields (see the module docstring): ``mode, dataset, img_size, augment, batch,
        workers, device, images, samples, draft_fraction`` (the fraction of the samples a reduced decode
        served), ``getitem_ms, bound_ms, full_decode_bound_ms, ratio, ratio_spread, full_decode_ratio,
        img_per_s, img_per_s_per_worker``.
    """
    from ivpt.data import build_dataset
    from ivpt.data.images import jpeg_reduction
    from ivpt.engine.distributed import DistributedContext
    from ivpt.engine.rng import EpochSampler, SeededSamples, sample_seed
    from ivpt.engine.trainer import train_loader

    check_arguments("loader", "fp32", device, batch, steps, warmup, modes=DATA_MODES)
    for name, value in (("--samples", samples), ("--rounds", rounds)):
        if value < 1:
            raise IVPTError(f"bench {name}: must be >= 1, got {value}")
    cfg = _loader_config(data, dataset, img_size, batch, workers, augment, seed)
    train_set = build_dataset(cfg, "train")
    if len(train_set) < batch:
        raise IVPTError(f"bench --batch {batch}: the training split of '{data}' has only {len(train_set)} images")

    # --- one sample at a time, against the bounds
    seeded = SeededSamples(train_set, seed)
    chosen = list(range(min(samples, len(train_set))))
    fast_bounds, full_bounds, reduced = [], [], 0
    for index in chosen:
        path = train_set.image_path(index)
        with Image.open(path) as image:
            size, is_jpeg = image.size, image.format == "JPEG"
        # The sample's own random choices: SeededSamples seeds torch's generator with the same number.
        generator = torch.Generator().manual_seed(sample_seed(seed, 0, index))
        plan = train_set.transform.plan(*size, None, generator)
        fast_bounds.append(loader_bound(path, plan, draft=cfg.data.jpeg_draft))
        full_bounds.append(loader_bound(path, plan, draft=False))
        reduced += int(cfg.data.jpeg_draft and is_jpeg and jpeg_reduction(plan.max_reduction, size) > 1)
    rows: list[tuple[float, float, float]] = []
    for round_index in range(rounds + 1):
        totals = [0.0, 0.0, 0.0]  # the sample, the bound, the full-decode bound
        for position, index in enumerate(chosen):
            calls = [lambda index=index: seeded.draw(index, 0), fast_bounds[position], full_bounds[position]]
            # Whichever runs first on an image reads its file cold: each goes first in turn.
            for which in np.roll(np.arange(3), position + round_index):
                totals[which] += _cpu_seconds(calls[which])
        if round_index > 0:  # the first round warms the file cache and the allocator
            rows.append((totals[0] / len(chosen), totals[1] / len(chosen), totals[2] / len(chosen)))
    getitem_ms = statistics.median(r[0] for r in rows) * 1e3
    bound_ms = statistics.median(r[1] for r in rows) * 1e3
    full_ms = statistics.median(r[2] for r in rows) * 1e3
    ratios = [r[0] / r[1] for r in rows]
    full_ratios = [r[0] / r[2] for r in rows]

    # --- the trainer's loader alone
    dev = torch.device(device)
    sampler = EpochSampler(len(train_set), seed, shuffle=True)
    loader = train_loader(cfg, train_set, sampler, DistributedContext(device=dev))
    batches = _epochs(loader, sampler)
    for _ in range(warmup):
        next(batches)
    seconds = _timed(lambda: [next(batches) for _ in range(steps)])
    batches.close()  # shuts the loader's workers down
    img_per_s = steps * batch / seconds
    workers_used = cfg.data.num_workers
    return {
        "mode": "loader",
        "dataset": dataset,
        "img_size": img_size,
        "augment": cfg.data.augment,
        "batch": batch,
        "workers": workers_used,
        "device": device,
        "images": len(train_set),
        "samples": len(chosen),
        "draft_fraction": round(reduced / len(chosen), 3),
        "getitem_ms": round(getitem_ms, 4),
        "bound_ms": round(bound_ms, 4),
        "full_decode_bound_ms": round(full_ms, 4),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_spread": _spread(ratios),
        "full_decode_ratio": round(statistics.median(full_ratios), 3),
        "img_per_s": round(img_per_s, 1),
        "img_per_s_per_worker": round(img_per_s / max(1, workers_used), 1),
    }


# --- train end to end ----------------------------------------------------------------------------------


def _run_fields(mode: str, dataset: str, model_args: tuple[Any, ...], cfg: Config) -> dict[str, Any]:
    """The first fields of a ``train`` or ``eval-metrics`` line: what ran, on what, how."""
    arch, img_size, batch, precision, device, compile, method, *_ = model_args
    return {
        "mode": mode,
        "dataset": dataset,
        "method": method,
        "arch": arch,
        "img_size": img_size,
        "batch": batch,
        "precision": precision,
        "device": device,
        "compile": compile,
        "workers": cfg.data.num_workers,
    }


def _model_config(model_args: tuple[Any, ...], rounds: int, overrides: list[str]) -> Config:
    """:func:`ivpt.bench.bench_config` of ``model_args`` (its arguments, then ``pretrained``), with ``overrides``."""
    if rounds < 1:
        raise IVPTError(f"bench --rounds: must be >= 1, got {rounds}")
    *config_args, pretrained = model_args
    cfg = bench_config(*config_args)
    apply_overrides(cfg, overrides)
    cfg.model.pretrained = pretrained
    validate(cfg)
    return cfg


def run_train_bench(
    data: str | Path,
    dataset: str = "cub",
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
    workers: int | None = None,
    augment: str | None = None,
    rounds: int = 2,
    *,
    backbone_args: dict[str, Any] | None = None,
    pretrained: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Time training steps fed by the trainer's data loader against the same step on a batch in memory.

    Args:
        data, dataset, workers, augment: the data path, as for :func:`run_loader_bench`.
        arch, img_size, batch, precision, device, compile, method, n_pro, backbone_args: as for
            :func:`ivpt.bench.run_bench`; ``pretrained`` loads the arch's weights (they must be local,
            e.g. the shipped ``ivpt_demo_vit``).
        steps, warmup: timed steps per block and untimed steps before the first block.
        rounds: blocks of each kind, alternating (step alone, then end to end).
        seed: seed of the weights, the data order and the augmentation.

    Returns:
        The JSON line's fields: ``mode, dataset, method, arch, img_size, batch, precision, device, compile,
        workers, augment, ms_per_step, img_per_s, step_ms_per_step, step_img_per_s, ratio, ratio_spread,
        data_wait_ms, finite, compile_s, compile_cache``.
    """
    from ivpt.data import build_dataset
    from ivpt.engine.distributed import DistributedContext
    from ivpt.engine.rng import EpochSampler
    from ivpt.engine.step import build_train_step
    from ivpt.engine.trainer import train_loader
    from ivpt.model import build_model

    check_arguments("train", precision, device, batch, steps, warmup, modes=DATA_MODES)
    dev = torch.device(device)
    model_args = (arch, img_size, batch, precision, device, compile, method, n_pro, backbone_args, pretrained)
    cfg = _model_config(model_args, rounds, [*_data_overrides(data, dataset, workers, augment), f"train.seed={seed}"])
    train_set = build_dataset(cfg, "train")
    sampler = EpochSampler(len(train_set), seed, shuffle=True)
    steps_per_epoch = len(sampler) // batch
    if steps_per_epoch < 1:
        raise IVPTError(f"bench --batch {batch}: the training split of '{data}' has only {len(train_set)} images")
    torch.manual_seed(seed)
    model = build_model(cfg, train_set.num_classes).to(dev).train()
    train_step = build_train_step(model, cfg, steps_per_epoch, normalize=train_set.transform.normalize)
    loader = train_loader(cfg, train_set, sampler, DistributedContext(device=dev))
    batches = _epochs(loader, sampler)
    held = next(batches)
    terms: dict[str, Tensor] = {}
    waited = 0.0

    def fed_steps() -> None:
        nonlocal terms, waited
        for _ in range(steps):
            start = time.perf_counter()
            batch_now = next(batches)
            waited += time.perf_counter() - start
            terms = train_step(batch_now["image"], batch_now["label"])

    def held_steps() -> None:
        nonlocal terms
        for _ in range(steps):
            terms = train_step(held["image"], held["label"])

    terms = train_step(held["image"], held["label"])  # compiles with train.compile
    compile_s = train_step.compile_seconds
    for _ in range(warmup):
        batch_now = next(batches)
        train_step(batch_now["image"], batch_now["label"])
    rows: list[tuple[float, float]] = []
    wait_per_round: list[float] = []
    for _ in range(rounds):
        alone = _timed(held_steps, dev)
        waited = 0.0
        fed = _timed(fed_steps, dev)
        wait_per_round.append(waited)
        rows.append((fed / steps, alone / steps))
    batches.close()  # shuts the loader's workers down
    fed_ms = statistics.median(r[0] for r in rows) * 1e3
    alone_ms = statistics.median(r[1] for r in rows) * 1e3
    ratios = [r[0] / r[1] for r in rows]
    finite = all_finite([*terms.values(), *train_step.trainable])
    if compile_s is not None:
        compile_s = round(max(0.0, compile_s - alone_ms / 1e3), 2)
    return {
        **_run_fields("train", dataset, model_args, cfg),
        "augment": cfg.data.augment,
        "ms_per_step": round(fed_ms, 2),
        "img_per_s": round(batch / fed_ms * 1e3, 1),
        "step_ms_per_step": round(alone_ms, 2),
        "step_img_per_s": round(batch / alone_ms * 1e3, 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_spread": _spread(ratios),
        "data_wait_ms": round(statistics.median(wait_per_round) / steps * 1e3, 2),
        "finite": finite,
        "compile_s": compile_s,
        "compile_cache": compile_cache_counts() if compile else None,
    }


# --- evaluation ----------------------------------------------------------------------------------------


def forward_passes(results: dict[str, Any], test_images: int, train_images: int) -> dict[str, int]:
    """Images each pass of an evaluation with ``results`` sends through the model (one forward each).

    Args:
        results: what :func:`ivpt.engine.evaluate.evaluate` returned (its non-null keys tell which
            metrics ran).
        test_images: images of the scored split.
        train_images: images of the ``train_full`` split (the KPR regressors' fit).
    """
    ran = {name for name, key in _HEADLINE_KEY.items() if results.get(key) is not None}
    passes: dict[str, int] = {}
    if ran & {"accuracy", "faithfulness", "part_discovery", "kpr", "fg_iou"}:
        passes["scored split"] = test_images
    if "faithfulness" in ran:
        passes["faithfulness: top part removed"] = test_images
        passes["faithfulness: random region removed"] = test_images
    if ran & {"consistency", "stability"}:
        passes["box crops"] = test_images
    if "stability" in ran:
        passes["box crops with noise"] = test_images
    if "kpr" in ran:
        passes["training split (KPR fit)"] = train_images
    return passes


def run_eval_bench(
    data: str | Path,
    dataset: str = "cub",
    arch: str = "vit_small_patch16_224",
    img_size: int = 224,
    batch: int = 32,
    precision: str = "fp32",
    device: str = "cpu",
    compile: bool = False,
    method: str = "ivpt",
    steps: int = 5,
    warmup: int = 1,
    n_pro: tuple[int, ...] | None = None,
    workers: int | None = None,
    rounds: int = 2,
    *,
    backbone_args: dict[str, Any] | None = None,
    pretrained: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Time :func:`ivpt.engine.evaluate.evaluate` with every metric against the backbone forwards it needs.

    Args:
        data, dataset, workers: the data set and the evaluation's loader processes (``data.num_workers``).
        arch, img_size, precision, device, compile, method, n_pro, backbone_args, pretrained: the model,
            as for :func:`run_train_bench`.
        batch: ``eval.batch_size``, also the batch of the bound's forwards.
        steps, warmup: timed and untimed backbone forwards of the bound per round; with ``warmup >= 1``
            one untimed evaluation comes first (lazy imports and first allocations, paid once a process).
        rounds: timed evaluations, each after a measurement of the bound.
        seed: seed of the weights.

    Returns:
        The JSON line's fields: ``mode, dataset, method, arch, img_size, batch, precision, device, compile,
        workers, clock, test_images, train_images, passes, forward_images, eval_s, ms_per_image`` (per
        scored image), ``bound_ms_per_image`` (one image's backbone forward), ``bound_s, ratio,
        ratio_spread, metrics`` (the metrics that ran). ``clock`` is ``"process_cpu"`` (CPU time of this
        process: on the CPU with ``workers=0``, where all the work is this process's) or ``"wall"``.
    """
    from ivpt.data import build_dataset, load_annotations
    from ivpt.engine.evaluate import METRIC_NAMES, evaluate
    from ivpt.model import build_model

    check_arguments("eval-metrics", precision, device, batch, steps, warmup, modes=DATA_MODES)
    dev = torch.device(device)
    model_args = (arch, img_size, batch, precision, device, compile, method, n_pro, backbone_args, pretrained)
    overrides = [*_data_overrides(data, dataset, workers, None), f"eval.batch_size={batch}", "train.progress=false"]
    cfg = _model_config(model_args, rounds, overrides)
    annotations = load_annotations(cfg.data)
    test_images = len(build_dataset(cfg, "test", annotations=annotations))
    train_images = len(build_dataset(cfg, "train_full", annotations=annotations))
    torch.manual_seed(seed)
    model = build_model(cfg, len(annotations.class_names)).to(dev).eval()
    if compile:
        compile_blocks(model)
    backbone = model.backbone
    images = torch.randn(batch, 3, img_size, img_size, device=dev, generator=torch.Generator(dev).manual_seed(seed))

    def backbone_forward() -> None:
        with torch.inference_mode(), autocast_context(dev, precision):
            backbone.forward_features(images)

    # On the CPU with the data loaded in this process, everything runs here: CPU time then leaves out the
    # waits for a core that a shared machine adds to both sides unevenly.
    clock = "process_cpu" if dev.type == "cpu" and cfg.data.num_workers == 0 else "wall"
    timed = _process_cpu_seconds if clock == "process_cpu" else lambda fn: _timed(fn, dev)
    rows: list[tuple[float, float]] = []
    results: dict[str, Any] = {}
    if warmup > 0:
        # What only the first evaluation of a process pays: lazy imports (scikit-learn), first allocations.
        evaluate(model, cfg, METRIC_NAMES, dev)
    for _ in range(rounds):
        for _ in range(warmup):
            backbone_forward()
        per_image = statistics.median(timed(backbone_forward) for _ in range(steps)) / batch
        seconds = timed(lambda: results.update(evaluate(model, cfg, METRIC_NAMES, dev)))
        rows.append((seconds, per_image))
    passes = forward_passes(results, test_images, train_images)
    forwards = sum(passes.values())
    ratios = [seconds / (per_image * forwards) for seconds, per_image in rows]
    eval_s = statistics.median(r[0] for r in rows)
    per_image_s = statistics.median(r[1] for r in rows)
    return {
        **_run_fields("eval-metrics", dataset, model_args, cfg),
        "clock": clock,
        "test_images": test_images,
        "train_images": train_images,
        "passes": passes,
        "forward_images": forwards,
        "eval_s": round(eval_s, 4),
        "ms_per_image": round(eval_s / test_images * 1e3, 2),
        "bound_ms_per_image": round(per_image_s * 1e3, 3),
        "bound_s": round(per_image_s * forwards, 4),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_spread": _spread(ratios),
        "metrics": [name for name in METRIC_NAMES if results.get(_HEADLINE_KEY[name]) is not None],
    }
