"""Checked image loading, shared by ``check-data``, training, ``eval`` and ``chat``.

An image path can be anything a user typed: a folder or a FIFO named ``x.jpg`` (opening a FIFO
would block forever), a truncated file, a decompression bomb. Every such case is one reason
string here, so each command reports it the same way, as one line.
"""

from __future__ import annotations

import os
import stat
import warnings
from typing import Any

from PIL import Image

from xcft.errors import DataError
from xcft.model.image_processing_xcomposer2 import to_rgb

IMAGE_FIX = "replace the file or re-save it as JPEG/PNG"


def image_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be an image file (not found, a folder, not a regular file), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a folder, not an image file"
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"is {kind}, not a regular image file"
    return None


def _decode(path: str | os.PathLike) -> tuple[Any, str | None]:
    """``(rgb_image, None)`` or ``(None, reason)``; never raises for a bad file."""
    problem = image_file_problem(path)
    if problem is not None:
        return None, problem
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img), None
    except Exception as exc:  # PIL raises many kinds for broken files (bombs: DecompressionBombError)
        return None, f"cannot be decoded ({type(exc).__name__}: {exc})"


def open_checked_image(path: str | os.PathLike) -> Any:
    """The fully decoded RGB image at ``path``; raises :class:`DataError` (one line) when it cannot be.

    PIL refuses images above twice ``Image.MAX_IMAGE_PIXELS`` (decompression bombs); the RGB
    conversion is the official one (:func:`xcft.model.image_processing_xcomposer2.to_rgb`).
    """
    img, problem = _decode(path)
    if problem is not None:
        raise DataError(f"image {path} {problem}. Fix: {IMAGE_FIX}")
    return img


def decode_with_size(path: str | os.PathLike) -> tuple[str | None, tuple[int, int]]:
    """``(None, (width, height))`` when the image at ``path`` decodes fully, else ``(reason, (0, 0))``."""
    img, problem = _decode(path)
    if img is None:
        return problem, (0, 0)
    size = img.size
    img.close()
    return None, size


def decode_problem(path: str | os.PathLike) -> str | None:
    """None when the image at ``path`` decodes fully, else the reason (check-data reports it per sample)."""
    img, problem = _decode(path)
    if img is not None:
        img.close()
    return problem


__all__ = ["decode_problem", "decode_with_size", "image_file_problem", "open_checked_image"]
