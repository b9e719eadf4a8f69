"""Explain single images: what the model predicts, which regions each concept claims, how much each final
part adds to the predicted class, and how the image's fine concepts group into coarse ones.

:func:`explain` returns the data; :func:`explanation_figure` draws it; :func:`explain_files` is what
``ivpt explain IMAGE... --checkpoint CKPT --out DIR`` runs (one PNG and one JSON per image).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from ivpt.config import Config
from ivpt.errors import IVPTError
from ivpt.model.preprocessing import Preprocessing, preprocessing_of
from ivpt.outputs import prepare_output_dir, write_text
from ivpt.viz.drawing import draw_hierarchy, draw_image, draw_overlay, draw_part_bars, save_figure
from ivpt.viz.maps import denormalize_image, grouping_flow, part_contributions, region_areas
from ivpt.viz.palette import concept_palette

# Figure size of ``ivpt explain`` in inches at FIGURE_DPI: 1600 x 900 pixels whatever the model.
FIGURE_SIZE = (16.0, 9.0)
FIGURE_DPI = 100
TOP_K = 5
# Entries of an explanation that are arrays for drawing, not part of the JSON record.
ARRAY_KEYS = ("image", "concept_maps")

ImageInput = Image.Image | str | Path | Tensor


def load_image(path: str | Path) -> Image.Image:
    """Decode any image PIL reads, as RGB.

    Raises:
        IVPTError: the file does not exist or is not an image PIL can decode; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise IVPTError(f"image '{path}' does not exist" if not path.exists() else f"image '{path}' is not a file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise IVPTError(f"image '{path}' is not an image file PIL can read ({exc.__class__.__name__})") from None


def _preprocess(image: ImageInput, prep: Preprocessing) -> Tensor:
    """The test transform (short side to ``img_size``, centre crop, normalise) -> ``(3, H, W)``."""
    from ivpt.data.transforms import Normalize, image_transform

    height, width = _input_size(prep)

    if isinstance(image, Tensor):
        if image.dtype == torch.uint8 and tuple(image.shape) == (3, height, width):
            # Already the input's size (a data set's image): the test transform would leave it as it is.
            return Normalize(prep.mean, prep.std)(image.cpu())
        if image.dtype == torch.uint8:
            array = image.cpu().numpy()
            if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
                array = array.transpose(1, 2, 0)
            if array.ndim != 3 or array.shape[2] != 3:
                raise IVPTError(
                    f"explain: a uint8 image tensor must be (3, H, W) or (H, W, 3), got {tuple(image.shape)}"
                )
            image = Image.fromarray(np.ascontiguousarray(array))
        else:
            normalised = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
            if tuple(normalised.shape) != (3, height, width):
                raise IVPTError(
                    f"explain: a float image tensor must be a normalised (3, {height}, {width}) image "
                    f"(the test transform's output), got {tuple(image.shape)}"
                )
            return normalised.float()
    elif not isinstance(image, Image.Image):
        image = load_image(image)
    return image_transform(prep.img_size, prep.mean, prep.std)(image)


def _input_size(prep: Preprocessing) -> tuple[int, int]:
    """``(H, W)`` of the model's inputs."""
    size = prep.img_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _model_preprocessing(model: nn.Module) -> Preprocessing:
    prep = getattr(model, "preprocessing", None)
    if prep is None:
        raise IVPTError("explain: pass cfg=... (the model does not record its preprocessing)")
    return prep


def _class_entries(logits: Tensor, names: Sequence[str]) -> Callable[[int], dict[str, Any]]:
    """``index -> {"index", "name", "probability", "logit"}`` for one image's ``(C,)`` logits."""
    probabilities = logits.softmax(dim=0)

    def describe(index: int) -> dict[str, Any]:
        return {
            "index": index,
            "name": names[index],
            "probability": float(probabilities[index]),
            "logit": float(logits[index]),
        }

    return describe


def _prediction(logits: Tensor, names: Sequence[str]) -> dict[str, Any]:
    """``{"predicted", "top5"}`` of one image's ``(C,)`` logits."""
    describe = _class_entries(logits, names)
    top = logits.softmax(dim=0).topk(min(TOP_K, logits.numel())).indices.tolist()
    return {"predicted": describe(int(logits.argmax())), "top5": [describe(i) for i in top]}


@torch.no_grad()
def explain(
    model: nn.Module,
    image: ImageInput,
    *,
    cfg: Config | None = None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    disable: Mapping[str, Iterable[int]] | None = None,
) -> dict[str, Any]:
    """Run ``model`` on one image and gather everything its explanation shows.

    Args:
        model: an ivpt model (IVPT or a baseline); it runs in eval mode (deterministic grouping) and is
            put back in its previous mode afterwards.
        image: a PIL image, an image file path, a uint8 tensor ``(3, H, W)`` / ``(H, W, 3)`` (all three go
            through the test transform; a data set's ``dataset[i]["image"]``, already the model's input
            size, is only normalised), or a float tensor ``(3, S, S)`` that is already transformed and
            normalised (e.g. ``dataset.transform.normalize(dataset[i]["image"])``), used as is. Models on
            non-square ``(H, W)`` inputs take ``(3, H, W)``; images are scaled to cover ``H x W`` and
            centre-cropped.
        cfg: the model's config: ``cfg.model.img_size`` and ``cfg.data.mean/std`` define the test
            transform (unset ones: the backbone's). Without it the model's own ``preprocessing`` is used.
        class_names: names for the class indices (default ``"class <i>"``).
        device: where the forward runs (the model must already be there).
        disable: concepts to switch off, ``{"parts": [2], "stage1": [5]}``: final parts (0-based) leave
            the logits with exactly their share, concepts of an intermediate stage (key ``stage<s>``,
            1-based stage, 0-based concepts as in the figures) leave that stage's prompts
            (:class:`ivpt.model.intervention.Intervention`, docs/app.md). ``None``: the plain model.

    Returns:
        A dict with JSON-ready entries

        - ``method``: the model's method name;
        - ``predicted``: ``{"index", "name", "probability", "logit"}`` of the argmax class;
        - ``top5``: up to five ``{"index", "name", "probability", "logit"}``, most probable first;
        - ``parts``: ``[{"part": n, "contribution": share}]``, each final part's share of the predicted
          class's logit (they add up to ``predicted["logit"]``); empty for CLS-head methods;
        - ``stages``: per stage ``{"stage": s (1-based), "num_concepts": K_s, "areas": [K_s fractions of
          the image each concept claims], "groups_into_stage": t or None, "grouping": (K_s - 1) x N_t
          weights or None}`` (the last stage holds the final parts);

        and the drawing arrays ``image`` (``(H, W, 3)`` uint8, the transformed input) and
        ``concept_maps`` (per stage ``(K_s, h, w)`` float32 arrays).

        With ``disable`` (even an empty one) everything above describes the intervened model (a
        disabled part's contribution is 0 and it gets ``"disabled": true``; every stage gets
        ``"disabled": [concepts]``), and ``intervention`` holds ``{"disabled": {...} (sorted),
        "before": {"predicted", "top5"} of the plain model, "after": {"predicted", "top5",
        "original_class"}}``, ``original_class`` being the plain model's predicted class as scored
        after the intervention.

    Raises:
        IVPTError: a bad image, class names that do not fit, or a ``disable`` entry the model lacks.
    """
    from ivpt.model.intervention import Intervention

    prep = preprocessing_of(cfg) if cfg is not None else _model_preprocessing(model)
    pixels = _preprocess(image, prep)
    intervention = None
    if disable is not None:
        intervention = Intervention.from_disable(disable, tuple(getattr(model, "n_pro", ())))
    was_training = model.training
    model.eval()
    try:
        batch = pixels[None].to(device)
        output = model(batch) if intervention is None else model(batch, intervention=intervention)
        plain = output if intervention is None else model(batch)
    finally:
        model.train(was_training)

    logits = output.logits[0].float().cpu()
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(logits.numel())]
    if len(names) != logits.numel():
        raise IVPTError(f"explain: {len(names)} class names given for a model with {logits.numel()} classes")

    prediction = _prediction(logits, names)
    predicted = prediction["predicted"]["index"]
    parts: list[dict[str, Any]] = []
    if output.part_logits is not None:
        shares = part_contributions(output.part_logits[0], predicted)
        off = intervention.parts if intervention is not None else frozenset()
        for n, share in enumerate(shares):
            entry: dict[str, Any] = {"part": n, "contribution": 0.0 if n in off else float(share)}
            if intervention is not None:
                entry["disabled"] = n in off
            parts.append(entry)

    maps = [m[0].float().cpu().numpy() for m in output.concept_maps]
    targets = list(output.fusion_targets) or [len(maps) - 1] * len(output.groupings)
    stages = []
    for stage, stage_maps in enumerate(maps):
        grouped = stage < len(output.groupings)
        record: dict[str, Any] = {
            "stage": stage + 1,
            "num_concepts": int(stage_maps.shape[0]),
            "areas": region_areas(stage_maps, _input_size(prep)).tolist(),
            "groups_into_stage": targets[stage] + 1 if grouped else None,
            "grouping": output.groupings[stage][0].float().cpu().tolist() if grouped else None,
        }
        if intervention is not None:
            last = stage == len(maps) - 1
            record["disabled"] = sorted(intervention.parts if last else intervention.stage_concepts.get(stage, ()))
        stages.append(record)
    result: dict[str, Any] = {
        "method": str(getattr(model, "method", cfg.model.method if cfg is not None else "ivpt")),
        **prediction,
        "parts": parts,
        "stages": stages,
    }
    if intervention is not None:
        before = _prediction(plain.logits[0].float().cpu(), names)
        after = {**prediction, "original_class": _class_entries(logits, names)(before["predicted"]["index"])}
        result["intervention"] = {"disabled": intervention.to_disable(), "before": before, "after": after}
    result["image"] = denormalize_image(pixels, prep.mean, prep.std)
    result["concept_maps"] = maps
    return result


