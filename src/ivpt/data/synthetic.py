"""A procedurally drawn fine-grained data set of part-based "birds", written in the CUB-200-2011 layout.

Every image shows one creature made of eight named parts (:data:`PART_NAMES`: beak, head, eye, breast,
back, wing, tail, legs; each with a keypoint at its centre) over a cluttered background (smooth colour
noise, random shapes, patterned distractor blobs). Position, size, rotation, mirroring and pose (head
tilt, wing and tail angle, leg spread) vary; parts may leave the frame, and their keypoints then have
``visible = 0``.

Classes are defined by a *family* (:data:`FAMILIES`): a few attribute axes, each a local property of one
part (a colour, a pattern such as stripes or dots, a shape). Each class fixes one value per axis; every
other attribute of every part is drawn per image from one shared distribution, and the background
repeats the class-defining colours and patterns. Any two classes differ in one to three local attributes,
so a classifier has to look at the right parts. The ``"pretrain"`` family uses other parts and palettes
than ``"default"``, for pretraining a backbone on a different task. Class definitions depend only on the
family; ``seed`` changes the images.

Output (``out/``), exactly as CUB-200-2011 (1-based ids):

- ``images/<NNN.Class_name>/<Class_name>_<k>.jpg`` and ``images.txt``, ``classes.txt``,
  ``image_class_labels.txt``, ``train_test_split.txt`` (half of each class, rounded up, for training),
  ``bounding_boxes.txt`` (box of the visible creature), ``parts/parts.txt``, ``parts/part_locs.txt``;
- ``segmentations/<NNN.Class_name>/<Class_name>_<k>.png``: foreground probability (0-255, soft edges);
- ``part_masks/<NNN.Class_name>/<Class_name>_<k>.png``: per pixel the id of the part drawn on top there
  (1-based ids of ``parts/parts.txt``), 0 for background;
- ``synthetic.json``: the generator's settings and each class's attributes.

The same arguments give byte-identical files.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ivpt.errors import DataError

PART_NAMES: tuple[str, ...] = ("beak", "head", "eye", "breast", "back", "wing", "tail", "legs")
PART_ID = {name: i + 1 for i, name in enumerate(PART_NAMES)}

PATTERNS: tuple[str, ...] = ("plain", "striped", "spotted", "barred", "edged")
BEAK_SHAPES: tuple[str, ...] = ("short", "long", "hooked", "thick")
TAIL_SHAPES: tuple[str, ...] = ("fan", "forked", "pointed", "square")
Colour = tuple[int, int, int]
# The demo family's creature: large in the frame and near its centre, as a bird in a CUB box crop.
DEMO_SCALE = (0.45, 0.6)
DEMO_CENTRE = (0.38, 0.62)
# "Classes" (groups of images) of a family without class-defining axes: no limit in practice.
_MAX_GROUPS = 1_000_000


@dataclass(frozen=True)
class Family:
    """What a family's images show.

    Attributes:
        axes: class-defining attribute axes, axis name -> {value name: value}. A family without axes
            (``"generic"``) has no classes: its "classes" are groups of images from one distribution.
        scale: range of the creature's size, one body-length unit as a fraction of the image side (the
            creature from tail tip to beak tip is about 1.6 units long).
        centre: range of the creature's body centre, as a fraction of the image side (each coordinate).
        wide_colours: draw every free colour from the whole colour solid (greys, near-black and near-white
            included) instead of the mid-saturation, mid-brightness range.
    """

    axes: dict[str, dict[str, Any]] = field(default_factory=dict)
    scale: tuple[float, float] = (0.32, 0.55)
    centre: tuple[float, float] = (0.25, 0.75)
    wide_colours: bool = False

    @property
    def max_classes(self) -> int:
        return math.prod(len(values) for values in self.axes.values()) if self.axes else _MAX_GROUPS


FAMILIES: dict[str, Family] = {
    "default": Family(
        {
            "head_colour": {
                "Red": (214, 40, 40),
                "Blue": (40, 84, 214),
                "Yellow": (236, 206, 40),
                "White": (240, 240, 236),
                "Black": (28, 28, 30),
                "Orange": (240, 136, 30),
            },
            "wing_pattern": {p.capitalize(): p for p in PATTERNS},
            "beak_shape": {s.capitalize(): s for s in BEAK_SHAPES},
        },
        scale=DEMO_SCALE,
        centre=DEMO_CENTRE,
    ),
    "pretrain": Family(
        {
            "breast_pattern": {p.capitalize(): p for p in PATTERNS},
            "tail_shape": {s.capitalize(): s for s in TAIL_SHAPES},
            "tail_colour": {
                "Green": (40, 170, 70),
                "Purple": (130, 50, 170),
                "Cyan": (40, 200, 210),
                "Pink": (236, 120, 170),
                "Brown": (120, 76, 40),
            },
        }
    ),
    # No classes: every attribute of every part drawn per image, over ranges that hold every other
    # family's values (the widest colours, the sizes of both other families and more).
    "generic": Family({}, scale=(0.3, 0.66), centre=(0.25, 0.75), wide_colours=True),
}
# The part each attribute axis belongs to (and class names such as "Red_head_Striped_wing_Hooked_beak").
AXIS_PART: dict[str, str] = {
    "head_colour": "head",
    "wing_pattern": "wing",
    "beak_shape": "beak",
    "breast_pattern": "breast",
    "tail_shape": "tail",
    "tail_colour": "tail",
}
_FAMILY_SALT = {"default": 11, "pretrain": 23, "generic": 37}
_COLOUR_JITTER = 14
_SUPERSAMPLE = 2
_JPEG_QUALITY = 92


def class_definitions(family: str, num_classes: int) -> list[tuple[str, dict[str, str]]]:
    """The first ``num_classes`` classes of ``family``: ``(name, {axis: value name})`` each."""
    spec = FAMILIES[family]
    if not spec.axes:
        return [(f"Group_{index + 1}", {}) for index in range(num_classes)]
    combos = list(product(*(list(values) for values in spec.axes.values())))
    order = np.random.default_rng(_FAMILY_SALT[family]).permutation(len(combos))[:num_classes]
    classes = []
    for index in order:
        values = dict(zip(spec.axes, combos[index], strict=True))
        name = "_".join(f"{value}_{AXIS_PART[axis]}" for axis, value in values.items())
        classes.append((name, values))
    return classes


# --- geometry helpers (local creature frame: facing +x, y down, ~1 unit = body length) -------------


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rotate(points: np.ndarray, angle_deg: float, pivot: Sequence[float]) -> np.ndarray:
    theta = math.radians(angle_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return (points - np.asarray(pivot)) @ rot.T + np.asarray(pivot)


def _beak(shape: str, base: np.ndarray) -> np.ndarray:
    bx, by = base
    if shape == "short":
        return np.array([[bx, by - 0.045], [bx + 0.13, by], [bx, by + 0.045]])
    if shape == "long":
        return np.array([[bx, by - 0.035], [bx + 0.32, by + 0.01], [bx, by + 0.03]])
    if shape == "hooked":
        return np.array(
            [
                [bx, by - 0.05],
                [bx + 0.12, by - 0.04],
                [bx + 0.19, by + 0.0],
                [bx + 0.17, by + 0.08],
                [bx + 0.11, by + 0.02],
                [bx, by + 0.04],
            ]
        )
    # thick
    return np.array([[bx, by - 0.08], [bx + 0.17, by], [bx, by + 0.08]])


def _tail(shape: str, base: np.ndarray) -> np.ndarray:
    bx, by = base
    if shape == "fan":
        return np.array(
            [
                [bx + 0.02, by - 0.05],
                [bx - 0.34, by - 0.2],
                [bx - 0.4, by + 0.0],
                [bx - 0.34, by + 0.2],
                [bx + 0.02, by + 0.05],
            ]
        )
    if shape == "forked":
        return np.array(
            [
                [bx + 0.02, by - 0.05],
                [bx - 0.4, by - 0.17],
                [bx - 0.24, by],
                [bx - 0.4, by + 0.17],
                [bx + 0.02, by + 0.05],
            ]
        )
    if shape == "pointed":
        return np.array([[bx + 0.02, by - 0.06], [bx - 0.48, by + 0.0], [bx + 0.02, by + 0.06]])
    # square
    return np.array([[bx + 0.02, by - 0.07], [bx - 0.3, by - 0.08], [bx - 0.3, by + 0.08], [bx + 0.02, by + 0.07]])


def _random_colour(rng: np.random.Generator, wide: bool = False) -> Colour:
    """A colour from the mid range of saturation and brightness, or with ``wide`` from the whole solid.

    The wide draw gives a grey (saturation below 0.1) one time in five, and brightness from near-black to
    white, so that it covers the pure white and near-black head colours of the demo's classes.
    """
    if not wide:
        r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.15, 0.9), rng.uniform(0.25, 0.95))
    else:
        grey = rng.uniform() < 0.2
        saturation = rng.uniform(0.0, 0.1) if grey else rng.uniform(0.1, 1.0)
        r, g, b = colorsys.hsv_to_rgb(rng.uniform(), saturation, rng.uniform(0.05, 1.0))
    return (int(r * 255), int(g * 255), int(b * 255))


def _jitter(colour: Colour, rng: np.random.Generator) -> Colour:
    noise = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
    return tuple(int(v) for v in np.clip(np.asarray(colour) + noise, 0, 255))  # type: ignore[return-value]


def _contrast(colour: Colour) -> Colour:
    """A pattern colour that stands out on ``colour``: dark on light, light on dark."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    if luminance > 128:
        return tuple(int(v * 0.2) for v in colour)  # type: ignore[return-value]
    return tuple(int(150 + v * 0.4) for v in colour)  # type: ignore[return-value]


