"""One colour per concept, the same in every figure drawn for a model.

Colours depend only on ``(stage, concept index)`` and the stage sizes, never on the data, so the
explanation of an image, the report's galleries and the hierarchy drawing all agree. Within a stage the
foreground hues are spread evenly around the colour wheel (neighbours alternate in brightness when a stage
has many concepts) and every stage starts at a different hue, so that "concept 3 of stage 1" and
"concept 3 of stage 2" do not look alike. The background (the last prototype of every stage) is grey.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

from ivpt.errors import IVPTError

BACKGROUND_RGB: tuple[float, float, float] = (0.62, 0.62, 0.62)

# Successive stages start their hue circle this far apart: the golden-ratio fraction of a turn never lines
# two stages' hues up exactly.
_STAGE_HUE_SHIFT = 0.381966
# Above this many foreground concepts in one stage, adjacent hues get too close to tell apart by hue alone;
# alternating brightness separates them again.
_MAX_CONCEPTS_BY_HUE = 9


def concept_palette(num_concepts_per_stage: Sequence[int]) -> list[np.ndarray]:
    """Colours for every prototype of every stage.

    Args:
        num_concepts_per_stage: ``K_s`` for each stage, shallow to deep; each count includes the
            background, which is the last prototype of the stage (as in ``cfg.model.n_pro``).

    Returns:
        One float array ``(K_s, 3)`` of RGB values in ``[0, 1]`` per stage; row ``K_s - 1`` is the
        background grey :data:`BACKGROUND_RGB`.

    Raises:
        IVPTError: if a stage has fewer than 2 prototypes (one foreground concept plus the background).
    """
    palette: list[np.ndarray] = []
    for stage, count in enumerate(num_concepts_per_stage):
        if int(count) < 2:
            raise IVPTError(
                f"concept_palette: stage {stage} has {count} prototypes; expected at least 2 "
                "(foreground concepts plus the background)"
            )
        num_foreground = int(count) - 1
        colours = np.empty((int(count), 3), dtype=np.float64)
        alternate = num_foreground > _MAX_CONCEPTS_BY_HUE
        for concept in range(num_foreground):
            hue = (concept / num_foreground + stage * _STAGE_HUE_SHIFT) % 1.0
            value = 0.95 if not alternate or concept % 2 == 0 else 0.68
            colours[concept] = colorsys.hsv_to_rgb(hue, 0.78, value)
        colours[-1] = BACKGROUND_RGB
        palette.append(colours)
    return palette


def to_hex(rgb: Sequence[float] | np.ndarray) -> str:
    """``(r, g, b)`` in ``[0, 1]`` -> ``'#rrggbb'`` (for HTML and matplotlib)."""
    r, g, b = (int(round(float(np.clip(c, 0.0, 1.0)) * 255)) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


__all__ = ["BACKGROUND_RGB", "concept_palette", "to_hex"]
