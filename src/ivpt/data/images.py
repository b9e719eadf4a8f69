"""Decoding image files with errors that name the file."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ivpt.errors import DataError

# PIL raises these for missing, truncated or unrecognised files.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class LargeImageWarning(UserWarning):
    """An image has more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).

    PIL decodes it (up to twice the limit) but warns without naming the file; this warning names it.
    """


def open_image(path: Path, mode: str = "RGB", what: str = "image") -> Image.Image:
    """Decode ``path`` and convert it to ``mode`` (``"RGB"`` for images, ``"L"`` for masks).

    ``what`` names the kind of file in the error message. An image beyond PIL's decompression-bomb
    limit warns (:class:`LargeImageWarning`), and beyond twice the limit raises, naming the file.
    """
    try:
        with _open(path, what) as image:
            return image.convert(mode)
    except Image.DecompressionBombError as exc:
        raise DataError(_bomb_message(path, what, exc)) from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode {what} '{path}': {exc}") from None


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


__all__ = ["LargeImageWarning", "decode_problem", "image_size", "open_image", "size_mismatch"]
