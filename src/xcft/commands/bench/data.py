"""``xcft bench data``: image decoding + preprocessing throughput, in one process or DataLoader workers.

Times exactly what the training data set does per image (:func:`load_image`: open, decode,
convert to RGB, bicubic resize, normalise). With ``--photo WxH`` it also generates a large
photo-like JPEG and compares the exact path with the opt-in reduced-scale JPEG decode
(``fast_jpeg``), which is faster on large photos but not bit-exact.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xcft.commands.bench.calibrate import calibration_gflops
from xcft.data.mixture import load_spec
from xcft.data.schema import raise_first, read_file
from xcft.errors import XcftError
from xcft.model.image_processing_xcomposer2 import load_image

logger = logging.getLogger(__name__)


def data_image_paths(data: str | Path, sources: Sequence[str] = ()) -> list[Path]:
    """Every image path the samples of a data.txt / JSON file use (resolved, in file order)."""
    spec = load_spec(data)
    paths: list[Path] = []
    for src in spec.sources:
        if sources and not any(s in src.display for s in sources):
            continue
        convs, problems = read_file(src.path, search_dirs=spec.search_dirs(src), display=src.display)
        raise_first(problems)
        for conv in convs:
            if conv is not None:
                paths.extend(Path(p) for p in conv.images)
    return paths


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], img_size: int, fast_jpeg: bool) -> None:
        self.paths, self.img_size, self.fast_jpeg = list(paths), int(img_size), fast_jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return load_image(self.paths[i], self.img_size, fast_jpeg=self.fast_jpeg)


def images_per_second(
    paths: Sequence[Path],
    img_size: int,
    *,
    workers: int = 0,
    fast_jpeg: bool = False,
    min_seconds: float = 2.0,
    min_images: int = 50,
) -> float:
    """Preprocessed images per second over ``paths`` (repeated until both minimums are reached)."""
    if not paths:
        raise XcftError("the data has no image to decode")
    load_image(paths[0], img_size, fast_jpeg=fast_jpeg)  # warm caches / imports
    if workers <= 0:
        n, start = 0, time.perf_counter()
        while True:
            for p in paths:
                load_image(p, img_size, fast_jpeg=fast_jpeg)
                n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and n >= min_images:
                return n / elapsed
    # Workers: time from the first image received (worker start-up excluded) to the last.
    start_probe = time.perf_counter()
    reps = 1
    while True:
        loader = torch.utils.data.DataLoader(
            _ImageList(list(paths) * reps, img_size, fast_jpeg), batch_size=None, num_workers=workers, prefetch_factor=4
        )
        it = iter(loader)
        next(it)
        start = time.perf_counter()
        n = sum(1 for _ in it)
        elapsed = time.perf_counter() - start
        if (elapsed >= min_seconds and n >= min_images) or time.perf_counter() - start_probe > 60:
            return n / max(elapsed, 1e-9)
        reps *= max(2, int(min_seconds / max(elapsed, 1e-3)) + 1)


def make_photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A photo-like JPEG (smooth colour fields, texture and edges, quality 90) of ``width``×``height``."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [127 + 100 * np.sin(xx / (width / 3.1) + c) * np.cos(yy / (height / 2.3) - c) for c in (0.0, 1.3, 2.6)], axis=-1
    )
    noise = rng.normal(0, 18, size=(height // 4 + 1, width // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:height, :width]
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 4)), y0 + int(rng.integers(20, height // 4))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    img.save(path, "JPEG", quality=90)
    return path


def run_data_bench(
    data: str,
    img_size: int,
    *,
    workers: int = 0,
    fast_jpeg: bool = False,
    photo: tuple[int, int] | None = None,
    sources: Sequence[str] = (),
    min_seconds: float = 2.0,
    calibration_seconds: float = 0.3,
) -> dict[str, Any]:
    """Images/s on the data's images (and, with ``photo``, exact vs fast JPEG on a large generated photo)."""
    calib = calibration_gflops(calibration_seconds)
    paths = data_image_paths(data, sources)
    result: dict[str, Any] = {
        "images_per_s": images_per_second(paths, img_size, workers=workers, fast_jpeg=fast_jpeg, min_seconds=min_seconds),
        "img_size": img_size,
        "workers": workers,
        "fast_jpeg": fast_jpeg,
        "distinct_images": len(set(paths)),
        "calibration_gflops": calib,
        "threads": torch.get_num_threads(),
    }
    if photo:
        with tempfile.TemporaryDirectory(prefix="xcft-photo-") as tmp:
            p = make_photo(Path(tmp) / "photo.jpg", *photo)
            exact = images_per_second([p], img_size, workers=0, fast_jpeg=False, min_seconds=min_seconds, min_images=5)
            fast = images_per_second([p], img_size, workers=0, fast_jpeg=True, min_seconds=min_seconds, min_images=5)
            a = load_image(p, img_size)
            b = load_image(p, img_size, fast_jpeg=True)
        result["photo"] = {
            "size": f"{photo[0]}x{photo[1]}",
            "exact_images_per_s": exact,
            "fast_jpeg_images_per_s": fast,
            "speedup": fast / exact,
            "max_abs_diff": float(np.abs(a - b).max()),
            "mean_abs_diff": float(np.abs(a - b).mean()),
        }
    return result


def format_data_result(r: dict[str, Any]) -> str:
    lines = [
        f"images/s          {r['images_per_s']:.1f} ({r['img_size']} px, {r['workers'] or 'no'} workers, "
        f"{'fast JPEG' if r['fast_jpeg'] else 'exact'}; {r['distinct_images']} distinct images)",
        f"calibration       {r['calibration_gflops']:.1f} GFLOP/s (float32 1024x1024 matmul, {r['threads']} threads)",
    ]
    if "photo" in r:
        ph = r["photo"]
        lines.append(
            f"large photo       {ph['size']}: exact {ph['exact_images_per_s']:.2f} images/s, fast JPEG "
            f"{ph['fast_jpeg_images_per_s']:.2f} images/s (x{ph['speedup']:.2f}); normalised pixels differ by "
            f"{ph['mean_abs_diff']:.4f} on average, {ph['max_abs_diff']:.3f} at most"
        )
    return "\n".join(lines)


__all__ = ["data_image_paths", "format_data_result", "images_per_second", "make_photo", "run_data_bench"]