def explanation_record(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of an :func:`explain` result (the drawing arrays left out)."""
    return {key: value for key, value in result.items() if key not in ARRAY_KEYS}


def explanation_figure(result: dict[str, Any], title: str = "") -> Figure:
    """Draw an :func:`explain` result as one figure of :data:`FIGURE_SIZE` at :data:`FIGURE_DPI`.

    Top row: the input and every stage's concept maps over it, with legends. Bottom row: each final
    part's share of the predicted class's logit, and this image's fine-to-coarse grouping (edge width =
    grouping weight). Methods without concept maps get the input, the top-5 and a note.
    """
    figure = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    predicted = result["predicted"]
    heading = f"predicted: {predicted['name']} (p = {predicted['probability']:.2f}, logit = {predicted['logit']:.2f})"
    intervention = result.get("intervention")
    if intervention is not None and intervention["disabled"]:
        plain = intervention["before"]["predicted"]
        switched_off = ", ".join(f"{key} {values}" for key, values in intervention["disabled"].items())
        heading += f"  with {switched_off} switched off; before: {plain['name']} (p = {plain['probability']:.2f})"
    figure.suptitle(f"{title}\n{heading}" if title else heading, fontsize=11)
    maps: list[np.ndarray] = result["concept_maps"]
    top_lines = "\n".join(f"{i + 1}. {e['name']}  {e['probability']:.1%}" for i, e in enumerate(result["top5"]))

    if not maps:
        grid = figure.add_gridspec(1, 2, width_ratios=(1.0, 1.2), left=0.05, right=0.95, top=0.85, bottom=0.12)
        draw_image(figure.add_subplot(grid[0, 0]), result["image"], "input (test transform)")
        ax = figure.add_subplot(grid[0, 1])
        probabilities = [e["probability"] for e in result["top5"]]
        ax.barh(range(len(probabilities)), probabilities, color="#4477aa")
        ax.set_yticks(range(len(probabilities)), [e["name"] for e in result["top5"]], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("probability", fontsize=9)
        ax.set_title("top-5", fontsize=10)
        figure.text(
            0.5,
            0.03,
            f"method '{result['method']}' has no concept maps: only its prediction can be shown",
            ha="center",
            fontsize=10,
            style="italic",
        )
        return figure

    num_stages = len(maps)
    num_concepts = [m.shape[0] for m in maps]
    palette = concept_palette(num_concepts)
    grid = figure.add_gridspec(
        2, num_stages + 1, height_ratios=(1.25, 1.0), left=0.03, right=0.98, top=0.9, bottom=0.06, hspace=0.55
    )
    input_ax = figure.add_subplot(grid[0, 0])
    draw_image(input_ax, result["image"], "input (test transform)")
    input_ax.text(0.0, -0.04, "top-5:\n" + top_lines, transform=input_ax.transAxes, va="top", fontsize=7)
    for stage, stage_maps in enumerate(maps):
        areas = np.asarray(result["stages"][stage]["areas"])
        draw_overlay(
            figure.add_subplot(grid[0, stage + 1]),
            result["image"],
            stage_maps,
            palette[stage],
            areas,
            stage,
            num_stages,
        )

    bottom = grid[1, :].subgridspec(1, 2, width_ratios=(1.0, 2.2), wspace=0.15)
    if result["parts"]:
        shares = np.array([p["contribution"] for p in result["parts"]])
        draw_part_bars(
            figure.add_subplot(bottom[0, 0]),
            shares,
            palette[-1],
            f"part evidence for '{predicted['name']}'\n(shares of its logit, sum = {shares.sum():.2f})",
            disabled=[p["part"] for p in result["parts"] if p.get("disabled")],
        )
    flow_ax = figure.add_subplot(bottom[0, 1])
    groupings = [np.asarray(s["grouping"]) for s in result["stages"] if s["grouping"] is not None]
    if groupings:
        targets = [s["groups_into_stage"] - 1 for s in result["stages"] if s["grouping"] is not None]
        areas_fg = [np.asarray(s["areas"][:-1]) for s in result["stages"]]
        active = [a > 0 for a in areas_fg]
        for stage, record in enumerate(result["stages"]):
            active[stage][record.get("disabled", [])] = False
        hollow = "no region here or switched off" if intervention is not None else "no region here"
        draw_hierarchy(
            flow_ax,
            [k - 1 for k in num_concepts],
            grouping_flow(groupings, targets),
            palette,
            node_sizes=areas_fg,
            active=active,
            title=f"this image's fine-to-coarse grouping (edge width = weight; hollow = {hollow})",
        )
    else:
        flow_ax.set_axis_off()
        flow_ax.text(
            0.5, 0.5, "no concept grouping in this model (single stage or fusion off)", ha="center", fontsize=9
        )
    return figure


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for the outputs, made unique (``a/x.jpg`` and ``b/x.png`` -> ``x``, ``x-2``)."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def explain_files(
    images: Sequence[str | Path],
    checkpoint: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    device: str | None = None,
) -> list[Path]:
    """Explain image files with a trained checkpoint: ``OUT/<stem>.png`` and ``OUT/<stem>.json`` each.

    Every image is checked before the model is loaded, so a bad file fails fast and nothing is written.

    Args:
        images: image files in any format PIL reads (converted to RGB).
        checkpoint: checkpoint written by ``ivpt train`` (or ``ivpt convert-official``), a folder written by
            ``ivpt export``, or ``hf-hub:org/name``.
        out_dir: output folder (created).
        overrides: ``key=value`` config overrides for the stored config.
        device: ``"cuda"`` when available unless given.

    Returns:
        The PNG paths, in the order of ``images``.

    Raises:
        IVPTError: an image is missing or unreadable, or the checkpoint is invalid.
    """
    from ivpt.model.pretrained import load_checkpoint

    paths = [Path(p) for p in images]
    if not paths:
        raise IVPTError("explain: no image files given")
    for path in paths:
        load_image(path)
    device = device or default_device()
    model, cfg, info = load_checkpoint(checkpoint, overrides, device)
    out = prepare_output_dir(out_dir)
    written = []
    for path, stem in zip(paths, _output_stems(paths), strict=True):
        result = explain(model, load_image(path), cfg=cfg, class_names=info["class_names"], device=device)
        figure = explanation_figure(result, title=path.name)
        written.append(save_figure(figure, out / f"{stem}.png"))
        record = {"image": str(path), "checkpoint": str(checkpoint), **explanation_record(result)}
        write_text(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    return written


__all__ = [
    "FIGURE_DPI",
    "FIGURE_SIZE",
    "default_device",
    "explain",
    "explain_files",
    "explanation_figure",
    "explanation_record",
    "load_image",
]