# --- drawing -------------------------------------------------------------------------------------------


class _Canvas:
    """A supersampled RGB picture plus part layers, drawn in creature-local coordinates.

    ``set_pose`` maps local points to pixel-centre coordinates of the supersampled picture
    (:meth:`to_centres`). PIL fills polygons in pixel-*edge* coordinates (pixel ``i`` spans
    ``[i, i + 1]``), hence the half-pixel shift in :meth:`_outline`. Parts are also drawn straight at
    the output resolution (``parts``, ids) so that the part map is as sharp and as well placed as it can
    be, and at full resolution as coverage (``coverage``, 255), which averages into a soft foreground.
    """

    def __init__(self, background: Image.Image, factor: int) -> None:
        self.image = background
        self.draw = ImageDraw.Draw(self.image)
        self.factor = factor
        self.coverage = Image.new("L", background.size, 0)
        self.parts = Image.new("L", (background.width // factor, background.height // factor), 0)
        self.origin = np.zeros(2)
        self.linear = np.eye(2)
        self.unit = 1.0  # pixels per local unit, for line widths

    def set_pose(self, origin: Sequence[float], scale: float, angle_deg: float, mirror: bool) -> None:
        theta = math.radians(angle_deg)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        self.origin = np.asarray(origin, dtype=np.float64)
        self.linear = scale * rot @ np.diag([-1.0 if mirror else 1.0, 1.0])
        self.unit = scale

    def to_centres(self, points: np.ndarray) -> np.ndarray:
        """``(n, 2)`` local points -> pixel-centre coordinates of the supersampled picture."""
        return points @ self.linear.T + self.origin

    def _outline(self, points: np.ndarray, shrink: int = 1) -> list[tuple[float, float]]:
        """PIL drawing coordinates of local points, on a picture ``shrink`` times smaller."""
        return [(float(x), float(y)) for x, y in (self.to_centres(points) + 0.5) / shrink]

    def shape(
        self,
        polygon: np.ndarray,
        colour: Colour,
        part_id: int = 0,
        pattern: str = "plain",
        pattern_colour: Colour = (0, 0, 0),
    ) -> None:
        """Fill a local-coordinate polygon; ``part_id > 0`` also claims its pixels in the part layers."""
        outline = self._outline(polygon)
        self.draw.polygon(outline, fill=colour)
        if part_id:
            ImageDraw.Draw(self.coverage).polygon(outline, fill=255)
            ImageDraw.Draw(self.parts).polygon(self._outline(polygon, self.factor), fill=part_id)
        if pattern != "plain":
            self._pattern(polygon, outline, pattern, pattern_colour)

    def _pattern(self, polygon: np.ndarray, outline: list[tuple[float, float]], pattern: str, colour: Colour) -> None:
        # Draw the pattern on a copy, then paste it back through the polygon's mask: patterns stay inside.
        mask = Image.new("L", self.image.size, 0)
        ImageDraw.Draw(mask).polygon(outline, fill=255)
        overlay = self.image.copy()
        draw = ImageDraw.Draw(overlay)
        (x0, y0), (x1, y1) = polygon.min(axis=0), polygon.max(axis=0)
        width = max(1, round(0.035 * self.unit))
        if pattern == "striped":
            for y in np.arange(y0 + 0.03, y1, 0.075):
                draw.line(self._outline(np.array([[x0, y], [x1, y]])), fill=colour, width=width)
        elif pattern == "barred":
            for x in np.arange(x0 + 0.05, x1, 0.15):
                bar = np.array([[x, y0], [x + 0.065, y0], [x + 0.065, y1], [x, y1]])
                draw.polygon(self._outline(bar), fill=colour)
        elif pattern == "spotted":
            for row, y in enumerate(np.arange(y0 + 0.03, y1, 0.085)):
                for x in np.arange(x0 + 0.03 + 0.04 * (row % 2), x1, 0.085):
                    draw.polygon(self._outline(_ellipse(x, y, 0.03, 0.03, n=10)), fill=colour)
        elif pattern == "edged":
            draw.line(outline + [outline[0]], fill=colour, width=2 * width, joint="curve")
        self.image.paste(overlay, (0, 0), mask)


def _background(size: int, rng: np.random.Generator, family: Family) -> Image.Image:
    """Smooth colour noise, random shapes and patterned blobs in the family's own colours."""
    coarse = rng.integers(30, 226, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    palette = [c for values in family.axes.values() for c in values.values() if isinstance(c, tuple)]
    for _ in range(int(rng.integers(10, 22))):
        colour = palette[int(rng.integers(len(palette)))] if palette and rng.uniform() < 0.25 else _random_colour(rng)
        x, y = rng.uniform(-0.1, 1.1, 2) * size
        w, h = rng.uniform(0.03, 0.3, 2) * size
        kind = int(rng.integers(4))
        if kind == 0:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        elif kind == 2:
            draw.polygon([(x, y), (x + w, y + rng.uniform(0, h)), (x + rng.uniform(0, w), y + h)], fill=colour)
        else:
            draw.line([(x, y), (x + w, y + h)], fill=colour, width=max(1, int(size * 0.015)))
    return image


@dataclass
class _Drawn:
    """One rendered picture.

    Attributes:
        image: RGB picture.
        part_map: ``(H, W)`` uint8 id of the part on top at each pixel, 0 for background.
        foreground: ``(H, W)`` uint8 share of each pixel covered by the creature, 0-255.
        keypoints: ``(P, 3)`` ``(x, y, visible)`` in pixel-centre coordinates.
    """

    image: Image.Image
    part_map: np.ndarray
    foreground: np.ndarray
    keypoints: np.ndarray


def _draw_sample(size: int, family: Family, attributes: dict[str, str], rng: np.random.Generator) -> _Drawn:
    """Draw one creature of the class with ``attributes`` (``{axis: value name}``) at ``size`` pixels."""
    big = size * _SUPERSAMPLE
    canvas = _Canvas(_background(big, rng, family), _SUPERSAMPLE)
    wide = family.wide_colours
    # Patterned distractor blobs: the class patterns and colours also occur off the creature.
    for _ in range(2):
        canvas.set_pose(rng.uniform(0.0, 1.0, 2) * big, big * rng.uniform(0.2, 0.45), rng.uniform(-90, 90), False)
        canvas.shape(
            _ellipse(0.0, 0.0, 0.3, 0.15),
            _random_colour(rng, wide),
            pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
            pattern_colour=_random_colour(rng, wide),
        )

    # Every attribute from the shared distribution, then the class's axes override theirs.
    look: dict[str, Any] = {
        "head_colour": _random_colour(rng, wide),
        "wing_pattern": PATTERNS[int(rng.integers(len(PATTERNS)))],
        "beak_shape": BEAK_SHAPES[int(rng.integers(len(BEAK_SHAPES)))],
        "breast_pattern": PATTERNS[int(rng.integers(len(PATTERNS)))],
        "tail_shape": TAIL_SHAPES[int(rng.integers(len(TAIL_SHAPES)))],
        "tail_colour": _random_colour(rng, wide),
    }
    for axis, value_name in attributes.items():
        value = family.axes[axis][value_name]
        look[axis] = _jitter(value, rng) if isinstance(value, tuple) else value
    body, wing, breast, beak_colour, leg_colour, eye_colour = (_random_colour(rng, wide) for _ in range(6))

    # Pose.
    head_tilt, wing_angle, tail_angle = rng.uniform(-20, 20), rng.uniform(-12, 30), rng.uniform(-20, 20)
    spread = rng.uniform(0.0, 0.08)
    canvas.set_pose(
        origin=rng.uniform(*family.centre, 2) * big,
        scale=big * rng.uniform(*family.scale),
        angle_deg=rng.uniform(-35, 35),
        mirror=bool(rng.uniform() < 0.5),
    )

    neck = (0.3, -0.16)
    head_c = _rotate(np.array([[0.45, -0.3]]), head_tilt, neck)[0]
    eye_c = _rotate(np.array([[0.5, -0.33]]), head_tilt, neck)[0]
    beak = _rotate(_beak(look["beak_shape"], np.array([0.58, -0.29])), head_tilt, neck)
    body_outline = _ellipse(0.0, 0.0, 0.42, 0.24, n=36)
    breast_poly = body_outline[body_outline[:, 0] >= 0.02]
    back_poly = body_outline[body_outline[:, 0] <= 0.02]
    wing_poly = _rotate(_ellipse(-0.06, -0.05, 0.32, 0.15), wing_angle, (0.15, -0.08))
    tail_poly = _rotate(_tail(look["tail_shape"], np.array([-0.38, -0.03])), tail_angle, (-0.38, -0.03))
    feet = np.array([[0.06 + spread, 0.52], [-0.08 - spread, 0.52]])
    legs = [
        np.array([[x0 - 0.015, 0.18], [x0 + 0.015, 0.18], [fx + 0.015, fy], [fx - 0.015, fy]])
        for x0, (fx, fy) in zip((0.06, -0.08), feet, strict=True)
    ]
    toes = [
        np.array([[fx - 0.02, fy - 0.015], [fx + 0.09, fy - 0.01], [fx + 0.09, fy + 0.015], [fx - 0.02, fy + 0.015]])
        for fx, fy in feet
    ]

    # Back to front, so the part layer records what is visible.
    for polygon in legs + toes:
        canvas.shape(polygon, leg_colour, PART_ID["legs"])
    canvas.shape(tail_poly, look["tail_colour"], PART_ID["tail"])
    canvas.shape(back_poly, body, PART_ID["back"])
    canvas.shape(breast_poly, breast, PART_ID["breast"], look["breast_pattern"], _contrast(breast))
    canvas.shape(wing_poly, wing, PART_ID["wing"], look["wing_pattern"], _contrast(wing))
    canvas.shape(_ellipse(*head_c, 0.16, 0.15), look["head_colour"], PART_ID["head"])
    canvas.shape(beak, beak_colour, PART_ID["beak"])
    canvas.shape(_ellipse(*eye_c, 0.04, 0.04, n=12), eye_colour, PART_ID["eye"])

    centres = {
        "beak": beak.mean(axis=0),
        "head": head_c,
        "eye": eye_c,
        "breast": np.array([0.22, 0.06]),
        "back": np.array([-0.2, -0.06]),
        "wing": wing_poly.mean(axis=0),
        "tail": tail_poly.mean(axis=0),
        "legs": feet.mean(axis=0) - np.array([0.0, 0.12]),
    }
    local = np.stack([centres[name] for name in PART_NAMES])
    # A supersampled pixel centre x_big covers output pixel (x_big - 0.5) / factor in pixel-centre terms.
    xy = (canvas.to_centres(local) - (_SUPERSAMPLE - 1) / 2.0) / _SUPERSAMPLE

    image = canvas.image.resize((size, size), Image.Resampling.BOX)
    part_map = np.asarray(canvas.parts)
    foreground = np.asarray(canvas.coverage.resize((size, size), Image.Resampling.BOX))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 5.0, (size, size, 3))
    image = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))

    keypoints = np.zeros((len(PART_NAMES), 3), dtype=np.float32)
    present = np.isin(np.arange(1, len(PART_NAMES) + 1), part_map)
    inside = np.all((xy >= 0.0) & (xy <= size - 1.0), axis=1)
    visible = present & inside
    keypoints[visible, :2] = xy[visible]
    keypoints[visible, 2] = 1.0
    return _Drawn(image, part_map, foreground, keypoints)


