"""Generation: the chat prompt format, KV-cache vs no-cache greedy decoding, images in chat (tiny folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_base: Path):
    from xcft.model.loading import load_pretrained

    return load_pretrained(tiny_base, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo-like picture: a colour gradient with a dark disc."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:90, 0:120]
    rgb = np.stack([x * 2, y * 2, 255 - x - y], axis=-1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    ImageDraw.Draw(img).ellipse([30, 20, 80, 70], fill=(20, 20, 20))
    path = tmp_path_factory.mktemp("gen-image") / "disc.jpg"
    img.save(path)
    return path


def test_chat_prompt_format(loaded):
    model, tok = loaded
    ids, mask = model.build_chat_inputs(
        tok,
        "What is <ImageHere> this?",
        history=[("Hi", "Hello!")],
        meta_instruction="Be brief.",
        num_images=1,
        prompt_layout="official",
    )
    ids, mask = ids[0].tolist(), mask[0].tolist()
    slots = model.image_tokens
    assert ids[0] == tok.bos_token_id and sum(mask) == slots == 16
    start = mask.index(True)
    assert all(mask[start : start + slots]) and all(i == 2 for i in ids[start : start + slots])
    assert ids[start + slots] == tok.bos_token_id  # the official 2.0 chat: every text piece starts with <s>
    text = tok.decode(ids[1:start]) + "<ImageHere>" + tok.decode(ids[start + slots + 1 :])
    assert text == (
        "[UNUSED_TOKEN_146]system\nBe brief.[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nHello![UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nWhat is <ImageHere> this?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    )
    # no placeholder: the image goes first in the query; no system prompt: no system turn
    ids2, mask2 = model.build_chat_inputs(tok, "Describe it.", meta_instruction="", num_images=1)
    header = [tok.bos_token_id, *tok.encode_text("[UNUSED_TOKEN_146]user\n")]
    assert ids2[0, : len(header)].tolist() == header and mask2[0].tolist().index(True) == len(header)
    with pytest.raises(ValueError, match=r"2 <ImageHere> placeholders .history included. but 1 images"):
        model.build_chat_inputs(tok, "<ImageHere><ImageHere>", num_images=1)


def test_greedy_generation_with_and_without_cache_agree(loaded, image):
    model, tok = loaded
    ids, mask = model.build_chat_inputs(tok, "What animal is this?", num_images=1)
    from xcft.model.image_processing_xcomposer2 import load_image

    pixels = torch.from_numpy(load_image(image, model.config.img_size))[None]
    runs = {}
    for use_cache in (True, False):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            image_mask=mask,
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=tok.eos_token_id,
        )
        runs[use_cache] = out[0, ids.shape[1] :].tolist()
    assert len(runs[True]) == 6 and runs[True] == runs[False]
    # the image changes the answer's logits (Partial LoRA + features are really used)
    with torch.no_grad():
        with_img = model(input_ids=ids, pixel_values=pixels, image_mask=mask).logits[0, -1]
        without = model(input_ids=ids).logits[0, -1]
    assert (with_img - without).abs().max() > 1e-3


def test_chat_with_and_without_cache(loaded, image):
    model, tok = loaded
    answers = []
    for use_cache in (True, False):
        response, history = model.chat(
            tok,
            "Describe the image.",
            images=[str(image)],
            max_new_tokens=5,
            use_cache=use_cache,
            min_new_tokens=5,
            do_sample=False,
        )
        answers.append(response)
        assert history == [("<ImageHere>Describe the image.", response)]  # the history keeps where the image went
    assert answers[0] == answers[1]
    # follow-up turn: the conversation's images come with every turn and stay where the history put them
    response, history = model.chat(tok, "And then?", images=[str(image)], history=history, max_new_tokens=3, do_sample=False)
    assert len(history) == 2 and history[-1] == ("And then?", response)
