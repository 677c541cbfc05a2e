"""Image preprocessing: bit-equal to the official pixels; every PIL mode becomes RGB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xcft.model.image_processing_xcomposer2 import (
    XComposer2ImageProcessor,
    load_image,
    load_image_tensor,
)


def _fixture_images(fixture_dir: Path) -> list[tuple[str, dict]]:
    cases = json.loads((fixture_dir / "cases.json").read_text())["cases"]
    seen: dict[str, dict] = {}
    for case in cases:
        if "pixel_values" not in case:
            continue
        for name, stats in zip(case["image_files"], case["pixel_values"]["per_image"]):
            seen.setdefault(name, stats)
    return sorted(seen.items())


def test_pixels_equal_official(fixture_dir: Path, examples_dir: Path) -> None:
    images = _fixture_images(fixture_dir)
    assert len(images) == 4
    for name, stats in images:
        x = load_image(examples_dir / "data" / "images" / name, 490)
        assert x.dtype == np.float32 and list(x.shape) == stats["shape"] == [3, 490, 490]
        np.testing.assert_allclose(x.reshape(-1)[:8], stats["first8"], rtol=0, atol=1e-6, err_msg=name)
        for key, val in (("sum", x.sum(dtype=np.float64)), ("abs_sum", np.abs(x).sum(dtype=np.float64))):
            assert abs(val - stats[key]) <= 1e-5 * abs(stats[key]), (name, key, val, stats[key])
        assert abs(x.mean(dtype=np.float64) - stats["mean"]) <= 1e-6


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "P", "P_transparent", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")
    if mode == "P_transparent":
        img = rgb.convert("P")
        img.info["transparency"] = 0
        path = _save(img, tmp_path / "x.png", transparency=0)
    elif mode == "RGBA":
        img = rgb.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)))
        path = _save(img, tmp_path / "x.png")
    elif mode == "CMYK":
        path = _save(rgb.convert("CMYK"), tmp_path / "x.jpg")
    elif mode == "I;16":
        arr = rng.integers(0, 256, (37, 53), dtype=np.uint16)
        path = _save(Image.fromarray(arr).convert("I;16"), tmp_path / "x.png")
    else:
        path = _save(rgb.convert(mode), tmp_path / "x.png")
    x = load_image(path, 28)
    assert x.shape == (3, 28, 28) and x.dtype == np.float32 and np.isfinite(x).all()
    # the official pipeline: convert("RGB") (alpha dropped), bicubic, /255, CLIP norm
    ref = np.asarray(Image.open(path).convert("RGB").resize((28, 28), Image.BICUBIC), dtype=np.float32) / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)[:, None, None]
    np.testing.assert_array_equal(x, (ref.transpose(2, 0, 1) - mean) / std)


def test_pil_input_tensor_and_processor(tmp_path: Path) -> None:
    img = Image.new("RGB", (10, 20), (255, 0, 128))
    a = load_image(img, 14)
    t = load_image_tensor(img, 14)
    assert t.shape == (3, 14, 14) and np.array_equal(t.numpy(), a)
    # pure red channel at 255 -> (1 - mean) / std
    assert np.allclose(a[0], (1 - 0.48145466) / 0.26862954, atol=1e-6)
    batch = XComposer2ImageProcessor(14)([img, img])
    assert tuple(batch.shape) == (2, 3, 14, 14)
    assert tuple(XComposer2ImageProcessor(14)([]).shape) == (0, 3, 14, 14)


def test_fast_jpeg_close_not_default(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:1200, 0:1600]
    arr = np.stack([(xx / 1600 * 255), (yy / 1200 * 255), ((xx + yy) % 256)], -1).astype(np.uint8)
    path = _save(Image.fromarray(arr, "RGB"), tmp_path / "big.jpg", quality=95)
    exact = load_image(path, 112)
    fast = load_image(path, 112, fast_jpeg=True)
    assert fast.shape == exact.shape
    assert np.abs(fast - exact).mean() < 0.05  # close, but not promised bit-exact
    assert np.array_equal(load_image(path, 112), exact)
