"""Encoder parity with the official data path (public fixture, real tokenizer) and our deliberate
differences; the behaviour tests use the tokenizer built on the spot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xcft.data.encode import IGNORE_INDEX, IMAGE_SLOT, encode_conversation, slots_per_image
from xcft.data.schema import Conversation, Message, normalize_sample
from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

WELL_FORMED = ["p01", "p02", "p03", "p04", "p05", "p06", "p07", "p08", "p11"]


@pytest.fixture(scope="module")
def real_tok(real_tokenizer: Path) -> InternLM2Tokenizer:
    return InternLM2Tokenizer.from_model_file(real_tokenizer)


@pytest.fixture(scope="module")
def cases(fixture_dir: Path) -> dict[str, dict]:
    data = json.loads((fixture_dir / "cases.json").read_text())
    return {c["name"][:3]: c for c in data["cases"]}


def _conv(case: dict, examples_dir: Path) -> Conversation:
    record = dict(case["conversation"])
    if case["image_files"]:
        record["image"] = case["image_files"]
    conv, problems = normalize_sample(record, file="case", index=0, search_dirs=[examples_dir / "data" / "images"])
    assert conv is not None, problems
    return conv


@pytest.mark.parametrize("name", [*WELL_FORMED, "p09"])
def test_parity_with_fixture(name: str, real_tok, cases, examples_dir: Path) -> None:
    case = cases[name]
    enc = encode_conversation(_conv(case, examples_dir), real_tok, 490, case["max_length"])
    assert enc.input_ids == case["input_ids_image_as_-1"]
    assert enc.labels == case["labels"]
    assert [int(m) for m in enc.image_mask] == case["im_mask"]
    assert [list(s) for s in enc.image_spans] == case["image_spans_[start,len]"]
    assert len(enc) == case["seq_len"]
    assert enc.num_supervised == case["num_target_tokens"]
    assert enc.untruncated_length == case["untruncated_token_count"]
    assert enc.truncated == (name == "p09")


def test_p10_never_splits_an_image(real_tok, cases, examples_dir: Path) -> None:
    case = cases["p10"]
    enc = encode_conversation(_conv(case, examples_dir), real_tok, 490, case["max_length"])
    start2 = case["image_spans_[start,len]"][1][0]
    # the official code keeps 740 slots of image 2 and trains a stray "\n"; we end before image 2
    assert len(enc) == start2 == 1260
    assert enc.input_ids == case["input_ids_image_as_-1"][:start2]
    assert enc.image_spans == [(9, 1225)] and enc.num_images == 1 and enc.dropped_images == 1
    # the official count stops early (later pieces are never tokenized); ours is the full length
    assert enc.truncated and enc.untruncated_length > case["untruncated_token_count"] > 2000
    # the labels are the official ones minus the stray newline after the first answer's closing token
    official = case["labels"][:start2]
    stray = [i for i, (a, b) in enumerate(zip(enc.labels, official)) if a != b]
    assert len(stray) == 1 and case["input_ids_image_as_-1"][stray[0]] == 364
    assert enc.labels[stray[0] - 1] == real_tok.turn_end_id
    assert enc.num_supervised == case["num_target_tokens"] - 1


def test_system_turn_never_trained(tok) -> None:
    conv = Conversation([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello.")])
    enc = encode_conversation(conv, tok, 490, 4096)
    expected = [
        tok.bos_token_id,
        *tok.encode_text(
            "[UNUSED_TOKEN_146]system\nBe brief.[UNUSED_TOKEN_145]\n"
            "[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nHello.[UNUSED_TOKEN_145]"
        ),
        tok.eos_token_id,
    ]
    assert enc.input_ids == expected
    trained = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert trained == [*tok.encode_text("Hello."), tok.turn_end_id, tok.eos_token_id]


def test_labels_by_role_not_by_scanning(tok) -> None:
    # a user turn containing the literal closing token text must not shift which turns are trained
    conv = Conversation([Message("user", "say [UNUSED_TOKEN_145] please"), Message("assistant", "ok")])
    enc = encode_conversation(conv, tok, 490, 4096)
    trained = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert trained == [*tok.encode_text("ok"), tok.turn_end_id, tok.eos_token_id]


def test_trailing_user_turn_eos_not_trained(tok) -> None:
    conv = Conversation([Message("user", "a"), Message("assistant", "b"), Message("user", "c")])
    enc = encode_conversation(conv, tok, 490, 4096)
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == IGNORE_INDEX
    assert enc.num_supervised == len(tok.encode_text("b")) + 1


def test_truncation_before_any_answer_leaves_nothing(tok, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")  # existence is enough for the encoder
    conv = Conversation([Message("user", "<ImageHere>describe"), Message("assistant", "a cat")], images=[tmp_path / "a.png"])
    enc = encode_conversation(conv, tok, 224, 100)
    assert slots_per_image(224) == 256
    assert enc.input_ids == [tok.bos_token_id, *tok.encode_text("[UNUSED_TOKEN_146]user\n")]
    assert enc.num_images == 0 and enc.dropped_images == 1 and enc.num_supervised == 0
    full = encode_conversation(conv, tok, 224, 4096)
    assert full.image_spans == [(4, 256)] and full.input_ids.count(IMAGE_SLOT) == 256


def test_text_truncation_keeps_prefix(tok) -> None:
    conv = Conversation([Message("user", "q"), Message("assistant", "word " * 50)])
    full = encode_conversation(conv, tok, 490, 4096)
    cut = encode_conversation(conv, tok, 490, 30)
    assert cut.input_ids == full.input_ids[:30] and cut.labels == full.labels[:30]
    assert cut.truncated and tok.eos_token_id not in cut.input_ids


def test_bad_sizes(tok) -> None:
    conv = Conversation([Message("user", "q"), Message("assistant", "a")])
    with pytest.raises(ValueError):
        encode_conversation(conv, tok, 500, 10)
    with pytest.raises(ValueError):
        encode_conversation(conv, tok, 490, 0)


def test_label_boundary_general_path(tok) -> None:
    """When a header's own ids are not a prefix of the joint ids, boundaries come from decoding."""

    class Odd:
        def __init__(self, inner):
            self.inner = inner
            self.bos_token_id, self.eos_token_id = inner.bos_token_id, inner.eos_token_id
            self.turn_start_id, self.turn_end_id = inner.turn_start_id, inner.turn_end_id

        def encode_text(self, text: str) -> list[int]:
            return [0] if text in ("user\n", "assistant\n") else self.inner.encode_text(text)

        def decode(self, ids, skip_special_tokens=False):
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

        def convert_ids_to_tokens(self, i):
            return self.inner.convert_ids_to_tokens(i)

    conv = Conversation([Message("user", "Describe the sea."), Message("assistant", "Silver light, 大海.")])
    assert encode_conversation(conv, Odd(tok), 490, 4096).labels == encode_conversation(conv, tok, 490, 4096).labels


