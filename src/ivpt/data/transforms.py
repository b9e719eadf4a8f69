"""Sample transforms whose geometry is one explicit affine matrix, shared by image, keypoints and boxes.

Coordinate convention: *pixel centres sit at integers*. The pixel in column ``j`` and row ``i`` has its
centre at ``(x, y) = (j, i)``, so an image of width ``W`` spans ``x`` in ``[-0.5, W - 0.5]`` and its pixel
centres span ``[0, W - 1]``. In this convention a horizontal flip maps ``x`` to ``W - 1 - x``.

Every transform is planned first (:class:`GeometryPlan`): an area-averaging resize of a source region
(the whole image, or its bounding box in ``bbox_crop`` mode) followed by a ``remainder`` affine (flip,
rotation / scale / translation, crop). Their product :attr:`GeometryPlan.matrix` maps source pixel
centres to output pixel centres; keypoints and box corners are mapped by that matrix, and the image is
resampled with exactly the same two steps, so they agree by construction. The resize is done separately
(rather than folded into a single bilinear warp) because a bilinear warp that shrinks an image aliases,
while PIL's resize filters over the whole footprint. A remainder that only crops (and flips) is folded into
the resize: resizing the cropped region gives the same filter taps as resizing everything and cropping.

A JPEG may have been decoded at 1/2, 1/4 or 1/8 scale (:func:`ivpt.data.images.decode_image`) when the
resize shrinks it by at least that factor (:attr:`GeometryPlan.max_reduction`); the resize then reads the
same region in the smaller image's coordinates, so the geometry, keypoints and boxes are those of the
full-size decode.

Augmentations (docs/method.md section 7):

- ``"paper"``: resize the short side to ``img_size``, horizontal flip with p=0.5, random affine (rotation
  U(-90, 90) degrees about the image centre, translation up to 20 % of the width / height, scale
  U(0.8, 1.2)), random ``img_size`` crop;
- ``"flip"``: resize the short side, flip with p=0.5, random crop;
- ``"none"``: the test transform: resize the short side, centre crop.

Random draws use ``torch.rand`` with an optional ``torch.Generator``; without one, torch's global RNG is
used, which the training engine seeds per data-loader worker, so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ivpt.config import AUGMENTS, Augment
from ivpt.errors import IVPTError

# RandomAffine ranges of the official recipe.
MAX_ROTATION_DEG = 90.0
MAX_TRANSLATE_FRACTION = 0.2
SCALE_RANGE = (0.8, 1.2)


# --- matrices (3x3 homogeneous, pixel-centre coordinates) ---------------------------------------------


# ``(a, b, c, d, e, f)`` of the affine ``x' = a x + b y + c``, ``y' = d x + e y + f``, in Python floats.
Coefficients = tuple[float, float, float, float, float, float]


def translation_matrix(tx: float, ty: float) -> np.ndarray:
    """``(3, 3)`` matrix of ``(x, y) -> (x + tx, y + ty)``."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def hflip_matrix(width: int) -> np.ndarray:
    """``(3, 3)`` horizontal flip of an image ``width`` pixels wide: ``x -> width - 1 - x``."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def rotation_scale_matrix(angle_deg: float, scale: float, center: tuple[float, float]) -> np.ndarray:
    """``(3, 3)`` rotation by ``angle_deg`` and isotropic ``scale`` about ``center``.

    Positive angles turn the picture counter-clockwise as displayed (``y`` points down), like
    torchvision's ``RandomAffine``.
    """
    theta = math.radians(angle_deg)
    cos, sin = scale * math.cos(theta), scale * math.sin(theta)
    cx, cy = center
    linear = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    return translation_matrix(cx, cy) @ linear @ translation_matrix(-cx, -cy)


def region_resize_matrix(box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """``(3, 3)`` matrix of resizing the region ``box`` to ``size = (W, H)``.

    ``box`` is in PIL's pixel-*edge* coordinates (pixel ``i`` spans ``[i, i + 1]``, so a pixel-centre
    ``x`` sits at edge coordinate ``x + 0.5``); the region's edges ``[left, right]`` map to ``[0, W]``.
    """
    sx, sy, tx, ty = _region_resize_coefficients(box, size)
    return np.array([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]])


def _region_resize_coefficients(
    box: tuple[float, float, float, float], size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """``(sx, sy, tx, ty)`` of :func:`region_resize_matrix`: ``x' = sx x + tx``, ``y' = sy y + ty``."""
    left, top, right, bottom = box
    sx, sy = size[0] / (right - left), size[1] / (bottom - top)
    return sx, sy, sx * (0.5 - left) - 0.5, sy * (0.5 - top) - 0.5


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``(..., 2)`` points ``(x, y)`` with a ``(3, 3)`` affine matrix; returns ``(..., 2)``."""
    return points @ matrix[:2, :2].T + matrix[:2, 2]


