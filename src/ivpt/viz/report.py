"""The pieces of ``ivpt report``'s static HTML page about a trained model (:func:`write_report`).

:func:`ivpt.engine.report.build_report` loads the model, scores it and gathers what the page shows; this
module draws and writes it. The page (``DIR/index.html``, images in ``DIR/img/``) needs no script and no
network: inline CSS, relative image links. It shows

- the metrics of ``ivpt eval``;
- the training curves from the run's ``log.jsonl`` (beside the checkpoint);
- the concept hierarchy of the whole test set (each concept -> the concepts it feeds, with its mean
  grouping weight), as a figure and a table;
- per concept of every stage, its ``top_k`` most typical test-image crops;
- per class, how much each final part contributes to that class's logit (a heat map).

The test split is streamed once (:class:`ivpt.viz.concept_stats.ConceptStatisticsMeter`); only the
gallery images are read again, each once.
"""

from __future__ import annotations

import datetime
import html
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ivpt.config import Config
from ivpt.model.preprocessing import preprocessing_of
from ivpt.outputs import prepare_output_dir, write_text
from ivpt.viz.concept_stats import ConceptStatistics, ConceptStatisticsMeter, concept_feeds, crop_box
from ivpt.viz.drawing import concept_label, draw_hierarchy, save_figure, save_image
from ivpt.viz.maps import denormalize_image, grouping_flow
from ivpt.viz.palette import concept_palette, to_hex

