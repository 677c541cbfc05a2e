"""Image preprocessing: bit-equal to the official pixels (2.0, and 2.5 HD crop grids, token counts and views); every PIL mode becomes RGB."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xcft.model.image_processing_xcomposer2 import (
    XComposer2ImageProcessor,
    chat_hd_num,
    hd_crop_grid,
    hd_image_tokens,
    hd_resize_plan,
    hd_tokens_for_grid,
    hd_transform_rgb,
    hd_views,
    load_hd_image,
    load_hd_views,
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


# --------------------------------------------------------------------------- InternLM-XComposer-2.5: HD crop grids, token counts, transforms and tower views


OFFICIAL_GRIDS = [
    ((100, 60, 18), (1, 1)),
    ((195, 183, 18), (1, 1)),
    ((220, 330, 18), (1, 1)),
    ((300, 200, 18), (1, 1)),
    ((560, 560, 18), (2, 2)),
    ((560, 560, 1), (1, 1)),
    ((640, 360, 18), (2, 2)),
    ((960, 540, 18), (2, 3)),
    ((1400, 175, 18), (1, 4)),
    ((360, 800, 18), (3, 2)),
    ((150, 700, 18), (2, 1)),
    ((61, 1000, 18), (3, 1)),
    ((1500, 1000, 6), (2, 3)),
    ((1500, 1000, 18), (3, 4)),
    ((1000, 400, 4), (1, 2)),
    ((800, 800, 6), (2, 2)),
]


OFFICIAL_TOKENS = {
    (1, 1): 841,
    (1, 2): 1241,
    (2, 1): 1261,
    (1, 4): 2041,
    (2, 2): 2061,
    (2, 3): 2861,
    (3, 2): 2881,
    (3, 1): 1681,
    (3, 3): 4081,
    (3, 4): 5281,
}


@pytest.mark.parametrize("size,grid", OFFICIAL_GRIDS)
def test_crop_grid_from_header_size(size, grid):
    assert hd_crop_grid(*size) == grid
    assert hd_image_tokens(*size)[0] == grid


def test_tokens_for_grid():
    for grid, tokens in OFFICIAL_TOKENS.items():
        assert hd_tokens_for_grid(*grid) == tokens
    assert hd_tokens_for_grid(2, 3, merged_grid=2) == 7 * 4 + 1 + 3 * 2


def test_float_truncation_and_bad_input():
    # 1120 / (700 / 150) = 239.99999999999997 -> 239, as the official int() truncation
    assert hd_resize_plan(150, 700, 18) == (True, 2, 1120, 239)
    with pytest.raises(ValueError, match="hd_num"):
        hd_crop_grid(100, 100, 0)
    with pytest.raises(ValueError, match="elongated"):
        hd_crop_grid(20000, 1, 18)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_train_transform_by_hand():
    """Tall image: transpose, x1.5 columns, bilinear on the transposed image, centred white padding."""
    img = _image(150, 700)
    out = hd_transform_rgb(img, 18)
    assert out.shape == (1120, 560, 3)
    resized = np.asarray(img.transpose(Image.Transpose.TRANSPOSE).resize((1120, 239), Image.BILINEAR))
    top = (560 - 239) // 2
    expect = np.full((560, 1120, 3), 255, np.uint8)
    expect[top : top + 239] = resized
    np.testing.assert_array_equal(out, expect.transpose(1, 0, 2))
    assert (out[:, :top] == 255).all() and (out[:, top + 239 :] == 255).all()


@pytest.mark.parametrize(
    "size,hd_num,grid,valid",
    [
        ((960, 540), 24, (2, 2), (1120, 630)),  # ceil(960/560) = 2 columns, no x1.5
        ((300, 200), 24, (1, 1), (560, 373)),
        ((540, 960), 6, (2, 2), (630, 1120)),  # tall: padded at the right only
        ((1500, 1000), 6, (2, 3), (1680, 1120)),
    ],
)
def test_inference_transform_by_hand(size, hd_num, grid, valid):
    img = _image(*size, seed=1)
    assert hd_crop_grid(*size, hd_num, inference=True) == grid
    out = hd_transform_rgb(img, hd_num, inference=True)
    assert out.shape == (grid[0] * 560, grid[1] * 560, 3)
    vw, vh = valid
    tall = size[0] < size[1]
    src = img.transpose(Image.Transpose.TRANSPOSE) if tall else img
    resized = np.asarray(src.resize((max(vw, vh), min(vw, vh)), Image.BILINEAR))
    if tall:
        resized = resized.transpose(1, 0, 2)
    np.testing.assert_array_equal(out[:vh, :vw], resized)
    assert (out[vh:] == 255).all() and (out[:, vw:] == 255).all()


def test_chat_hd_num():
    assert (chat_hd_num(0), chat_hd_num(1), chat_hd_num(2), chat_hd_num(5)) == (24, 24, 6, 6)


def test_views_order():
    x = torch.arange(3 * 1120 * 1680, dtype=torch.float32).reshape(3, 1120, 1680)
    v = hd_views(x)
    assert v.shape == (7, 3, 560, 560)
    assert torch.equal(v[1], x[:, :560, :560]) and torch.equal(v[3], x[:, :560, 1120:])
    assert torch.equal(v[4], x[:, 560:, :560]) and torch.equal(v[6], x[:, 560:, 1120:])
    with pytest.raises(ValueError, match="grid"):
        hd_views(torch.zeros(3, 500, 560))


def _fixture_images_hd(fixture_2d5_dir: Path):
    cases = json.loads((fixture_2d5_dir / "cases.json").read_text())["cases"]
    seen = {}
    for case in cases:
        for row in case["rows"]:
            for rec in row.get("images", []):
                seen.setdefault((rec["file"], rec["hd_num"]), rec)
    return cases, seen


def test_fixture_pixels_bit_exact(fixture_2d5_dir: Path):
    _, seen = _fixture_images_hd(fixture_2d5_dir)
    assert len(seen) == 9
    for (name, hd_num), rec in seen.items():
        path = fixture_2d5_dir / "images" / name
        with Image.open(path) as img:
            size = img.size
            rgb = hd_transform_rgb(img, hd_num)
        assert list(size) == rec["original_size_wh"]
        grid, tokens = hd_image_tokens(*size, hd_num)
        assert list(grid) == rec["crop_grid_hw"] and tokens == rec["tokens"], name
        assert [rgb.shape[1], rgb.shape[0]] == rec["hd_image_size_wh"], name
        assert hashlib.sha256(rgb.tobytes()).hexdigest() == rec["hd_image_rgb_uint8_sha256"], name
        pixels = load_hd_image(path, hd_num)
        assert pixels.dtype == np.float32 and list(pixels.shape) == rec["pixel_values"]["shape"]
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == rec["pixel_values"]["sha256_f32"], name


def test_fixture_tower_views_bit_exact(fixture_2d5_dir: Path):
    cases, _ = _fixture_images_hd(fixture_2d5_dir)
    checked = 0
    for case in cases:
        if "vit_input_views" not in case:
            continue
        views = torch.cat(
            [
                load_hd_views(fixture_2d5_dir / "images" / rec["file"], rec["hd_num"])[0]
                for row in case["rows"]
                for rec in row["images"]
            ]
        )
        assert list(views.shape) == case["vit_input_views"]["shape"], case["name"]
        for view, rec in zip(views, case["vit_input_views"]["views"]):
            assert hashlib.sha256(view.numpy().tobytes()).hexdigest() == rec["sha256_f32"], case["name"]
        checked += 1
    assert checked == 9