# --- planning ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentParams:
    """The random choices of one training sample (all neutral by default: the test transform)."""

    flip: bool = False
    angle_deg: float = 0.0
    translate: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    # Top-left corner of the ``img_size`` crop in the resized image; ``None`` centres the crop.
    crop_origin: tuple[int, int] | None = None


@dataclass(frozen=True)
class GeometryPlan:
    """Geometry of one sample: resize ``source_box`` to ``resized_size``, then warp by ``remainder``.

    Attributes:
        source_box: ``(left, top, right, bottom)`` region of the source image in pixel-edge coordinates.
        resized_size: ``(W', H')`` size of that region after the resize.
        remainder: ``(3, 3)`` affine from resized pixel centres to output pixel centres.
        output_size: side ``S`` of the square output.
    """

    source_box: tuple[float, float, float, float]
    resized_size: tuple[int, int]
    remainder: np.ndarray
    output_size: int

    @property
    def matrix(self) -> np.ndarray:
        """``(3, 3)`` affine from source pixel centres to output pixel centres."""
        # remainder @ region_resize_matrix(source_box, resized_size), in Python floats (one array, not three).
        (a, b, c), (d, e, f) = self.remainder[:2].tolist()
        sx, sy, tx, ty = _region_resize_coefficients(self.source_box, self.resized_size)
        return np.array([[a * sx, b * sy, a * tx + b * ty + c], [d * sx, e * sy, d * tx + e * ty + f], [0.0, 0.0, 1.0]])

    @property
    def max_reduction(self) -> float:
        """How many times smaller the source could be decoded without the resize having to enlarge it."""
        return _max_reduction(self.source_box, self.resized_size)


def _max_reduction(source_box: tuple[float, float, float, float], resized_size: tuple[int, int]) -> float:
    left, top, right, bottom = source_box
    return min((right - left) / resized_size[0], (bottom - top) / resized_size[1])


def short_side_size(width: int, height: int, img_size: int) -> tuple[int, int]:
    """Size ``(W', H')`` after resizing the short side to ``img_size`` (torchvision's rounding)."""
    if width <= height:
        return img_size, max(img_size, int(img_size * height / width))
    return max(img_size, int(img_size * width / height)), img_size


def sample_augment_params(
    augment: Augment, resized_size: tuple[int, int], img_size: int, generator: torch.Generator | None = None
) -> AugmentParams:
    """Draw the random choices of ``augment`` for an image resized to ``resized_size = (W', H')``."""
    if augment == "none":
        return AugmentParams()
    width, height = resized_size
    u = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
    crop_origin = (int(u[5] * (width - img_size + 1)), int(u[6] * (height - img_size + 1)))
    if augment == "flip":
        return AugmentParams(flip=u[0] < 0.5, crop_origin=crop_origin)
    low, high = SCALE_RANGE
    return AugmentParams(
        flip=u[0] < 0.5,
        angle_deg=(2.0 * u[1] - 1.0) * MAX_ROTATION_DEG,
        translate=(
            (2.0 * u[2] - 1.0) * MAX_TRANSLATE_FRACTION * width,
            (2.0 * u[3] - 1.0) * MAX_TRANSLATE_FRACTION * height,
        ),
        scale=low + (high - low) * u[4],
        crop_origin=crop_origin,
    )