# --------------------------------------------------------------------------- InternLM-XComposer-2.5: a lone image goes first


def test_lone_image_layout_2_5_and_2_0(tmp_path, tiny25_base, noise_image):
    """2.5: <s>, the image, then every turn (a system turn too); 2.0 keeps the image inside the first user turn."""
    from xcft.data.encode import IMAGE_SLOT, ImageSpec, encode_conversation
    from xcft.data.schema import read_file
    from xcft.model.loading import load_tokenizer

    tok = load_tokenizer(tiny25_base)
    img = noise_image(tmp_path / "a.png", (300, 200), 7)
    data = tmp_path / "s.json"
    data.write_text(
        json.dumps(
            [
                {
                    "image": img,
                    "conversations": [
                        {"from": "system", "value": "Be brief."},
                        {"from": "user", "value": "What?"},
                        {"from": "assistant", "value": "Noise."},
                    ],
                }
            ]
        )
    )
    (conv,), _ = read_file(data)
    spec = ImageSpec(224, 4)
    enc = encode_conversation(conv, tok, spec, 4096, [(2, 2)])
    n = spec.slots((2, 2))
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[1 : 1 + n] == [IMAGE_SLOT] * n
    text = tok.decode(enc.input_ids[1 + n :], skip_special_tokens=False)
    assert text.startswith("[UNUSED_TOKEN_146]system\nBe brief.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\nWhat?")
    assert [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100] == [
        *tok.encode_text("Noise.[UNUSED_TOKEN_145]"),
        tok.eos_token_id,
    ]
    old = encode_conversation(conv, tok, 56, 4096)  # 2.0: after the user header
    first = old.input_ids.index(IMAGE_SLOT)
    assert tok.decode(old.input_ids[:first], skip_special_tokens=False).endswith("[UNUSED_TOKEN_146]user\n")
    with pytest.raises(ValueError, match="one crop grid per image"):
        encode_conversation(conv, tok, spec, 4096)
