"""Decoding image files with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ivpt.errors import DataError

# PIL raises these for missing, truncated or unrecognised files.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


def open_image(path: Path, mode: str = "RGB", what: str = "image") -> Image.Image:
    """Decode ``path`` and convert it to ``mode`` (``"RGB"`` for images, ``"L"`` for masks).

    ``what`` names the kind of file in the error message.
    """
    try:
        with Image.open(path) as image:
            return image.convert(mode)
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
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except _DECODE_ERRORS as exc:
        return f"cannot decode {what} '{path}': {exc}"
    return None


__all__ = ["decode_problem", "open_image"]
