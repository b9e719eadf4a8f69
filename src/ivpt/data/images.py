"""Decoding image files with errors that name the file."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ivpt.errors import DataError

# PIL raises these for missing, truncated or unrecognised files.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class LargeImageWarning(UserWarning):
    """An image has more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).

    PIL decodes it (up to twice the limit) but warns without naming the file; this warning names it.
    """


# The scales libjpeg can decode a JPEG at directly (DCT scaling), as divisors of its size.
JPEG_REDUCTIONS = (8, 4, 2)


def jpeg_reduction(limit: float, size: tuple[int, int]) -> int:
    """The largest of :data:`JPEG_REDUCTIONS` not above ``limit`` (and not above the image's sides), else 1."""
    return next((f for f in JPEG_REDUCTIONS if f <= limit and f <= min(size)), 1)


@dataclass(frozen=True)
class DecodedImage:
    """An image file decoded, possibly at a reduced scale.

    Attributes:
        image: the pixels, in the requested mode.
        source_size: ``(W, H)`` of the file at full size.
        reduction: ``image`` is the file at ``1 / reduction`` of its size: pixel-edge coordinate ``u`` of
            the file is ``u / reduction`` in ``image`` (its last row and column may cover less than
            ``reduction`` file pixels).
    """

    image: Image.Image
    source_size: tuple[int, int]
    reduction: int = 1


def decode_image(
    path: Path,
    mode: str = "RGB",
    what: str = "image",
    *,
    max_reduction: Callable[[int, int], float] | None = None,
) -> DecodedImage:
    """Decode ``path`` and convert it to ``mode`` (``"RGB"`` for images, ``"L"`` for masks).

    Args:
        path: the file.
        mode: PIL mode of the result.
        what: names the kind of file in the error message.
        max_reduction: called with the file's ``(W, H)`` before anything is decoded, returns how many
            times smaller an image the caller can use. A JPEG is then decoded directly at 1/2, 1/4 or 1/8
            of its size (libjpeg's DCT scaling, PIL's ``draft``), the largest of those factors not above
            it; other formats are decoded at full size.

    An image beyond PIL's decompression-bomb limit warns (:class:`LargeImageWarning`), and beyond twice the
    limit raises, naming the file.
    """
    try:
        with _open(path, what) as image:
            source_size = image.size
            reduction = 1
            if max_reduction is not None and image.format == "JPEG":
                factor = jpeg_reduction(max_reduction(*source_size), source_size)
                if factor > 1:
                    drafted = image.draft(mode, (source_size[0] // factor, source_size[1] // factor))
                    if drafted is not None:
                        # The box is the whole file in the reduced image's coordinates: (0, 0, W / r, H / r).
                        reduction = round(source_size[0] / drafted[1][2])
            image.load()
            # Leaving the block closes the file only; an image already in ``mode`` needs no copy.
            return DecodedImage(image if image.mode == mode else image.convert(mode), source_size, reduction)
    except Image.DecompressionBombError as exc:
        raise DataError(_bomb_message(path, what, exc)) from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode {what} '{path}': {exc}") from None


def open_image(path: Path, mode: str = "RGB", what: str = "image") -> Image.Image:
    """Decode ``path`` at full size and convert it to ``mode`` (``"RGB"`` for images, ``"L"`` for masks).

    ``what`` names the kind of file in the error message. An image beyond PIL's decompression-bomb
    limit warns (:class:`LargeImageWarning`), and beyond twice the limit raises, naming the file.
    """
    return decode_image(path, mode, what).image


def decode_problem(path: Path, what: str = "image") -> str | None:
    """``None`` when ``path`` decodes completely, else a one-line description of what is wrong.

    ``what`` names the kind of file in the message (``"image"``, ``"segmentation mask"``).

    JPEGs are decoded at reduced scale (``draft``): it still reads every byte, so truncation shows, at a
    fraction of the cost.
    """
    if not path.is_file():
        return f"{what} file '{path}' does not exist"
    try:
        with _open(path, what, warn=False) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError as exc:
        return _bomb_message(path, what, exc)
    except _DECODE_ERRORS as exc:
        return f"cannot decode {what} '{path}': {exc}"
    return None


def image_size(path: Path, what: str = "image") -> tuple[int, int]:
    """``(width, height)`` from the file's header (nothing is decoded).

    Warns (:class:`LargeImageWarning`) as :func:`open_image` does.

    Raises:
        DataError: the header cannot be read, or the image is beyond twice the decompression-bomb limit.
    """
    try:
        with _open(path, what) as image:
            return image.size
    except Image.DecompressionBombError as exc:
        raise DataError(_bomb_message(path, what, exc)) from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode {what} '{path}': {exc}") from None


def size_mismatch(mask_path: Path, mask_size: tuple[int, int], image_path: Path, image_size: tuple[int, int]) -> str:
    """The message for a segmentation mask whose size is not its image's."""
    return (
        f"segmentation mask '{mask_path}' is {mask_size[0]}x{mask_size[1]} but its image '{image_path}' is "
        f"{image_size[0]}x{image_size[1]}"
    )


def _open(path: Path, what: str, warn: bool = True) -> Image.Image:
    """``Image.open`` with PIL's decompression-bomb warning replaced by one that names the file (or none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    if warn and limit is not None and image.width * image.height > limit:
        warnings.warn(
            f"{what} '{path}' is {image.width}x{image.height} = {image.width * image.height} pixels, more than "
            f"PIL's decompression-bomb limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS); decoding it takes "
            f"{image.width * image.height * 3 / 2**30:.1f} GiB",
            LargeImageWarning,
            stacklevel=3,
        )
    return image


def _bomb_message(path: Path, what: str, exc: Image.DecompressionBombError) -> str:
    return (
        f"{what} '{path}' is too large to decode safely ({str(exc).rstrip('.')}); shrink it, or raise "
        "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
    )


__all__ = [
    "JPEG_REDUCTIONS",
    "DecodedImage",
    "LargeImageWarning",
    "decode_image",
    "decode_problem",
    "image_size",
    "jpeg_reduction",
    "open_image",
    "size_mismatch",
]
