"""InternLM-XComposer-2.5 HD preprocessing: crop grids, token counts, bit-exact pixels and tower views."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xcft.model.image_processing_xcomposer2 import (
    chat_hd_num,
    hd_crop_grid,
    hd_image_tokens,
    hd_resize_plan,
    hd_tokens_for_grid,
    hd_transform_rgb,
    hd_views,
    load_hd_image,
    load_hd_views,
)

# (width, height, hd_num) -> (rows, cols): observed by running the official finetune transform.
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


def _fixture_images(fixture_2d5_dir: Path):
    cases = json.loads((fixture_2d5_dir / "cases.json").read_text())["cases"]
    seen = {}
    for case in cases:
        for row in case["rows"]:
            for rec in row.get("images", []):
                seen.setdefault((rec["file"], rec["hd_num"]), rec)
    return cases, seen


def test_fixture_pixels_bit_exact(fixture_2d5_dir: Path):
    _, seen = _fixture_images(fixture_2d5_dir)
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
    cases, _ = _fixture_images(fixture_2d5_dir)
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
