"""Batched generation (left padding, KV cache) gives what one-at-a-time chat gives, token for token.

Both families, one batch mixing text-only prompts, one and several images, histories, prompt
lengths and (2.5) crop grids; the answers are compared with ``model.chat`` on each prompt alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from xcft.model.presets import build_model
from xcft.model.template_xcomposer2 import LAYOUT_OFFICIAL

torch.set_num_threads(1)


def _picture(folder: Path, name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    img = Image.new("RGB", size, colour)
    w, h = size
    ImageDraw.Draw(img).ellipse([w // 5, h // 5, 3 * w // 4, 4 * h // 5], fill=(255 - colour[0], 40, colour[2] // 2))
    path = folder / f"{name}.png"
    img.save(path)
    return str(path)


#: (query, image sizes, history): text only, one image, several images, a history, short and long.
PROMPTS = [
    ("What is shown?", [(80, 60)], []),
    ("Say something about the weather today and tomorrow please.", [], []),
    ("Compare them.", [(60, 60), (120, 40)], []),
    ("Hi", [], [("Earlier question", "earlier answer")]),
    ("<ImageHere> And this one, what colour is the disc in the middle of it?", [(50, 100)], [("Hello", "Hi there")]),
]


def _requests(folder: Path, scale: int) -> list[tuple[str, list[str], list[tuple[str, str]]]]:
    out = []
    for k, (query, sizes, history) in enumerate(PROMPTS):
        images = [
            _picture(folder, f"p{k}-{j}", (w * scale, h * scale), (30 + 40 * k, 200 - 30 * j, 90))
            for j, (w, h) in enumerate(sizes)
        ]
        out.append((query, images, history))
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-2.5"])
def test_batched_greedy_equals_chat_one_at_a_time(preset, tok, tmp_path):
    kwargs = {"img_size": 56} if preset == "tiny" else {}
    model = build_model(preset, vocab_size=int(tok.vocab_size), seed=3, prompt_layout=LAYOUT_OFFICIAL, **kwargs).eval()
    requests = _requests(tmp_path, 6 if model.config.hd else 1)  # 2.5: large enough for several crops
    hd_num = 4 if model.config.hd else None
    prompts = [model.chat_inputs(tok, q, images, history, hd_num=hd_num) for q, images, history in requests]
    lengths = {int(p.input_ids.shape[0]) for p in prompts}
    assert len(lengths) == len(prompts)  # every row padded differently
    if model.config.hd:
        grids = {tuple(g) for p in prompts if p.image_grids is not None for g in p.image_grids.tolist()}
        assert len(grids) >= 3  # several crop grids in one batch

    batched = model.answer_batch(tok, prompts, max_new_tokens=12, do_sample=False)
    for (query, images, history), prompt, (text, tokens) in zip(requests, prompts, batched):
        [(alone_text, alone_tokens)] = model.answer_batch(tok, [prompt], max_new_tokens=12, do_sample=False)
        assert tokens == alone_tokens, query
        reply, _ = model.chat(tok, query, images=images, history=history, max_new_tokens=12, do_sample=False, hd_num=hd_num)
        assert text == alone_text == reply, query
    assert any(len(t) > 1 for _, t in batched)


def test_batch_rows_keep_their_images_apart(tok, tmp_path):
    """Swapping two image rows swaps their answers: each row's slots get its own images."""
    model = build_model("tiny", vocab_size=int(tok.vocab_size), seed=5, img_size=56).eval()
    a = _picture(tmp_path, "a", (60, 60), (250, 10, 10))
    b = _picture(tmp_path, "b", (60, 60), (10, 10, 250))
    pa = model.chat_inputs(tok, "Colour?", [a])
    pb = model.chat_inputs(tok, "Colour?", [b, a])
    first = model.answer_batch(tok, [pa, pb], max_new_tokens=8, do_sample=False)
    second = model.answer_batch(tok, [pb, pa], max_new_tokens=8, do_sample=False)
    assert first == second[::-1]
