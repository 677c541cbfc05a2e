"""One chat template for training and chat; the chat prompt equals the official 2.0 inference prompt.

The official prompts are written out by hand from the official chat's rules (system turn, turns,
answer header; ``<s>`` before every non-empty text piece around the images), independently of
xcft's template code. Tokenizer (conftest ``tok``) and model are built on the spot, so no reference
files are needed.
"""

from __future__ import annotations

import pytest
import torch

from xcft.data.encode import encode_conversation
from xcft.data.schema import Conversation, Message
from xcft.model.configuration_xcomposer2 import XComposer2Config
from xcft.model.loading import load_pretrained, save_pretrained
from xcft.model.template_xcomposer2 import LAYOUT_OFFICIAL, LAYOUT_TRAINING, OFFICIAL_SYSTEM_PROMPT

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
def model(tok, tiny_model):
    """A model in the official layout (as official checkpoints and their finetunes record it)."""
    return tiny_model(vocab_size=int(tok.vocab_size), plora_dropout=0.05, prompt_layout=LAYOUT_OFFICIAL)


def _official(tok, pieces: list[str], slots: int) -> list[int]:
    """Hand-built official 2.0 ids: ``<s>`` + piece for each non-empty piece, image slots (pad id 2) between."""
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if piece:
            ids += [tok.bos_token_id, *tok.encode_text(piece)]
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
    supervised = [t for t, lab in zip(enc.input_ids[len(chat) :], enc.labels[len(chat) :]) if lab != -100]
    assert tok.decode(supervised) == f"Six.{E}</s>"


def test_chat_prompt_text_only_with_official_system_prompt(tok, model):
    text = f"{S}system\n{OFFICIAL_META}{E}\n{S}user\nHello?{E}\n{S}assistant\n"
    assert _chat_ids(model, tok, "Hello?") == [tok.bos_token_id, *tok.encode_text(text)]


def test_chat_prompt_with_history(tok, model):
    text = f"{S}system\n{OFFICIAL_META}{E}\n{S}user\nHi{E}\n{S}assistant\nHello!{E}\n{S}user\nHow are you?{E}\n{S}assistant\n"
    assert _chat_ids(model, tok, "How are you?", history=[("Hi", "Hello!")]) == [tok.bos_token_id, *tok.encode_text(text)]


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


def test_config_without_a_layout_is_official():
    assert XComposer2Config().prompt_layout == LAYOUT_OFFICIAL
    with pytest.raises(ValueError, match="prompt_layout"):
        XComposer2Config(prompt_layout="chatml")


def test_a_new_model_records_and_defaults_to_the_training_layout(tok, model, tiny_model, tmp_path):
    new = tiny_model(vocab_size=int(tok.vocab_size))
    assert new.config.prompt_layout == LAYOUT_TRAINING
    folder = save_pretrained(new, tok, tmp_path / "new")
    loaded, _ = load_pretrained(folder, dtype=torch.float32, device="cpu")
    assert loaded.config.prompt_layout == LAYOUT_TRAINING
    trained_as = model.build_chat_inputs(tok, "<ImageHere>What?", (), None, num_images=1, bos_per_piece=False)[0]
    # the recorded layout is the default: no system prompt, one <s>, as training encodes samples
    assert torch.equal(loaded.build_chat_inputs(tok, "<ImageHere>What?", num_images=1)[0], trained_as)
    # and it can be overridden both ways
    official = model.build_chat_inputs(tok, "<ImageHere>What?", num_images=1)[0]
    assert torch.equal(loaded.build_chat_inputs(tok, "<ImageHere>What?", num_images=1, prompt_layout="official")[0], official)
    assert torch.equal(model.build_chat_inputs(tok, "<ImageHere>What?", num_images=1, prompt_layout="training")[0], trained_as)


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


# ============================================================================ 2.5