# --- writing -------------------------------------------------------------------------------------------


def _check_settings(family: str, num_classes: int, per_class: int, size: int) -> Family:
    """The family's definition, after checking the generator's arguments (:class:`DataError` naming the bad one)."""
    if family not in FAMILIES:
        raise DataError(f"unknown synthetic family '{family}': expected one of {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    if not 2 <= num_classes <= spec.max_classes:
        raise DataError(
            f"num_classes must be between 2 and {spec.max_classes} for family '{family}', got {num_classes}"
        )
    if per_class < 2:
        raise DataError(f"per_class must be at least 2 (one train and one test image), got {per_class}")
    if size < 32:
        raise DataError(f"size must be at least 32 pixels, got {size}")
    return spec


def _image_rng(seed: int, family: str, label: int, k: int) -> np.random.Generator:
    """The generator of image ``k`` of class ``label``: every image is drawn from its own stream."""
    return np.random.default_rng([seed, _FAMILY_SALT[family], label, k])


def _train_members(seed: int, label: int, per_class: int, train_count: int) -> set[int]:
    """Which of a class's ``per_class`` images (indices) are training images."""
    return set(np.random.default_rng([seed, label, 1]).permutation(per_class)[:train_count].tolist())


def _prepare_output(out: Path) -> None:
    """Create ``out``; replace an earlier synthetic set there, but never touch other non-empty folders."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "synthetic.json").is_file():
            raise DataError(
                f"output folder '{out}' is not empty and holds no earlier synthetic data set; choose an empty folder"
            )
        for name in ("images", "segmentations", "part_masks", "parts"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def make_synthetic(
    out: str | Path,
    num_classes: int = 10,
    per_class: int = 40,
    size: int = 128,
    seed: int = 0,
    family: str = "default",
) -> dict[str, Any]:
    """Generate the synthetic part data set in the CUB-200-2011 layout (see the module docstring).

    Args:
        out: output folder (created; an earlier synthetic set there is replaced).
        num_classes: number of classes (at most the family's number of attribute combinations).
        per_class: images per class (at least 2: one train, one test).
        size: image side in pixels (at least 32).
        seed: seed of the images; the same arguments give byte-identical files.
        family: ``"default"`` or ``"pretrain"`` (different class-defining parts and colours).

    Returns:
        Summary: ``root``, ``family``, ``seed``, ``size``, ``images``, ``train``, ``test``, ``classes``
        (names), ``parts`` (names).
    """
    spec = _check_settings(family, num_classes, per_class, size)
    root = Path(out)
    _prepare_output(root)
    classes = class_definitions(family, num_classes)
    (root / "parts").mkdir()

    images_lines, label_lines, split_lines, box_lines, loc_lines = [], [], [], [], []
    image_id = 0
    n_train = 0
    for label, (name, attributes) in enumerate(classes):
        folder = f"{label + 1:03d}.{name}"
        for sub in ("images", "segmentations", "part_masks"):
            (root / sub / folder).mkdir(parents=True)
        train_members = _train_members(seed, label, per_class, (per_class + 1) // 2)
        for k in range(per_class):
            image_id += 1
            drawn = _draw_sample(size, spec, attributes, _image_rng(seed, family, label, k))
            stem = f"{folder}/{name}_{k + 1:04d}"
            drawn.image.save(root / "images" / f"{stem}.jpg", quality=_JPEG_QUALITY)
            Image.fromarray(drawn.foreground).save(root / "segmentations" / f"{stem}.png")
            Image.fromarray(drawn.part_map.astype(np.uint8)).save(root / "part_masks" / f"{stem}.png")

            is_train = int(k in train_members)
            n_train += is_train
            images_lines.append(f"{image_id} {stem}.jpg")
            label_lines.append(f"{image_id} {label + 1}")
            split_lines.append(f"{image_id} {is_train}")
            ys, xs = np.nonzero(drawn.part_map)
            if xs.size:
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
            else:
                x0, y0, x1, y1 = 0, 0, size - 1, size - 1
            box_lines.append(f"{image_id} {x0:.1f} {y0:.1f} {x1 - x0 + 1:.1f} {y1 - y0 + 1:.1f}")
            for part, (x, y, visible) in enumerate(drawn.keypoints, start=1):
                loc_lines.append(f"{image_id} {part} {x:.1f} {y:.1f} {int(visible)}")

    def write(relpath: str, lines: list[str]) -> None:
        (root / relpath).write_text("\n".join(lines) + "\n")

    write("images.txt", images_lines)
    write("classes.txt", [f"{i + 1} {i + 1:03d}.{name}" for i, (name, _) in enumerate(classes)])
    write("image_class_labels.txt", label_lines)
    write("train_test_split.txt", split_lines)
    write("bounding_boxes.txt", box_lines)
    write("parts/parts.txt", [f"{i + 1} {name}" for i, name in enumerate(PART_NAMES)])
    write("parts/part_locs.txt", loc_lines)

    summary: dict[str, Any] = {
        "root": str(root),
        "family": family,
        "seed": seed,
        "size": size,
        "images": image_id,
        "train": n_train,
        "test": image_id - n_train,
        "classes": [f"{i + 1:03d}.{name}" for i, (name, _) in enumerate(classes)],
        "parts": list(PART_NAMES),
    }
    record = {**summary, "class_attributes": {name: attrs for name, attrs in classes}}
    del record["root"]  # keep the file independent of where it was written
    (root / "synthetic.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return summary


@dataclass(frozen=True)
class SyntheticArrays:
    """A synthetic data set held in memory (:func:`render_synthetic`), image ``i`` in every array's row ``i``.

    Attributes:
        images: ``(N, S, S, 3)`` uint8 RGB, the pixels :func:`make_synthetic` writes (JPEG round trip included).
        part_ids: ``(N, S, S)`` uint8 part id per pixel (0: background, 1..P: :data:`PART_NAMES`).
        labels: ``(N,)`` int64 class index (0-based).
        is_train: ``(N,)`` bool.
    """

    images: np.ndarray
    part_ids: np.ndarray
    labels: np.ndarray
    is_train: np.ndarray


def _render_class(job: tuple[str, int, int, int, int, dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Images and part maps of one class (a worker task of :func:`render_synthetic`)."""
    family, seed, size, label, count, attributes = job
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    part_ids = np.empty((count, size, size), dtype=np.uint8)
    for k in range(count):
        drawn = _draw_sample(size, FAMILIES[family], attributes, _image_rng(seed, family, label, k))
        # The same JPEG encoding as make_synthetic's files, so both give the same pixels.
        encoded = io.BytesIO()
        drawn.image.save(encoded, format="JPEG", quality=_JPEG_QUALITY)
        images[k] = np.asarray(Image.open(encoded).convert("RGB"))
        part_ids[k] = drawn.part_map
    return images, part_ids


def render_synthetic(
    num_classes: int = 10,
    per_class: int = 40,
    size: int = 128,
    seed: int = 0,
    family: str = "default",
    *,
    test_per_class: int | None = None,
    workers: int = 1,
) -> SyntheticArrays:
    """The images of :func:`make_synthetic` with the same arguments, in memory instead of files.

    Backbone pretraining draws tens of thousands of images; writing and decoding them as files would
    cost more than drawing them.

    Args:
        num_classes, per_class, size, seed, family: as for :func:`make_synthetic`; the same values give
            the same images and, with ``test_per_class=None``, the same split.
        test_per_class: test images per class (default: half of ``per_class``, rounded down, like the files).
        workers: processes that draw the images (each class is drawn by one process; results do not
            depend on this number).

    Raises:
        DataError: a bad argument (named), as for :func:`make_synthetic`, or ``test_per_class`` outside
            ``1..per_class - 1``.
    """
    _check_settings(family, num_classes, per_class, size)
    tests = per_class // 2 if test_per_class is None else test_per_class
    if not 1 <= tests < per_class:
        raise DataError(f"test_per_class must be between 1 and {per_class - 1} (per_class - 1), got {tests}")
    classes = class_definitions(family, num_classes)
    jobs = [(family, seed, size, label, per_class, attributes) for label, (_, attributes) in enumerate(classes)]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Fork where there is one: the workers only draw with numpy and PIL, and a forked worker needs no
        # importable __main__ (spawn fails for code run from stdin or a notebook). A worker that dies
        # raises BrokenProcessPool here instead of leaving the call waiting.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            parts = list(pool.map(_render_class, jobs))
    else:
        parts = [_render_class(job) for job in jobs]
    is_train = np.zeros((num_classes, per_class), dtype=bool)
    for label in range(num_classes):
        is_train[label, sorted(_train_members(seed, label, per_class, per_class - tests))] = True
    return SyntheticArrays(
        images=np.concatenate([images for images, _ in parts]),
        part_ids=np.concatenate([part_ids for _, part_ids in parts]),
        labels=np.repeat(np.arange(num_classes, dtype=np.int64), per_class),
        is_train=is_train.reshape(-1),
    )


__all__ = [
    "AXIS_PART",
    "FAMILIES",
    "PART_ID",
    "PART_NAMES",
    "SyntheticArrays",
    "class_definitions",
    "make_synthetic",
    "render_synthetic",
]
