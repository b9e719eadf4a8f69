"""``ivpt eval``: accuracy and the interpretability protocols of docs/method.md section 9.

:func:`evaluate` scores a model in memory (the trainer's validation, the report and the demo call it);
:func:`evaluate_checkpoint` loads a checkpoint, scores it, prints a table and writes ``metrics.json``.

What runs on which images:

- ``accuracy`` (top-1, top-5, macro) and ``faithfulness`` on the evaluated split with the test transform;
- ``part_discovery`` (NMI, ARI) and the test side of ``kpr`` on the same images; the regressors of
  ``kpr`` are fitted on ``train_full`` with the test transform;
- ``fg_iou`` and ``fg_missed`` on the same images when the data set has segmentation masks;
- ``consistency`` and ``stability`` on the images cropped to their bounding box; stability adds the
  clipped Gaussian noise of :func:`ivpt.metrics.add_stability_noise`.

Part metrics are computed for EVERY prototype stage (``per_stage``); the headline numbers are those of
``eval.stage`` (Python index, -3 = stage S-2 by default). Metrics that cannot apply (no keypoints, no
masks, a method without concept maps or parts) are ``null`` with a sentence in ``notes``; nothing is
silently left out. Every score is in percent. Maps holding NaN or infinite values raise
:class:`~ivpt.metrics.MetricError` naming the pass, the batch and the stage.

Everything streams: meters keep small per-image summaries, never maps. Under ``torchrun`` the batches
are dealt out to the ranks and the meters merged, and the random draws (stability noise, random regions
of the faithfulness test) are seeded per batch from ``eval.seed``, so a multi-process evaluation gives
the numbers of a single-process one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ivpt.config import Config
from ivpt.engine.distributed import DistributedContext
from ivpt.engine.rng import sample_seed
from ivpt.engine.step import autocast_context
from ivpt.errors import ConfigError, DataError
from ivpt.outputs import prepare_output_dir, write_text

METRIC_NAMES = ("accuracy", "consistency", "stability", "part_discovery", "kpr", "fg_iou", "faithfulness")
STAGE_KEYS = ("consistency", "stability", "nmi", "ari", "kpr", "fg_iou", "fg_missed")
ACCURACY_KEYS = ("accuracy", "top5", "macro_accuracy")
FAITHFULNESS_KEYS = ("faithfulness", "faithfulness_part_drop", "faithfulness_random_drop", "faithfulness_ratio")
HEADLINE_KEYS = (*ACCURACY_KEYS, *STAGE_KEYS, *FAITHFULNESS_KEYS)
# Which result keys each requested metric produces.
_KEYS_OF = {
    "accuracy": ACCURACY_KEYS,
    "consistency": ("consistency",),
    "stability": ("stability",),
    "part_discovery": ("nmi", "ari"),
    "kpr": ("kpr",),
    "fg_iou": ("fg_iou", "fg_missed"),
    "faithfulness": FAITHFULNESS_KEYS,
}
_KEYPOINT_METRICS = ("consistency", "stability", "part_discovery", "kpr")
# ``observe(output, batch)``: sees each forward of the pass over the scored split (see :func:`evaluate`).
BatchObserver = Callable[[Any, dict[str, Any]], None]
# ``model_input(batch, dataset)``: what the model is fed for a batch of ``dataset`` instead of its images (the
# oracle rows feed their maps' sources this way, :mod:`ivpt.engine.oracle`).
ModelInput = Callable[[dict[str, Any], Any], Tensor]
# Separate streams of per-batch seeds for the two random protocols.
_STABILITY_STREAM, _FAITHFULNESS_STREAM = 1, 2


def resolve_metrics(metrics: Sequence[str] | None, cfg: Config) -> tuple[str, ...]:
    """The requested metric names (default ``cfg.eval.metrics``), checked and de-duplicated.

    Raises:
        ConfigError: an unknown name.
    """
    names = tuple(dict.fromkeys(m.strip() for m in (metrics if metrics is not None else cfg.eval.metrics)))
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)}")
    if not names:
        raise ConfigError(f"no metric requested; choose from {', '.join(METRIC_NAMES)}")
    return names


@contextmanager
def _naming(where: str) -> Iterator[None]:
    """Prefix a :class:`~ivpt.metrics.MetricError` raised inside with ``where`` (the pass, batch and stage)."""
    from ivpt.metrics import MetricError

    try:
        yield
    except MetricError as exc:
        raise MetricError(f"{where}: {exc}") from None


def headline_stage(stage: int, num_stages: int) -> tuple[int, str | None]:
    """Turn the Python index ``eval.stage`` into a stage number, clamping an out-of-range one.

    Returns:
        ``(index, note)``: the 0-based stage and, when clamped, a sentence saying so.
    """
    if -num_stages <= stage < num_stages:
        return stage % num_stages, None
    index = 0 if stage < 0 else num_stages - 1
    return index, (
        f"eval.stage={stage} is out of range for a model with {num_stages} stage(s); "
        f"the headline part metrics use stage {index}"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cfg: Config,
    metrics: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    *,
    split: str = "test",
    ctx: DistributedContext | None = None,
    progress: bool = False,
    observe: BatchObserver | None = None,
    model_input: ModelInput | None = None,
) -> dict[str, Any]:
    """Score ``model`` on the data set of ``cfg`` (see the module docstring for the protocols).

    Args:
        model: an ivpt model (or its DDP wrapper); its train/eval mode is restored afterwards.
        cfg: the config (``data``, ``model.img_size``, ``train.precision``, ``eval``).
        metrics: names from :data:`METRIC_NAMES` (default ``cfg.eval.metrics``).
        device: where to compute (default: the model's device).
        split: the split scored by accuracy and the part metrics (the trainer passes ``"val"``).
        ctx: the distributed context; batches are shared among its ranks. ``None``: this process alone.
        progress: a progress bar per pass over the data (on the main rank, when stderr is a terminal).
        observe: called as ``observe(output, batch)`` with the model's output and the batch (``image``,
            ``label``, ``index``, ...) of every batch of the pass over ``split`` (this rank's share), so
            that a caller can gather more from the same forward passes (the demo gathers the report's
            concept statistics this way).
        model_input: replaces every batch's ``image`` by ``model_input(batch, dataset)`` before any use (the
            oracle rows of :mod:`ivpt.engine.oracle` feed ground-truth part masks this way).

    Returns:
        Every key of :data:`HEADLINE_KEYS` (``None`` when not computed), ``per_stage`` (stage index ->
        the :data:`STAGE_KEYS` of that stage, when a part metric ran), ``stage`` (the headline stage or
        ``None``), ``split``, ``images`` and ``notes`` (why anything is ``None``).
    """
    net = model.module if isinstance(model, DistributedDataParallel) else model
    device = torch.device(device) if device is not None else next(net.parameters()).device
    was_training = net.training
    net.eval()
    # Evaluating must leave the random streams as they were: the trainer validates at times an
    # uninterrupted run and a resumed one do not share, and both must continue identically.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            names = resolve_metrics(metrics, cfg)
            ctx = ctx or DistributedContext()
            return _Evaluation(net, cfg, names, device, split, ctx, progress, observe, model_input).run()
        finally:
            net.train(was_training)


class _Evaluation:
    """The state of one :func:`evaluate` call: which metrics apply, their meters, the data passes."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        metrics: tuple[str, ...],
        device: torch.device,
        split: str,
        ctx: DistributedContext,
        progress: bool = False,
        observe: BatchObserver | None = None,
        model_input: ModelInput | None = None,
    ) -> None:
        from ivpt.data import build_dataset, load_annotations

        self.model = model
        self.cfg = cfg
        self.device = device
        self.split = split
        self.ctx = ctx
        self.progress = progress and ctx.is_main
        self.observe = observe
        self.model_input = model_input
        self.notes: list[str] = []
        self.annotations = load_annotations(cfg.data)
        self.dataset = build_dataset(cfg, split, train_transform=False, annotations=self.annotations)
        self.img_size = self.dataset.transform.img_size
        self.num_keypoints = len(self.dataset.part_names)
        self.stage_sizes, has_part_logits = self._probe()
        self.active = self._applicable(metrics, has_part_logits)

    def _probe(self) -> tuple[list[int], bool]:
        """Channels per stage and whether the model scores parts, from one forward of a blank image."""
        blank = torch.zeros(1, 3, self.img_size, self.img_size, device=self.device)
        out = self._forward(blank)
        return [maps.shape[1] for maps in out.concept_maps], out.part_logits is not None

    def _applicable(self, requested: tuple[str, ...], has_part_logits: bool) -> tuple[str, ...]:
        skipped = [name for name in METRIC_NAMES if name not in requested]
        if skipped:
            self.notes.append(f"not requested: {', '.join(skipped)}")
        active = []
        method = self.cfg.model.method
        for name in requested:
            if name in _KEYPOINT_METRICS and not self.stage_sizes:
                self.notes.append(f"{name}: method '{method}' has no concept maps")
            elif name in _KEYPOINT_METRICS and self.num_keypoints == 0:
                self.notes.append(f"{name}: the data set ({self.cfg.data.dataset}) has no part keypoints")
            elif name == "fg_iou" and not self.stage_sizes:
                self.notes.append(f"fg_iou: method '{method}' has no concept maps")
            elif name == "fg_iou" and not self.dataset.has_masks:
                self.notes.append("fg_iou: the data set has no segmentation masks (segmentations/)")
            elif name == "faithfulness" and not (has_part_logits and self.stage_sizes):
                self.notes.append(f"faithfulness: method '{method}' has no part scores and concept maps")
            else:
                active.append(name)
        return tuple(active)

    # --- running -------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from ivpt.metrics import keypoint_regression_error, sync_meter

        results: dict[str, Any] = dict.fromkeys(HEADLINE_KEYS)
        stage_results: dict[int, dict[str, float | None]] = {}
        meters: dict[str, list[Any]] = {}
        if self.stage_sizes and any(name in self.active for name in (*_KEYPOINT_METRICS, "fg_iou")):
            stage_results = {s: dict.fromkeys(STAGE_KEYS) for s in range(len(self.stage_sizes))}

        meters.update(self._main_pass())
        if "consistency" in self.active or "stability" in self.active:
            meters.update(self._bbox_pass())
        if "kpr" in self.active:
            meters["kpr_train"] = self._kpr_fit_pass()

        if self.ctx.is_distributed:
            # Only when this evaluation is shared: rank 0 also evaluates alone inside a process group.
            meters = {name: [sync_meter(m) for m in per_stage] for name, per_stage in meters.items()}
        if "accuracy" in meters:
            scores = meters["accuracy"][0].compute()
            results.update(accuracy=scores["accuracy_top1"], top5=scores["accuracy_top5"])
            results["macro_accuracy"] = scores["accuracy_macro"]
        if "faithfulness" in meters:
            results.update(meters["faithfulness"][0].compute())
        for stage, values in stage_results.items():
            if "consistency" in meters:
                values["consistency"] = meters["consistency"][stage].compute()["consistency"]
            if "stability" in meters:
                values["stability"] = meters["stability"][stage].compute()["stability"]
            if "part_discovery" in meters:
                scores = meters["part_discovery"][stage].compute()
                values["nmi"], values["ari"] = scores["part_nmi"], scores["part_ari"]
            if "kpr" in meters:
                with _naming(f"stage {stage}"):
                    values["kpr"] = keypoint_regression_error(meters["kpr_train"][stage], meters["kpr"][stage])
            if "fg_iou" in meters:
                values.update(meters["fg_iou"][stage].compute())

        stage = None
        if stage_results:
            stage, note = headline_stage(self.cfg.eval.stage, len(self.stage_sizes))
            if note:
                self.notes.append(note)
            results.update(stage_results[stage])
        results["per_stage"] = stage_results
        results["stage"] = stage
        results["split"] = self.split
        results["images"] = len(self.dataset)
        results["notes"] = self.notes
        return results

    def _forward(self, images: Tensor) -> Any:
        with autocast_context(self.device, self.cfg.train.precision):
            return self.model(images.to(self.device, non_blocking=True))

    def _batches(self, dataset: Any, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(batch number, batch)`` of this rank's share: the same batches as a single process makes.

        ``what`` names the pass on its progress bar. A batch's ``image`` is on the device and normalised
        (the data set's ``uint8`` images through its ``transform.normalize``), or ``model_input``'s.
        """
        from tqdm import tqdm

        size = self.cfg.eval.batch_size
        batches = [list(range(start, min(start + size, len(dataset)))) for start in range(0, len(dataset), size)]
        mine = list(range(self.ctx.rank, len(batches), self.ctx.world_size))
        loader = DataLoader(
            dataset,
            batch_sampler=[batches[b] for b in mine],
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        # disable=None: tqdm shows the bar only on a terminal, so logs get the final table alone.
        for number, batch in tqdm(
            zip(mine, loader, strict=True),
            total=len(mine),
            desc=f"ivpt eval: {what}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=None if self.progress else True,
        ):
            if self.model_input is not None:
                batch["image"] = self.model_input(batch, dataset)
            else:
                batch["image"] = dataset.transform.normalize(batch["image"].to(self.device, non_blocking=True))
            yield number, batch

    def _generator(self, stream: int, batch_number: int) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.cfg.eval.seed + stream, 0, batch_number))

    def _per_stage(self, make: Callable[[int], Any]) -> list[Any]:
        """One meter per stage; ``make`` gets the stage's channel count (background included)."""
        return [make(channels) for channels in self.stage_sizes]

    def _main_pass(self) -> dict[str, list[Any]]:
        """Accuracy, faithfulness, NMI/ARI, the test side of KPR and fg_iou: one pass over the split."""
        from ivpt.data import build_dataset
        from ivpt.metrics import (
            AccuracyMeter,
            FaithfulnessMeter,
            ForegroundIoUMeter,
            KeypointRegressionMeter,
            PartDiscoveryMeter,
            faithfulness_batch,
        )

        active = self.active
        meters: dict[str, list[Any]] = {}
        if "accuracy" in active:
            meters["accuracy"] = [AccuracyMeter(self.dataset.num_classes, topk=5, device=self.device)]
        if "faithfulness" in active:
            meters["faithfulness"] = [FaithfulnessMeter(device=self.device)]
        if "part_discovery" in active:
            meters["part_discovery"] = self._per_stage(lambda _: PartDiscoveryMeter())
        if "kpr" in active:
            meters["kpr"] = self._per_stage(lambda k: KeypointRegressionMeter(k - 1, self.num_keypoints))
        if "fg_iou" in active:
            meters["fg_iou"] = self._per_stage(lambda _: ForegroundIoUMeter(device=self.device))
        if not meters and self.observe is None:
            return meters
        dataset = self.dataset
        if "fg_iou" in active:
            dataset = build_dataset(
                self.cfg, self.split, train_transform=False, with_masks=True, annotations=self.annotations
            )
        for number, batch in self._batches(dataset, f"{self.split} split"):
            images = batch["image"].to(self.device, non_blocking=True)
            out = self._forward(images)
            if self.observe is not None:
                self.observe(out, batch)
            if "accuracy" in meters:
                meters["accuracy"][0].update(out.logits.float(), batch["label"].to(self.device))
            if "faithfulness" in meters:
                with _naming(f"{self.split} split, batch {number}, stage {len(out.concept_maps) - 1}"):
                    probabilities = faithfulness_batch(
                        lambda x: self._forward(x).logits,
                        images,
                        out,
                        generator=self._generator(_FAITHFULNESS_STREAM, number),
                    )
                meters["faithfulness"][0].update(*probabilities)
            for stage, maps in enumerate(out.concept_maps):
                maps = maps.float()
                with _naming(f"{self.split} split, batch {number}, stage {stage}"):
                    if "part_discovery" in meters:
                        meters["part_discovery"][stage].update(maps, batch["keypoints"], self.img_size)
                    if "kpr" in meters:
                        meters["kpr"][stage].update(maps, batch["keypoints"], self._kpr_box(batch), self.img_size)
                    if "fg_iou" in meters:
                        meters["fg_iou"][stage].update(maps, batch["mask"])
        return meters

    def _bbox_pass(self) -> dict[str, list[Any]]:
        """Consistency and stability on the images cropped to their bounding box."""
        from ivpt.data import build_dataset
        from ivpt.metrics import ConsistencyMeter, StabilityMeter, add_stability_noise

        ev = self.cfg.eval
        geometry = dict(map_size=ev.map_size, box_half_size=ev.box_half_size)
        meters: dict[str, list[Any]] = {}
        if "consistency" in self.active:
            meters["consistency"] = self._per_stage(
                lambda k: ConsistencyMeter(
                    self.dataset.num_classes,
                    k - 1,
                    self.num_keypoints,
                    threshold=ev.consistency_threshold,
                    device=self.device,
                    **geometry,
                )
            )
        if "stability" in self.active:
            meters["stability"] = self._per_stage(
                lambda k: StabilityMeter(
                    self.dataset.num_classes, k - 1, self.num_keypoints, device=self.device, **geometry
                )
            )
        cropped = build_dataset(
            self.cfg, self.split, train_transform=False, bbox_crop=True, annotations=self.annotations
        )
        for number, batch in self._batches(cropped, f"{self.split} split, cropped to the boxes"):
            images = batch["image"].to(self.device, non_blocking=True)
            noisy = None
            if "stability" in meters:
                generator = self._generator(_STABILITY_STREAM, number)
                noisy_images = add_stability_noise(images, generator, std=ev.noise_std, clip=ev.noise_clip)
                if self.device.type == "cuda":
                    # One forward of the clean and the noisy crops (a model in eval mode treats each image
                    # alone): half the forwards' fixed cost, the many small kernels of the concept stages.
                    # Not on the CPU, where a forward's cost per image grows with the batch (the demo's ViT:
                    # 11.0 ms per image at 64 images, 12.9 at 128).
                    both = self._forward(torch.cat([images, noisy_images])).concept_maps
                    clean = [maps[: len(images)] for maps in both]
                    noisy = [maps[len(images) :] for maps in both]
                else:
                    clean = self._forward(images).concept_maps
                    noisy = self._forward(noisy_images).concept_maps
            else:
                clean = self._forward(images).concept_maps
            labels = batch["label"].to(self.device)
            for stage, maps in enumerate(clean):
                clean_hits = None
                with _naming(f"{self.split} split cropped to the boxes, batch {number}, stage {stage}"):
                    if "consistency" in meters:
                        clean_hits = meters["consistency"][stage].update(
                            maps.float(), batch["keypoints"], labels, self.img_size
                        )
                    if noisy is not None:
                        meters["stability"][stage].update(
                            maps.float(),
                            noisy[stage].float(),
                            batch["keypoints"],
                            labels,
                            self.img_size,
                            clean_hits=clean_hits,
                        )
        return meters

    def _kpr_fit_pass(self) -> list[Any]:
        """Centroids and keypoints of the whole official train split, to fit the KPR regressors."""
        from ivpt.data import build_dataset
        from ivpt.metrics import KeypointRegressionMeter

        meters = self._per_stage(lambda k: KeypointRegressionMeter(k - 1, self.num_keypoints))
        train_full = build_dataset(self.cfg, "train_full", train_transform=False, annotations=self.annotations)
        for number, batch in self._batches(train_full, "train split, for the KPR regressors"):
            out = self._forward(batch["image"])
            for stage, maps in enumerate(out.concept_maps):
                with _naming(f"train split (KPR regressors), batch {number}, stage {stage}"):
                    meters[stage].update(maps.float(), batch["keypoints"], self._kpr_box(batch), self.img_size)
        return meters

    def _kpr_box(self, batch: dict[str, Any]) -> Tensor:
        """The box KPR normalises by (``eval.kpr_box``): the protocol's annotated one, or the clipped one."""
        from ivpt.metrics import kpr_box

        if self.cfg.eval.kpr_box == "clipped":
            return batch["bbox"]
        return kpr_box(batch["bbox_edges"], self.img_size)


def format_table(results: dict[str, Any]) -> str:
    """The headline metrics and a per-stage table, as plain text."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [f"{'metric':<26}{'value':>10}"]
    lines += [f"{key:<26}{cell(results.get(key)):>10}" for key in HEADLINE_KEYS]
    per_stage = results.get("per_stage") or {}
    if per_stage:
        lines.append("")
        lines.append(f"{'stage':<8}" + "".join(f"{key:>13}" for key in STAGE_KEYS))
        for stage, values in per_stage.items():
            marker = "*" if stage == results.get("stage") else " "
            lines.append(f"{stage:<6}{marker} " + "".join(f"{cell(values[key]):>13}" for key in STAGE_KEYS))
        lines.append("(* headline stage, eval.stage)")
    lines += [f"note: {note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: str | Path,
    overrides: Sequence[str] = (),
    metrics: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    observe: BatchObserver | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint, print the results and write ``metrics.json``.

    Args:
        checkpoint: written by ``ivpt train`` (or ``ivpt convert-official``), a folder written by
            ``ivpt export``, or ``hf-hub:org/name``.
        overrides: ``key=value`` changes to the stored config (``data.root=...``, ``eval.stage=-1``, ...).
        metrics: subset of :data:`METRIC_NAMES` (default ``eval.metrics`` of the config).
        out_dir: where ``metrics.json`` goes (default: the checkpoint's folder, or the exported folder).
        observe: passed on to :func:`evaluate`.

    A progress bar follows each pass over the data on a terminal, unless ``train.progress=false``.

    Returns:
        The results of :func:`evaluate` plus ``checkpoint`` (its path).

    Raises:
        DataError: the data set's classes do not match the checkpoint's.
        IVPTError: the output folder cannot be created or written (checked before any metric).
    """
    from ivpt.engine.distributed import init_distributed, shutdown_distributed
    from ivpt.model.pretrained import checkpoint_home, load_checkpoint

    home = checkpoint_home(checkpoint)
    if out_dir is None and home is None:
        raise ConfigError(f"eval: '{checkpoint}' has no folder of its own for metrics.json; give --out DIR")
    resolved_metrics = None if metrics is None else [m for m in metrics if m.strip()]
    model, cfg, info = load_checkpoint(checkpoint, overrides, device="cpu")
    # Before any metric: an unusable folder must not cost the evaluation (every rank checks, so that
    # all of them stop together).
    target = prepare_output_dir(out_dir if out_dir is not None else home)
    ctx = init_distributed(cfg.train.device)
    try:
        model.to(ctx.device)
        _check_classes(cfg, info["class_names"], checkpoint)
        results = evaluate(
            model,
            cfg,
            resolved_metrics,
            ctx.device,
            split="test",
            ctx=ctx,
            progress=cfg.train.progress,
            observe=observe,
        )
        results["checkpoint"] = str(checkpoint)
        if ctx.is_main:
            print(format_table(results))  # first: a failing write must not lose the table
            write_text(target / "metrics.json", json.dumps(results, indent=2) + "\n")
            print(f"wrote {target / 'metrics.json'}")
    finally:
        shutdown_distributed(ctx)
    return results


def _check_classes(cfg: Config, class_names: list[str], checkpoint: str | Path) -> None:
    from ivpt.data import load_annotations

    found = load_annotations(cfg.data).class_names
    if len(found) != len(class_names):
        raise DataError(
            f"checkpoint '{checkpoint}' classifies {len(class_names)} classes, but the data set at "
            f"'{cfg.data.root}' has {len(found)}; point data.root=... at the data it was trained on"
        )


__all__ = [
    "HEADLINE_KEYS",
    "METRIC_NAMES",
    "STAGE_KEYS",
    "evaluate",
    "evaluate_checkpoint",
    "format_table",
    "headline_stage",
    "resolve_metrics",
]
