"""Matplotlib building blocks shared by ``ivpt explain`` and ``ivpt report``.

Figures are built on :class:`matplotlib.figure.Figure` directly (rendered by Agg when saved), never through
``pyplot``: no global backend switch, no figure registry to leak, safe to call from any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, PathPatch
from matplotlib.path import Path as CurvePath
from PIL import Image

from ivpt.outputs import naming
from ivpt.viz.maps import FlowEdge, overlay_maps
from ivpt.viz.palette import to_hex

# Edges lighter than this are hidden in hierarchy drawings: a concept spreads a little weight over every
# target, and drawing all of it hides the structure.
MIN_DRAWN_WEIGHT = 0.05
_MAX_EDGE_WIDTH = 7.0


def concept_label(stage: int, concept: int, num_stages: int) -> str:
    """Short name of a concept in every figure and table: ``'s2:c5'``; final-stage concepts are parts."""
    if stage == num_stages - 1:
        return f"part {concept}"
    return f"s{stage + 1}:c{concept}"


# zlib level of every PNG written: encoding at the default level took longer than drawing a figure;
# level 1 writes the same pixels in about half the time (a fifth for photo crops) for 2-16 % more bytes.
PNG_COMPRESS_LEVEL = 1


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG at its own size (no tight cropping, so the pixel size is predictable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path):
        figure.savefig(
            path, format="png", dpi=figure.dpi, facecolor="white", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL}
        )
    return path


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path):
        Image.fromarray(image).save(path, format="png", compress_level=PNG_COMPRESS_LEVEL)
    return path


def draw_image(ax: Axes, image: np.ndarray, title: str) -> None:
    """Show an ``(H, W, 3)`` uint8 image without axes."""
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def draw_overlay(
    ax: Axes,
    image: np.ndarray,
    maps: np.ndarray,
    palette: np.ndarray,
    areas: np.ndarray,
    stage: int,
    num_stages: int,
    *,
    max_legend_entries: int = 18,
) -> None:
    """One stage's concept maps coloured over the image, with a legend of the concepts present.

    Args:
        image: ``(H, W, 3)`` uint8.
        maps: ``(K, h, w)`` soft maps of this stage (background last).
        palette: ``(K, 3)`` colours of this stage.
        areas: ``(K,)`` fraction of the image each concept claims (legend order and labels).
    """
    ax.imshow(overlay_maps(image, maps, palette), interpolation="nearest")
    title = "final parts" if stage == num_stages - 1 else f"stage {stage + 1}"
    ax.set_title(f"{title} ({maps.shape[0] - 1} concepts + bg)", fontsize=9)
    ax.set_axis_off()
    present = [k for k in np.argsort(-areas, kind="stable") if areas[k] > 0][:max_legend_entries]
    handles = [
        Patch(
            facecolor=to_hex(palette[k]),
            edgecolor="black" if k == len(areas) - 1 else "none",
            label=f"{'bg' if k == len(areas) - 1 else concept_label(stage, int(k), num_stages)} {areas[k]:.0%}",
        )
        for k in present
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.01),
        ncol=2,
        fontsize=6,
        frameon=False,
        handlelength=1.0,
        columnspacing=0.8,
    )


def draw_part_bars(
    ax: Axes, contributions: np.ndarray, palette: np.ndarray, title: str, disabled: Sequence[int] = ()
) -> None:
    """Horizontal bars: each final part's share of a class logit (shares add up to the logit).

    Args:
        contributions: ``(N,)`` part shares.
        palette: final-stage colours ``(N + 1, 3)``.
        disabled: parts switched off by an intervention (their bar is labelled so instead of 0).
    """
    num_parts = len(contributions)
    rows = np.arange(num_parts)
    ax.barh(rows, contributions, color=[to_hex(palette[n]) for n in range(num_parts)], edgecolor="black", lw=0.5)
    ax.set_yticks(rows, [f"part {n}" for n in range(num_parts)], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", lw=0.8)
    for row, value in zip(rows, contributions, strict=True):
        ax.annotate(
            "switched off" if row in disabled else f"{value:+.2f}",
            (value, row),
            xytext=(3 if value >= 0 else -3, 0),
            textcoords="offset points",
            ha="left" if value >= 0 else "right",
            va="center",
            fontsize=7,
        )
    ax.margins(x=0.25)
    ax.set_xlabel("share of the logit", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)


def hierarchy_positions(num_foreground: Sequence[int], edges: Sequence[FlowEdge]) -> list[np.ndarray]:
    """Vertical position of each foreground concept in a hierarchy drawing, per stage.

    The deepest stage keeps its natural order; every shallower stage is sorted by where its concepts'
    strongest target sits, so that edges cross as little as possible and the drawing reads as a tree.

    Returns:
        Per stage, ``(K_s - 1,)`` positions in ``[0, 1]`` (0 at the top).
    """

    def spread(count: int) -> np.ndarray:
        return np.linspace(0.0, 1.0, count) if count > 1 else np.full(count, 0.5)

    positions = [spread(count) for count in num_foreground]
    strongest: dict[tuple[int, int], FlowEdge] = {}
    for edge in edges:
        key = (edge.source_stage, edge.source_concept)
        if key not in strongest or edge.weight > strongest[key].weight:
            strongest[key] = edge
    for stage in reversed(range(len(num_foreground) - 1)):
        anchors = []
        for concept in range(num_foreground[stage]):
            edge = strongest.get((stage, concept))
            anchors.append(positions[edge.target_stage][edge.target_concept] if edge else 2.0)
        order = np.argsort(np.asarray(anchors) + 1e-6 * np.arange(len(anchors)), kind="stable")
        slots = spread(num_foreground[stage])
        positions[stage] = np.empty(num_foreground[stage])
        positions[stage][order] = slots
    return positions


def draw_hierarchy(
    ax: Axes,
    num_foreground: Sequence[int],
    edges: Sequence[FlowEdge],
    palette: Sequence[np.ndarray],
    *,
    node_sizes: Sequence[np.ndarray] | None = None,
    active: Sequence[np.ndarray] | None = None,
    title: str = "",
) -> None:
    """Draw the fine-to-coarse concept flow: one column of nodes per stage, edges width = weight.

    Args:
        num_foreground: ``K_s - 1`` per stage.
        edges: from :func:`ivpt.viz.maps.grouping_flow`.
        palette: per stage ``(K_s, 3)`` colours.
        node_sizes: per stage ``(K_s - 1,)`` values in ``[0, 1]`` (e.g. region areas) scaling the markers.
        active: per stage ``(K_s - 1,)`` booleans; inactive concepts (no region in this image) are drawn
            hollow and their (uninformative, uniform) edges are left out.
    """
    num_stages = len(num_foreground)
    positions = hierarchy_positions(num_foreground, edges)
    for edge in edges:
        if edge.weight < MIN_DRAWN_WEIGHT:
            continue
        if active is not None and not active[edge.source_stage][edge.source_concept]:
            continue
        x0, y0 = float(edge.source_stage), float(positions[edge.source_stage][edge.source_concept])
        x1, y1 = float(edge.target_stage), float(positions[edge.target_stage][edge.target_concept])
        bend = 0.45 * (x1 - x0) if x1 - x0 <= 1 else 0.6
        curve = CurvePath(
            [(x0, y0), (x0 + bend, y0), (x1 - bend, y1), (x1, y1)], [CurvePath.MOVETO] + [CurvePath.CURVE4] * 3
        )
        ax.add_patch(
            PathPatch(
                curve,
                facecolor="none",
                edgecolor=to_hex(palette[edge.source_stage][edge.source_concept]),
                lw=max(0.4, _MAX_EDGE_WIDTH * edge.weight),
                alpha=0.55,
                capstyle="butt",
                zorder=1,
            )
        )
    for stage, count in enumerate(num_foreground):
        sizes = node_sizes[stage] if node_sizes is not None else np.full(count, 0.25)
        for concept in range(count):
            colour = to_hex(palette[stage][concept])
            is_active = active is None or bool(active[stage][concept])
            ax.scatter(
                [stage],
                [positions[stage][concept]],
                s=30 + 400 * float(np.sqrt(np.clip(sizes[concept], 0.0, 1.0))),
                facecolor=colour if is_active else "white",
                edgecolor=colour if not is_active else "black",
                linewidth=1.0,
                zorder=2,
            )
            ax.annotate(
                concept_label(stage, concept, num_stages),
                (stage, positions[stage][concept]),
                xytext=(0, 7),
                textcoords="offset points",
                ha="center",
                fontsize=6,
                zorder=3,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.75},
            )
    ax.set_xlim(-0.4, num_stages - 0.6)
    ax.set_ylim(1.12, -0.12)
    ax.set_xticks(range(num_stages), [f"stage {s + 1}" for s in range(num_stages - 1)] + ["final parts"], fontsize=8)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)


__all__ = [
    "MIN_DRAWN_WEIGHT",
    "concept_label",
    "draw_hierarchy",
    "draw_image",
    "draw_overlay",
    "draw_part_bars",
    "hierarchy_positions",
    "save_figure",
]