@pytest.fixture(scope="module")
def model25(tok):
    from xcft.model.configuration_xcomposer2 import XComposer2Config
    from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM

    torch.manual_seed(0)
    config = XComposer2Config(
        family="2.5",
        vocab_size=int(tok.vocab_size),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        img_size=56,
        plora_r=8,
        plora_alpha=8.0,
        max_length=4096,
        vision_config={
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 14,
        },
    )
    return XComposer2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.new("RGB", (150, 70), (200, 30, 30)).save(path)
    return path


def _slots25(model, path, hd_num):
    from PIL import Image

    from xcft.model.image_processing_xcomposer2 import hd_crop_grid

    with Image.open(path) as img:
        rows, cols = hd_crop_grid(*img.size, hd_num, inference=True, view_size=model.config.img_size)
    return model.config.hd_image_tokens(rows, cols)


def _official25(tok, pieces: list[str], slots: list[int]) -> list[int]:
    """Hand-built official 2.5 ids: ``<s>`` once before the first piece (even empty), image slots between pieces."""
    ids = [tok.bos_token_id]
    for k, piece in enumerate(pieces):
        ids += tok.encode_text(piece) if piece else []
        if k < len(pieces) - 1:
            ids += [2] * slots[k]
    return ids


def _spy_generate(model, monkeypatch):
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return torch.cat([kwargs["input_ids"], torch.tensor([[2]])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    return seen


def test_chat25_text_only_has_no_system_prompt(tok, model25, monkeypatch):
    seen = _spy_generate(model25, monkeypatch)
    model25.chat(tok, "Hello?")
    assert seen["input_ids"][0].tolist() == [tok.bos_token_id, *tok.encode_text(f"{S}user\nHello?{E}\n{S}assistant\n")]
    # use_meta: the official system prompt on request
    model25.chat(tok, "Hello?", meta_instruction=OFFICIAL_SYSTEM_PROMPT)
    text = f"{S}system\n{OFFICIAL_META}{E}\n{S}user\nHello?{E}\n{S}assistant\n"
    assert seen["input_ids"][0].tolist() == [tok.bos_token_id, *tok.encode_text(text)]


def test_chat25_one_image_without_placeholder_goes_before_the_prompt(tok, model25, photo, monkeypatch):
    seen = _spy_generate(model25, monkeypatch)
    model25.chat(tok, "What is this?", images=[str(photo)])
    slots = _slots25(model25, photo, 24)
    want = _official25(tok, ["", f"{S}user\nWhat is this?{E}\n{S}assistant\n"], [slots])
    assert seen["input_ids"][0].tolist() == want
    assert int(seen["image_mask"].sum()) == slots and seen["image_grids"].shape == (1, 2)


def test_chat25_image_with_placeholder_and_history(tok, model25, photo, monkeypatch):
    seen = _spy_generate(model25, monkeypatch)
    model25.chat(tok, "<ImageHere>And now?", images=[str(photo)], history=[("Hi", "Hello!")])
    pieces = [f"{S}user\nHi{E}\n{S}assistant\nHello!{E}\n{S}user\n", f"And now?{E}\n{S}assistant\n"]
    assert seen["input_ids"][0].tolist() == _official25(tok, pieces, [_slots25(model25, photo, 24)])


def test_chat25_several_images_are_numbered_with_hd_num_6(tok, model25, photo, monkeypatch):
    seen = _spy_generate(model25, monkeypatch)
    model25.chat(tok, "Compare them.", images=[str(photo), str(photo)])
    slots = _slots25(model25, photo, 6)
    pieces = [f"{S}user\nImage1 ", "; Image2 ", f"; Compare them.{E}\n{S}assistant\n"]
    assert seen["input_ids"][0].tolist() == _official25(tok, pieces, [slots, slots])


def test_chat25_generates_end_to_end(tok, model25, photo):
    reply, history = model25.chat(tok, "What is this?", images=[str(photo)], max_new_tokens=3, do_sample=False)
    assert isinstance(reply, str) and history == [("What is this?", reply)]