THUMBNAIL_SIZE = 96
# Gallery crops cover this fraction of the image side (at least two patches).
CROP_FRACTION = 0.35
_BORDER = 4

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #555; font-size: 0.9em; }
.note { color: #7a5a00; background: #fff8e1; padding: 0.4em 0.8em; border-left: 4px solid #f0c000; }
.swatch { display: inline-block; width: 1.1em; height: 1.1em; border: 1px solid #333; vertical-align: middle; }
img.figure { max-width: 100%; height: auto; border: 1px solid #eee; }
img.strip { height: 64px; width: auto; }
"""


# --- figures ------------------------------------------------------------------------------------------


def _numeric_fields(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested numbers of a log record: ``{"loss": {"total": 1.0}}`` -> ``{"loss/total": 1.0}``."""
    found: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            found.update(_numeric_fields(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[f"{prefix}{key}"] = float(value)
    return found


# Log fields that are bookkeeping, not curves.
_NOT_CURVES = ("step", "time", "epoch", "epoch_step", "best", "images", "img_per_s", "checkpoint_epoch")


def training_curves_figure(records: Sequence[dict[str, Any]]) -> Figure | None:
    """Loss terms, validation metrics and learning rates against the optimizer step.

    Args:
        records: the run's ``log.jsonl`` records (``event`` ``"train"`` and ``"val"`` are drawn).

    Returns:
        A figure, or ``None`` when the log holds no train or validation record.
    """
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {"loss": {}, "val": {}, "lr": {}}
    for record in records:
        event = record.get("event")
        step = record.get("step")
        if event not in ("train", "val") or not isinstance(step, (int, float)):
            continue
        for name, value in _numeric_fields(record).items():
            if name in _NOT_CURVES:
                continue
            if event == "val":
                panel = "val"
            elif name.startswith("lr/"):
                panel = "lr"
            elif name.startswith("loss/"):
                panel = "loss"
            else:
                continue
            xs, ys = series[panel].setdefault(name.split("/", 1)[-1] if panel != "val" else name, ([], []))
            xs.append(float(step))
            ys.append(value)
    panels = [(key, lines) for key, lines in series.items() if lines]
    if not panels:
        return None
    titles = {"loss": "training loss terms", "val": "validation metrics (%)", "lr": "learning rates"}
    figure = Figure(figsize=(5.0 * len(panels), 3.8), dpi=100, layout="constrained")
    for position, (key, lines) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), position + 1)
        for name, (xs, ys) in sorted(lines.items()):
            ax.plot(
                xs,
                ys,
                marker="o" if len(xs) < 30 else None,
                markersize=3,
                lw=1.4 if name == "total" else 1.0,
                label=name,
            )
        if key in ("loss", "lr") and all(y > 0 for _, ys in lines.values() for y in ys):
            ax.set_yscale("log")
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
    return figure


def hierarchy_figure(stats: ConceptStatistics, palette: Sequence[np.ndarray]) -> Figure:
    """The data set's concept hierarchy: mean grouping weights as edge widths, mean areas as node sizes."""
    num_foreground = [k - 1 for k in stats.num_concepts]
    height = max(4.0, 0.32 * max(num_foreground) + 1.5)
    figure = Figure(figsize=(max(8.0, 2.6 * len(num_foreground)), height), dpi=100, layout="constrained")
    areas = [a[:-1] for a in stats.mean_area]
    largest = max(float(a.max()) for a in areas) or 1.0
    draw_hierarchy(
        figure.add_subplot(),
        num_foreground,
        grouping_flow(stats.mean_grouping, stats.fusion_targets),
        palette,
        node_sizes=[a / largest for a in areas],
        title=f"concept hierarchy over {stats.num_images} test images (edge width = mean grouping weight)",
    )
    return figure


def part_usage_figure(usage: np.ndarray, class_names: Sequence[str], palette: np.ndarray) -> Figure:
    """Heat map ``(C, N)``: mean share of each class's own logit contributed by each final part."""
    num_classes, num_parts = usage.shape
    height = float(np.clip(0.2 * num_classes + 1.6, 3.0, 40.0))
    figure = Figure(figsize=(max(5.0, 0.9 * num_parts + 3.5), height), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    limit = float(np.abs(usage).max()) or 1.0
    image = ax.imshow(usage, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(num_parts), [f"part {n}" for n in range(num_parts)], fontsize=8)
    for tick, n in zip(ax.get_xticklabels(), range(num_parts), strict=True):
        tick.set_color(to_hex(palette[n]))
        tick.set_fontweight("bold")
    every = max(1, math.ceil(num_classes / 60))
    rows = list(range(0, num_classes, every))
    ax.set_yticks(rows, [class_names[r] for r in rows], fontsize=7)
    figure.colorbar(image, ax=ax, label="mean share of the class logit")
    ax.set_title("per-class part usage (test images of each class, its own logit)", fontsize=10)
    return figure


# --- galleries ----------------------------------------------------------------------------------------


def _thumbnail(image: np.ndarray, box: tuple[int, int, int, int], colour: np.ndarray) -> np.ndarray:
    """Crop ``(top, left, bottom, right)`` of an ``(H, W, 3)`` image, resize, frame in ``colour``."""
    top, left, bottom, right = box
    crop = Image.fromarray(image[top:bottom, left:right]).resize(
        (THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BICUBIC
    )
    framed = np.empty((THUMBNAIL_SIZE + 2 * _BORDER, THUMBNAIL_SIZE + 2 * _BORDER, 3), dtype=np.uint8)
    framed[:] = np.rint(np.asarray(colour) * 255).astype(np.uint8)
    framed[_BORDER:-_BORDER, _BORDER:-_BORDER] = np.asarray(crop)
    return framed


def gallery_strips(
    stats: ConceptStatistics, dataset: Any, cfg: Config, palette: Sequence[np.ndarray]
) -> dict[tuple[int, int], np.ndarray]:
    """One row of thumbnails per concept: its most typical test images cropped around its peak.

    Each test image needed is read once from ``dataset`` (with the test transform) and all its crops
    are cut then.

    Returns:
        ``(stage, concept) -> (T, width, 3)`` uint8 strip (absent when the concept has no candidate).
    """
    prep = preprocessing_of(cfg)
    wanted: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for stage, images in enumerate(stats.top_images):
        for concept, rank in np.ndindex(images.shape):
            index = int(images[concept, rank])
            if index >= 0:
                wanted[index].append((stage, concept, rank, int(stats.top_cells[stage][concept, rank])))
    thumbs: dict[tuple[int, int], dict[int, np.ndarray]] = defaultdict(dict)
    for index in sorted(wanted):
        # A data set's uint8 image comes back as it is.
        image = denormalize_image(dataset[index]["image"], prep.mean, prep.std)
        height, width = image.shape[:2]
        side = max(round(CROP_FRACTION * min(height, width)), 2 * max(height // stats.grid_size[0], 1))
        for stage, concept, rank, cell in wanted[index]:
            box = crop_box(cell, stats.grid_size, (height, width), side)
            thumbs[(stage, concept)][rank] = _thumbnail(image, box, palette[stage][concept])
    gap = np.full((THUMBNAIL_SIZE + 2 * _BORDER, _BORDER, 3), 255, dtype=np.uint8)
    strips = {}
    for key, ranked in thumbs.items():
        pieces: list[np.ndarray] = []
        for rank in sorted(ranked):
            pieces += [ranked[rank], gap]
        strips[key] = np.concatenate(pieces[:-1], axis=1)
    return strips


# --- HTML ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.2f}"
    return html.escape(str(value))


def _metrics_html(
    results: dict[str, Any], source: str, headline_keys: Sequence[str], stage_keys: Sequence[str]
) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td class='num'>{_cell(results.get(key))}</td></tr>" for key in headline_keys
    )
    parts = [
        f"<p class='meta'>Split: {_cell(results.get('split'))}, {_cell(results.get('images'))} images; "
        f"scores in percent; {html.escape(source)}.</p>"
    ]
    parts.append(f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>")
    per_stage = results.get("per_stage") or {}
    if per_stage:
        header = "".join(f"<th>{html.escape(k)}</th>" for k in stage_keys)
        body = ""
        for stage, values in per_stage.items():
            marker = " (headline)" if str(stage) == str(results.get("stage")) else ""
            body += (
                f"<tr><th>{html.escape(str(stage))}{marker}</th>"
                + "".join(f"<td class='num'>{_cell(values.get(k))}</td>" for k in stage_keys)
                + "</tr>"
            )
        parts.append(
            "<p class='meta'>Part metrics per stage (0-based stage index):</p>"
            f"<table><tr><th>stage</th>{header}</tr>{body}</table>"
        )
    parts += [f"<p class='note'>{html.escape(str(note))}</p>" for note in results.get("notes") or []]
    return "\n".join(parts)


def _swatch(colour: np.ndarray) -> str:
    return f"<span class='swatch' style='background:{to_hex(colour)}'></span>"


def _feeds(stats: ConceptStatistics, stage: int, concept: int) -> str:
    """The targets a concept feeds with weight >= 0.1, strongest first, as HTML."""
    target = stats.fusion_targets[stage]
    return ", ".join(
        f"{html.escape(concept_label(target, t, len(stats.num_concepts)))} ({weight:.2f})"
        for t, weight in concept_feeds(stats, stage, concept)
    )


def _concept_label_html(stage: int, concept: int, stats: ConceptStatistics) -> str:
    if concept == stats.num_concepts[stage] - 1:
        return "background"
    return html.escape(concept_label(stage, concept, len(stats.num_concepts)))


def _hierarchy_table(stats: ConceptStatistics, palette: Sequence[np.ndarray]) -> str:
    rows = []
    for stage in range(len(stats.mean_grouping)):
        for concept in range(stats.num_concepts[stage] - 1):
            rows.append(
                f"<tr><td>{_swatch(palette[stage][concept])} {_concept_label_html(stage, concept, stats)}</td>"
                f"<td class='num'>{stats.mean_area[stage][concept]:.1%}</td>"
                f"<td class='num'>{stats.presence[stage][concept]:.0%}</td>"
                f"<td>{_feeds(stats, stage, concept)}</td></tr>"
            )
    header = (
        "<tr><th>concept</th><th>mean area</th><th>present in</th>"
        "<th>feeds (mean grouping weight over the images where it claims a region; &ge; 0.10)</th></tr>"
    )
    return f"<table>{header}{''.join(rows)}</table>"


def _gallery_html(
    stats: ConceptStatistics, palette: Sequence[np.ndarray], strips: dict[tuple[int, int], str], top_k: int
) -> str:
    parts = []
    num_stages = len(stats.num_concepts)
    for stage, count in enumerate(stats.num_concepts):
        name = "final parts" if stage == num_stages - 1 else f"stage {stage + 1}"
        rows = []
        for concept in range(count):
            link = strips.get((stage, concept))
            label = _concept_label_html(stage, concept, stats)
            image = f"<img class='strip' src='{link}' alt='most typical crops of {label}'>" if link else "&ndash;"
            absent = "" if stats.presence[stage][concept] > 0 else " <em>(never claims a region)</em>"
            rows.append(
                f"<tr><td>{_swatch(palette[stage][concept])} {label}{absent}</td>"
                f"<td class='num'>{stats.mean_area[stage][concept]:.1%}</td><td>{image}</td></tr>"
            )
        parts.append(
            f"<h3>{name} ({count - 1} concepts + background)</h3><table>"
            f"<tr><th>concept</th><th>mean area</th><th>{top_k} most typical test crops</th></tr>"
            f"{''.join(rows)}</table>"
        )
    return "\n".join(parts)


def _figure_html(link: str, alt: str) -> str:
    return f"<p><img class='figure' src='{link}' alt='{html.escape(alt)}'></p>"


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


# --- entry point --------------------------------------------------------------------------------------


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    top_k: int,
    device: str,
    progress: bool = True,
    normalize: Callable[[Tensor], Tensor] | None = None,
) -> ConceptStatistics:
    """Stream ``loader`` once through ``model`` (eval mode) and gather :class:`ConceptStatistics`.

    ``normalize`` turns a batch's images, once on ``device``, into the model's input; ``None``: the
    loader's data set's ``transform.normalize`` (its images are ``uint8``).
    """
    if normalize is None:
        normalize = loader.dataset.transform.normalize
    meter = ConceptStatisticsMeter(num_classes, top_k, device)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc="ivpt report", unit="batch", disable=not progress):
            output = model(normalize(batch["image"].to(device, non_blocking=True)))
            meter.update(output, batch["label"], batch["index"])
    finally:
        model.train(was_training)
    return meter.compute()


def write_report(
    out_dir: str | Path,
    *,
    checkpoint: str,
    epoch: Any,
    cfg: Config,
    class_names: Sequence[str],
    dataset: Any,
    stats: ConceptStatistics,
    results: dict[str, Any],
    source: str,
    metric_keys: tuple[Sequence[str], Sequence[str]],
    log_path: Path | None,
    log_records: Sequence[dict[str, Any]] | None,
    top_k: int,
) -> Path:
    """Write ``out_dir/index.html`` and its images from what :func:`ivpt.engine.report.build_report` gathered.

    Args:
        out_dir: output folder; images go to ``out_dir/img/``.
        checkpoint, epoch: what the page says it describes.
        cfg, class_names: the model's config and class names.
        dataset: the test split (test transform), for the gallery crops.
        stats: the model's concept statistics over ``dataset``.
        results, source: the metrics (``ivpt eval``'s dict) and a sentence saying where they come from.
        metric_keys: ``(headline keys, per-stage keys)`` of ``results``, in table order.
        log_path, log_records: the run's ``log.jsonl`` and its records (``None``: no log found; a
            ``log_path`` of ``None``: the model has no run folder).
        top_k: gallery crops per concept.

    Returns:
        The path of ``index.html``.
    """
    out = prepare_output_dir(out_dir)
    images_dir = prepare_output_dir(out / "img")
    sections: list[str] = []
    sections.append("<h2>Metrics</h2>" + _metrics_html(results, source, *metric_keys))

    curves = training_curves_figure(log_records) if log_records is not None else None
    sections.append("<h2>Training curves</h2>")
    if curves is not None:
        save_figure(curves, images_dir / "training_curves.png")
        sections.append(_figure_html("img/training_curves.png", "training curves"))
    elif log_path is None:
        sections.append(_note(f"{checkpoint} has no run folder with a training log, so there are no curves."))
    else:
        reason = "has no train or validation records" if log_records is not None else "was not found"
        sections.append(_note(f"The training log {log_path} {reason}, so there are no curves."))

    if stats.num_concepts:
        palette = concept_palette(stats.num_concepts)
        sections.append("<h2>Concept hierarchy</h2>")
        if stats.mean_grouping:
            save_figure(hierarchy_figure(stats, palette), images_dir / "hierarchy.png")
            sections.append(_figure_html("img/hierarchy.png", "concept hierarchy"))
            sections.append(_hierarchy_table(stats, palette))
        else:
            sections.append(_note("This model does not group concepts (a single stage, or fusion off)."))
        strips = gallery_strips(stats, dataset, cfg, palette)
        links = {}
        for (stage, concept), strip in strips.items():
            name = f"img/gallery/stage{stage + 1}_concept{concept}.png"
            save_image(strip, out / name)
            links[(stage, concept)] = name
        sections.append("<h2>Concept galleries</h2>")
        sections.append(
            "<p class='meta'>Per concept, the test images where its 3&times;3-smoothed map peaks highest, "
            "cropped around the peak; the frame is the concept's colour in every figure.</p>"
        )
        sections.append(_gallery_html(stats, palette, links, top_k))
        if stats.class_part_usage is not None:
            save_figure(
                part_usage_figure(stats.class_part_usage, class_names, palette[-1]), images_dir / "part_usage.png"
            )
            sections.append(
                "<h2>Per-class part usage</h2>" + _figure_html("img/part_usage.png", "per-class part usage")
            )
    else:
        sections.append(
            _note(f"Method '{cfg.model.method}' has no concept maps: no hierarchy, galleries or part usage.")
        )

    m = cfg.model
    meta = (
        f"Checkpoint {html.escape(checkpoint)} (epoch {_cell(epoch)}); "
        f"method {html.escape(m.method)}, "
        f"backbone {html.escape(m.arch)} at {m.img_size} px, prototypes per stage {list(m.n_pro)}, "
        f"fusion target {html.escape(m.fusion_target)}; data {html.escape(cfg.data.dataset)} at "
        f"{html.escape(cfg.data.root)}: {len(class_names)} classes, {stats.num_images} test images. "
        f"Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}."
    )
    page = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n<link rel='icon' href='data:,'>\n"
        f"<title>ivpt report: {html.escape(Path(checkpoint).name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>ivpt report</h1>\n<p class='meta'>{meta}</p>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
    index = out / "index.html"
    write_text(index, page)
    return index


__all__ = [
    "collect_statistics",
    "gallery_strips",
    "hierarchy_figure",
    "part_usage_figure",
    "training_curves_figure",
    "write_report",
]