def resize_geometry(
    width: int, height: int, img_size: int, crop_box: Sequence[float] | None = None
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The resize step of :func:`plan_geometry`: ``(source_box, resized_size)`` (no random choice affects it)."""
    if crop_box is None:
        return (0.0, 0.0, float(width), float(height)), short_side_size(width, height, img_size)
    x_min, y_min, x_max, y_max = (float(v) for v in crop_box)
    # Pixel centres x_min..x_max span the edges x_min - 0.5 .. x_max + 0.5: PIL's x_min .. x_max + 1.
    left, top = min(max(x_min, 0.0), width - 1.0), min(max(y_min, 0.0), height - 1.0)
    right, bottom = min(max(x_max + 1.0, left + 1.0), width), min(max(y_max + 1.0, top + 1.0), height)
    return (left, top, right, bottom), (img_size, img_size)


def plan_geometry(
    width: int,
    height: int,
    img_size: int,
    params: AugmentParams | None = None,
    crop_box: Sequence[float] | None = None,
) -> GeometryPlan:
    """Compose the geometry of one sample from explicit choices.

    Args:
        width, height: source image size.
        img_size: output side ``S``.
        params: flip / affine / crop choices (see :func:`sample_augment_params`); ``None``: the test
            transform.
        crop_box: ``(x_min, y_min, x_max, y_max)`` pixel-centre box; when given, that box (not the whole
            image) is resized straight to ``S x S`` (aspect ratio not kept), as in the consistency protocol.
            It is clipped to the image and kept at least one pixel wide and high.
    """
    params = params if params is not None else AugmentParams()
    source_box, resized = resize_geometry(width, height, img_size, crop_box)
    w, h = resized
    # x' = a x + b y + c, y' = d x + e y + f, composed in Python floats: a handful of 3 x 3 numpy products
    # cost more than the rest of planning a sample.
    a, b, c, d, e, f = (-1.0, 0.0, w - 1.0, 0.0, 1.0, 0.0) if params.flip else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if params.angle_deg != 0.0 or params.scale != 1.0 or params.translate != (0.0, 0.0):
        # translation_matrix(*translate) @ rotation_scale_matrix(angle, scale, centre) applied after the flip.
        theta = math.radians(params.angle_deg)
        cos, sin = params.scale * math.cos(theta), params.scale * math.sin(theta)
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        tx, ty = params.translate
        a, b, c, d, e, f = (
            cos * a + sin * d,
            cos * b + sin * e,
            cos * (c - cx) + sin * (f - cy) + cx + tx,
            -sin * a + cos * d,
            -sin * b + cos * e,
            -sin * (c - cx) + cos * (f - cy) + cy + ty,
        )
    if params.crop_origin is None:
        left, top = round((w - img_size) / 2.0), round((h - img_size) / 2.0)
    else:
        left, top = params.crop_origin
    remainder = np.array([[a, b, c - left], [d, e, f - top], [0.0, 0.0, 1.0]])
    return GeometryPlan(source_box, resized, remainder, img_size)


# --- applying a plan ---------------------------------------------------------------------------------


def _crop_of(remainder: np.ndarray) -> tuple[int, int, bool] | None:
    """``(left, top, flipped)`` when ``remainder`` only crops at integer offsets (after an optional flip)."""
    (a, b, c), (d, e, f) = remainder[:2].tolist()
    if a not in (1.0, -1.0) or b or d or e != 1.0 or not (c.is_integer() and f.is_integer()):
        return None
    return int(-c), int(-f), a < 0


def warp_image(image: Image.Image, plan: GeometryPlan, resample: Image.Resampling, reduction: int = 1) -> Image.Image:
    """Resample ``image`` (any PIL mode) by ``plan``; pixels from outside the source are 0.

    ``reduction``: ``image`` is the source decoded at ``1 / reduction`` of its size (a JPEG's draft mode):
    pixel-edge coordinate ``u`` of the source is ``u / reduction`` in ``image``.
    """
    box = tuple(v / reduction for v in plan.source_box)
    side = plan.output_size
    crop = _crop_of(plan.remainder)
    width, height = plan.resized_size
    if crop is not None:
        left, top, flipped = crop
        if flipped:
            # x_out = width - 1 - x_resized - left: the window starts at column width - side - left.
            left = width - side - left
        if 0 <= left <= width - side and 0 <= top <= height - side:
            # Resizing the window alone gives the same filter taps as resizing the whole region and cropping.
            scale_x, scale_y = (box[2] - box[0]) / width, (box[3] - box[1]) / height
            window = (
                box[0] + left * scale_x,
                box[1] + top * scale_y,
                box[0] + (left + side) * scale_x,
                box[1] + (top + side) * scale_y,
            )
            out = image.resize((side, side), resample, box=window)
            return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else out
    out = image.resize(plan.resized_size, resample, box=box)
    data = pil_affine_data(plan.remainder)
    return out.transform((side, side), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=0)


def pil_affine_data(matrix: np.ndarray) -> Coefficients:
    """PIL's ``AFFINE`` coefficients for the pixel-centre affine ``matrix (3, 3)``.

    PIL's data maps *output* pixel-edge coordinates to *input* ones: the inverse of ``matrix``, shifted by
    half a pixel on both sides.
    """
    (a, b, c), (d, e, f) = matrix[:2].tolist()
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    ic, if_ = -(ia * c + ib * f), -(id_ * c + ie * f)
    # inverse(x + 0.5) - 0.5 in edge coordinates: the constant term gains 0.5 - 0.5 * (row sum).
    return (ia, ib, ic + 0.5 - 0.5 * (ia + ib), id_, ie, if_ + 0.5 - 0.5 * (id_ + ie))


def transform_keypoints(keypoints: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Map ``(P, 3)`` keypoints ``(x, y, visible)`` into an ``S x S`` output.

    Points that land outside ``[0, S-1]^2`` become invisible; invisible points are set to ``(0, 0, 0)``.
    """
    return _map_keypoints(keypoints, _coefficients(matrix), size)


def _coefficients(matrix: np.ndarray) -> Coefficients:
    """``(a, b, c, d, e, f)`` of ``x' = a x + b y + c``, ``y' = d x + e y + f`` in Python floats."""
    (a, b, c), (d, e, f) = matrix[:2].tolist()
    return a, b, c, d, e, f


def _map_keypoints(keypoints: np.ndarray, coefficients: Coefficients, size: int) -> np.ndarray:
    """:func:`transform_keypoints` with the matrix as :func:`_coefficients`."""
    # A loop over a few dozen points in Python floats: a dozen numpy calls on (P, 2) arrays cost more.
    a, b, c, d, e, f = coefficients
    last = size - 1.0
    rows = []
    for x, y, flag in keypoints.tolist():
        u, v = a * x + b * y + c, d * x + e * y + f
        rows.append((u, v, 1.0) if flag > 0 and 0.0 <= u <= last and 0.0 <= v <= last else (0.0, 0.0, 0.0))
    return np.array(rows, dtype=np.float32).reshape(-1, 3)


def transform_box(box: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Axis-aligned hull of the mapped corners of a ``(4,)`` box ``(x_min, y_min, x_max, y_max)``.

    The result is clipped to ``[0, S-1]``; a box mapped entirely outside collapses onto the border.
    """
    return _box_in_output(box, _coefficients(matrix), size)


def _box_in_output(box: np.ndarray, coefficients: Coefficients, size: int) -> np.ndarray:
    """:func:`transform_box` with the matrix as :func:`_coefficients`."""
    hull = _mapped_hull(coefficients, *(float(v) for v in box))
    return np.array([min(max(v, 0.0), size - 1.0) for v in hull], dtype=np.float32)


def _mapped_hull(coefficients: Coefficients, left: float, top: float, right: float, bottom: float) -> list[float]:
    """``[x_min, y_min, x_max, y_max]`` of the rectangle's four corners mapped by the affine, in Python floats."""
    a, b, c, d, e, f = coefficients
    corners = ((left, top), (right, top), (left, bottom), (right, bottom))
    xs = [a * x + b * y + c for x, y in corners]
    ys = [d * x + e * y + f for x, y in corners]
    return [min(xs), min(ys), max(xs), max(ys)]


def transform_box_edges(box: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Edges ``(left, top, right, bottom)`` of a ``(4,)`` pixel-centre box after ``matrix``, NOT clipped.

    The box ``(x_min, y_min, x_max, y_max)`` covers the pixels whose centres it spans, so its edges lie
    half a pixel outside: ``x_min - 0.5 .. x_max + 0.5``. Their mapped hull keeps the annotated width and
    height (times the scale) even where a crop cuts the box, which the KPR protocol divides by
    (:func:`ivpt.metrics.kpr_box`).
    """
    return _box_edges(box, _coefficients(matrix))


def _box_edges(box: np.ndarray, coefficients: Coefficients) -> np.ndarray:
    """:func:`transform_box_edges` with the matrix as :func:`_coefficients`."""
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    return np.array(_mapped_hull(coefficients, x_min - 0.5, y_min - 0.5, x_max + 0.5, y_max + 0.5), dtype=np.float32)


class Normalize:
    """Pixel values -> the model's input, ``(x / 255 - mean) / std``, as one multiply and one add.

    Data sets return ``uint8`` images (docs/ARCHITECTURE.md, "A sample"); whoever feeds them to a model
    normalises each batch once, where it computes (after the copy to the device), with this callable:
    ``model(dataset.transform.normalize(batch["image"].to(device)))``.

    ``images`` is ``(3, H, W)`` or ``(B, 3, H, W)`` on any device, either ``uint8`` or a floating tensor of
    pixel values on the same 0..255 scale (e.g. ``uint8`` images resized as floats); the result is
    ``float32`` on the same device. A tensor already normalised must not go through it again: floating
    inputs are read as pixel values, never passed through.

    Args:
        mean, std: per-channel normalisation (RGB, on ``[0, 1]`` values).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) and v > 0 for v in std):
            raise IVPTError(f"Normalize: expected three means and three stds > 0, got mean={mean}, std={std}")
        self.mean, self.std = mean, std
        # (x / 255 - mean) / std = x * scale + offset, in float64 and then rounded once.
        self.scale = tuple(1.0 / (255.0 * s) for s in std)
        self.offset = tuple(-m / s for m, s in zip(mean, std, strict=True))
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def constants(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(scale, offset)``, each ``(3, 1, 1)`` float32 on ``device`` (made once per device)."""
        device = torch.device(device)
        pair = self._constants.get(device)
        if pair is None:
            scale, offset = (
                torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1) for v in (self.scale, self.offset)
            )
            pair = self._constants[device] = (scale, offset)
        return pair

    def __call__(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise IVPTError(f"Normalize: expected a tensor of images, got {type(images).__name__}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise IVPTError(
                f"Normalize: expected uint8 images (or floating pixel values in 0..255), got {images.dtype}"
            )
        if images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise IVPTError(f"Normalize: expected images (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")
        scale, offset = self.constants(images.device)
        # A float32 copy (the caller's tensor is never written), then a multiply and an add in place. On the
        # CPU this is 10-40x faster than torch.addcmul or ``images * scale + offset``, whose broadcast
        # (3, 1, 1) operands and mixed dtypes miss the vectorised kernels (a batch of 8 at 518 px: 0.7 ms
        # against 17-27 ms).
        return images.to(torch.float32, copy=True).mul_(scale).add_(offset)

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers get a copy of the data set: the per-device constants (maybe on a GPU) stay here.
        return {**self.__dict__, "_constants": {}}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class SampleTransform:
    """Turns a decoded image and its annotations into tensors with one shared geometry.

    The image comes out as ``uint8`` ``(3, S, S)``: normalising it is the consumer's job, once per batch
    on its device, with :attr:`normalize`.

    Args:
        img_size: output side ``S``.
        augment: ``"paper"``, ``"flip"`` or ``"none"`` (see the module docstring).
        mean, std: per-channel normalisation (RGB, on ``[0, 1]`` values) of :attr:`normalize`.

    Attributes:
        normalize: :class:`Normalize` with ``mean`` and ``std``: ``uint8`` images -> the model's input.
    """

    def __init__(self, img_size: int, augment: Augment, mean: Sequence[float], std: Sequence[float]) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.img_size = img_size
        self.augment = augment
        self.normalize = Normalize(mean, std)

    def plan(
        self,
        width: int,
        height: int,
        crop_box: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
    ) -> GeometryPlan:
        """Draw this sample's random choices and compose its geometry."""
        resized = (
            (self.img_size, self.img_size) if crop_box is not None else short_side_size(width, height, self.img_size)
        )
        params = sample_augment_params(self.augment, resized, self.img_size, generator)
        return plan_geometry(width, height, self.img_size, params, crop_box)

    def max_reduction(self, width: int, height: int, crop_box: Sequence[float] | None = None) -> float:
        """How many times smaller a ``width x height`` source could be decoded (see :attr:`GeometryPlan.max_reduction`).

        The random choices only change the warp after the resize, so no draw is needed.
        """
        return _max_reduction(*resize_geometry(width, height, self.img_size, crop_box))

    @staticmethod
    def pixels(image: Image.Image) -> Tensor:
        """``(3, H, W)`` contiguous ``uint8`` tensor of an RGB PIL image's bytes (no float pass)."""
        width, height = image.size
        out = np.empty((3, height, width), dtype=np.uint8)
        # One plane at a time, picked out by PIL's packer in C: half the cost of splitting the image into
        # bands first, a quarter of transposing the packed (H, W, 3) bytes.
        for channel, band in enumerate("RGB"):
            out[channel] = np.frombuffer(image.tobytes("raw", band), dtype=np.uint8).reshape(height, width)
        return torch.from_numpy(out)

    def to_tensor(self, image: Image.Image) -> Tensor:
        """``(3, H, W)`` normalised float32 tensor from an RGB PIL image (:meth:`pixels`, then :attr:`normalize`)."""
        return self.normalize(self.pixels(image))

    def __call__(
        self,
        image: Image.Image,
        keypoints: np.ndarray,
        box: np.ndarray,
        mask: Image.Image | None = None,
        *,
        crop_box: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        source_size: tuple[int, int] | None = None,
        reduction: int = 1,
    ) -> dict[str, Tensor]:
        """Transform one sample.

        Args:
            image: RGB source image.
            keypoints: ``(P, 3)`` source keypoints ``(x, y, visible)``.
            box: ``(4,)`` source box ``(x_min, y_min, x_max, y_max)``.
            mask: optional ``"F"`` or ``"L"`` image (foreground probability, ``"L"`` scaled by 1/255) of
                the source's full size.
            crop_box: resize this box to the output instead of the whole image (``bbox_crop`` mode).
            generator: RNG for the random choices (torch's global RNG when ``None``).
            source_size: ``(W, H)`` of the source when ``image`` was decoded smaller (default: its own size).
            reduction: ``image`` is the source decoded at ``1 / reduction`` of its size (keypoints, boxes
                and masks stay in the source's coordinates).

        Returns:
            ``image (3, S, S)`` ``uint8`` (not normalised: :attr:`normalize`), ``keypoints (P, 3)``,
            ``bbox (4,)`` (clipped to the output), ``bbox_edges (4,)`` (the box's edges, not clipped:
            :func:`transform_box_edges`) and, with a mask, ``mask (S, S)``.
        """
        width, height = source_size if source_size is not None else image.size
        plan = self.plan(width, height, crop_box, generator)
        coefficients = _coefficients(plan.matrix)
        sample = {
            "image": self.pixels(warp_image(image, plan, Image.Resampling.BILINEAR, reduction)),
            "keypoints": torch.from_numpy(_map_keypoints(keypoints, coefficients, self.img_size)),
            "bbox": torch.from_numpy(_box_in_output(box, coefficients, self.img_size)),
            "bbox_edges": torch.from_numpy(_box_edges(box, coefficients)),
        }
        if mask is not None:
            scale = 1.0 / 255.0 if mask.mode == "L" else 1.0
            values = np.asarray(mask.convert("F"), dtype=np.float32) * scale
            warped = warp_image(Image.fromarray(values), plan, Image.Resampling.BILINEAR)
            sample["mask"] = torch.from_numpy(np.clip(np.asarray(warped, dtype=np.float32), 0.0, 1.0))
        return sample


def image_transform(
    img_size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float], augment: Augment = "none"
) -> Callable[[Image.Image], Tensor]:
    """A bare image's transform: any PIL image -> normalised ``(3, H, W)`` tensor.

    ``augment="none"`` is the test transform; the others draw from torch's global RNG. ``img_size`` is
    ``S`` (``H = W = S``), or ``(H, W)`` for a model on non-square inputs: the image is then scaled to
    cover ``H x W`` and its centre ``H x W`` window is kept (the square test transform's rule, in one
    resample), which only the test transform supports.
    """
    if not isinstance(img_size, int):
        height, width = (int(v) for v in img_size)
        if height == width:
            img_size = height
        elif augment != "none":
            raise IVPTError(
                f"the training augmentation '{augment}' makes square images; the model takes {height} x {width}"
            )
        else:
            return _cover_and_crop_transform(height, width, mean, std)
    transform = SampleTransform(img_size, augment, mean, std)
    no_keypoints = np.zeros((0, 3), dtype=np.float32)

    def apply(image: Image.Image) -> Tensor:
        rgb = image.convert("RGB")
        whole = np.array([0.0, 0.0, rgb.width - 1.0, rgb.height - 1.0], dtype=np.float32)
        return transform.normalize(transform(rgb, no_keypoints, whole)["image"])

    return apply


def _cover_and_crop_transform(
    height: int, width: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], Tensor]:
    """The test transform for ``H != W``: scale to cover ``H x W``, keep the centre window, normalise."""
    normalise = SampleTransform(max(height, width), "none", mean, std).to_tensor

    def apply(image: Image.Image) -> Tensor:
        rgb = image.convert("RGB")
        scale = max(width / rgb.width, height / rgb.height)
        window_w, window_h = width / scale, height / scale
        left, top = (rgb.width - window_w) / 2.0, (rgb.height - window_h) / 2.0
        box = (left, top, left + window_w, top + window_h)
        return normalise(rgb.resize((width, height), Image.Resampling.BILINEAR, box=box))

    return apply


def transforms_for(model: Any, train: bool = False, augment: Augment = "paper") -> Callable[[Image.Image], Tensor]:
    """The transform a model needs: PIL image -> normalised ``(3, H, W)`` tensor, as in training and evaluation.

    Args:
        model: an ivpt model (its ``preprocessing``: input size, mean, std).
        train: the training augmentation ``augment`` (random; torch's global RNG) instead of the test transform.
        augment: ``"paper"``, ``"flip"`` or ``"none"`` for ``train=True``.

    Raises:
        IVPTError: the model records no preprocessing, or takes non-square images and ``train=True``
            (the training augmentations make square images).
    """
    prep = getattr(model, "preprocessing", None)
    if prep is None:
        raise IVPTError("transforms_for: the model records no preprocessing (input size, mean, std)")
    return image_transform(prep.img_size, prep.mean, prep.std, augment if train else "none")


__all__ = [
    "AUGMENTS",
    "AugmentParams",
    "GeometryPlan",
    "Normalize",
    "SampleTransform",
    "apply_matrix",
    "hflip_matrix",
    "image_transform",
    "pil_affine_data",
    "plan_geometry",
    "region_resize_matrix",
    "resize_geometry",
    "rotation_scale_matrix",
    "sample_augment_params",
    "short_side_size",
    "transform_box",
    "transform_box_edges",
    "transform_keypoints",
    "transforms_for",
    "translation_matrix",
    "warp_image",
]
