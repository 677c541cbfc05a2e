"""One chat template for training and chat; the chat prompt equals the official 2.0 inference prompt.

The official prompts are written out by hand from the official chat's rules (system turn, turns,
answer header; ``<s>`` before every non-empty text piece around the images), independently of
xcft's template code. Tokenizer and model are built here, so no reference files are needed.
"""

from __future__ import annotations

import pytest
import torch

from xcft.data.encode import encode_conversation
from xcft.data.schema import Conversation, Message
from xcft.data.spm_builder import build_tokenizer
from xcft.model.presets import build_model
from xcft.model.template_xcomposer2 import OFFICIAL_SYSTEM_PROMPT
from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
OFFICIAL_META = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
    "the provided image."
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return InternLM2Tokenizer.from_model_file(build_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tok):
    return build_model("tiny", vocab_size=int(tok.vocab_size), seed=0)


def _official(tok, pieces: list[str], slots: int) -> list[int]:
    """Hand-built official 2.0 ids: ``<s>`` + piece for each non-empty piece, image slots (pad id 2) between."""
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if piece:
            ids += [tok.bos_token_id] + tok.encode_text(piece)
        if k < len(pieces) - 1:
            ids += [2] * slots
    return ids


def _chat_ids(model, tok, query, history=(), system=OFFICIAL_SYSTEM_PROMPT, images=0):
    ids, mask = model.build_chat_inputs(tok, query, history, system, num_images=images)
    assert int(mask.sum()) == images * model.image_tokens
    return ids[0].tolist()


def test_official_system_prompt_is_the_official_text():
    assert OFFICIAL_SYSTEM_PROMPT == OFFICIAL_META


def test_training_prefix_equals_chat_prompt_text_only(tok, model):
    turns = [("user", "What is two plus two?"), ("assistant", "Four."), ("user", "And three plus three?"), ("assistant", "Six.")]
    conv = Conversation(messages=[Message(r, t) for r, t in turns], id="t")
    enc = encode_conversation(conv, tok, model.config.img_size, max_length=4096)
    chat = _chat_ids(model, tok, "And three plus three?", history=[("What is two plus two?", "Four.")], system=None)
    assert enc.input_ids[: len(chat)] == chat
    # the answer that follows is what training supervises
    supervised = [t for t, lab in zip(enc.input_ids[len(chat):], enc.labels[len(chat):]) if lab != -100]
    assert tok.decode(supervised) == f"Six.{E}</s>"


def test_chat_prompt_text_only_with_official_system_prompt(tok, model):
    text = f"{S}system\n{OFFICIAL_META}{E}\n{S}user\nHello?{E}\n{S}assistant\n"
    assert _chat_ids(model, tok, "Hello?") == [tok.bos_token_id] + tok.encode_text(text)


def test_chat_prompt_with_history(tok, model):
    text = (
        f"{S}system\n{OFFICIAL_META}{E}\n{S}user\nHi{E}\n{S}assistant\nHello!{E}\n"
        f"{S}user\nHow are you?{E}\n{S}assistant\n"
    )
    assert _chat_ids(model, tok, "How are you?", history=[("Hi", "Hello!")]) == [tok.bos_token_id] + tok.encode_text(text)


def test_chat_prompt_one_image_with_placeholder(tok, model):
    pieces = [f"{S}system\n{OFFICIAL_META}{E}\n{S}user\n", f"What is this?{E}\n{S}assistant\n"]
    want = _official(tok, pieces, model.image_tokens)
    assert _chat_ids(model, tok, "<ImageHere>What is this?", images=1) == want
    # without a placeholder the image goes to the start of the query (documented difference)
    assert _chat_ids(model, tok, "What is this?", images=1) == want


def test_chat_prompt_image_in_the_middle_and_several_images(tok, model):
    pieces = [f"{S}user\nCompare ", " and ", f".{E}\n{S}assistant\n"]
    got = _chat_ids(model, tok, "Compare <ImageHere> and <ImageHere>.", system="", images=2)
    assert got == _official(tok, pieces, model.image_tokens)
    # two images side by side: the empty piece between them gets no <s>
    pieces = [f"{S}user\n", "", f"Same?{E}\n{S}assistant\n"]
    assert _chat_ids(model, tok, "Same?", system="", images=2) == _official(tok, pieces, model.image_tokens)


def test_training_layout_has_one_bos(tok, model):
    ids, _ = model.build_chat_inputs(tok, "<ImageHere>What?", (), None, num_images=1, bos_per_piece=False)
    ids = ids[0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_chat_defaults_to_official_sampling(tok, model, monkeypatch):
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return torch.cat([kwargs["input_ids"], torch.tensor([[tok.eos_token_id]])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    model.chat(tok, "Hi")
    assert (seen["do_sample"], seen["temperature"], seen["top_p"], seen["repetition_penalty"]) == (True, 1.0, 0.8, 1.005)
    seen.clear()
    model.chat(tok, "Hi", do_sample=False)
    assert seen["do_sample"] is False and "temperature" not in seen
