"""Image preprocessing of InternLM-XComposer2, with PIL and numpy only (no torchvision).

Self-contained (standard library, numpy, PIL, torch). The official pipeline is
``Image.open(p).convert("RGB")`` -> ``resize((S, S), BICUBIC)`` -> ``ToTensor`` (uint8 / 255 in
float32) -> ``Normalize(CLIP mean, std)`` (float32 subtract, then divide). Every step below is the
same float32 arithmetic, so the pixels are bit-equal to the official ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, "os.PathLike[str]", Image.Image]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way the official code does (``convert("RGB")``).

    Alpha is dropped, not composited, as in the official pipeline. Palette images that declare
    transparency go through RGBA first only to avoid PIL's warning; the RGB values are the same.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(image: ImageInput, img_size: int | None = None, fast_jpeg: bool = False) -> Image.Image:
    """Open ``image`` (path or PIL image) and return it fully decoded in RGB.

    ``fast_jpeg`` asks the JPEG decoder for a reduced scale that is still at least twice
    ``img_size`` (``Image.draft``); much faster on large photos but not bit-exact, so off by default.
    """
    if isinstance(image, Image.Image):
        img = image
    else:
        img = Image.open(os.fspath(image))
        if fast_jpeg and img_size is not None and img.format == "JPEG":
            img.draft("RGB", (2 * img_size, 2 * img_size))
        img.load()
    return to_rgb(img)


def normalize_reference(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in CLIP normalisation (float32 ops, like ToTensor + Normalize)."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = x.transpose(2, 0, 1)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _normalize_table() -> np.ndarray:
    """[3, 256] float32: :func:`normalize_reference` of every uint8 value in every channel."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 1, 3))
    table = np.ascontiguousarray(normalize_reference(values)[:, :, 0])
    table.setflags(write=False)
    return table


#: Read-only lookup table: each output element depends only on its uint8 value and channel, so a
#: lookup gives exactly the float32 result of the arithmetic (about 10x faster on a 490 px image).
_NORMALIZE_TABLE = _normalize_table()


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in CLIP normalisation, bit-equal to :func:`normalize_reference`."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    out = np.empty((3, rgb.shape[0], rgb.shape[1]), dtype=np.float32)
    for c in range(3):
        # mode="clip" skips the buffered bounds check of the default mode (uint8 indices are always
        # in range), which makes the lookup ~1.6x faster.
        np.take(_NORMALIZE_TABLE[c], rgb[:, :, c], out=out[c], mode="clip")
    return out


def load_image(image: ImageInput, img_size: int, fast_jpeg: bool = False) -> np.ndarray:
    """Preprocess one image to a float32 array ``[3, img_size, img_size]`` equal to the official pixels."""
    img = open_image(image, img_size, fast_jpeg=fast_jpeg)
    img = img.resize((img_size, img_size), Image.BICUBIC)
    return normalize(np.asarray(img, dtype=np.uint8))


def load_image_tensor(image: ImageInput, img_size: int, fast_jpeg: bool = False):
    """:func:`load_image` as a torch FloatTensor ``[3, S, S]``."""
    import torch

    return torch.from_numpy(load_image(image, img_size, fast_jpeg=fast_jpeg))


class XComposer2ImageProcessor:
    """Callable preprocessing for a model folder: images -> ``pixel_values`` [N, 3, S, S]."""

    def __init__(self, img_size: int = 490, fast_jpeg: bool = False) -> None:
        self.img_size = int(img_size)
        self.fast_jpeg = fast_jpeg

    def __call__(self, images: Sequence[ImageInput] | ImageInput):
        import torch

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        arrays = [load_image(im, self.img_size, fast_jpeg=self.fast_jpeg) for im in images]
        if not arrays:
            return torch.zeros(0, 3, self.img_size, self.img_size)
        return torch.from_numpy(np.stack(arrays))


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "XComposer2ImageProcessor",
    "load_image",
    "load_image_tensor",
    "normalize",
    "normalize_reference",
    "open_image",
    "to_rgb",
]
