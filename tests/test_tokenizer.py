"""InternLM2Tokenizer: special ids looked up, save/reload without xcft (on the built tokenizer); ids
equal the official ones (on the real tokenizer, ../shared)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

IMAGE = "<ImageHere>"


@pytest.fixture(scope="module")
def real_tok(real_tokenizer: Path) -> InternLM2Tokenizer:
    return InternLM2Tokenizer.from_model_file(real_tokenizer)


@pytest.fixture(scope="module")
def cases(fixture_dir: Path) -> list[dict]:
    return json.loads((fixture_dir / "cases.json").read_text())["cases"]


def test_special_ids(tok: InternLM2Tokenizer) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    # looked up in the model, not assumed: the turn tokens are the last two ids, as in the real model
    assert tok.turn_start_id == tok.sp_model.piece_to_id("[UNUSED_TOKEN_146]") == 999
    assert tok.turn_end_id == tok.sp_model.piece_to_id("[UNUSED_TOKEN_145]") == 998
    assert tok.vocab_size == len(tok) == 1000


def test_special_ids_of_the_real_tokenizer(real_tok: InternLM2Tokenizer) -> None:
    assert (real_tok.bos_token_id, real_tok.eos_token_id, real_tok.pad_token_id) == (1, 2, 2)
    assert (real_tok.turn_start_id, real_tok.turn_end_id) == (92543, 92542)
    assert real_tok.vocab_size == len(real_tok) == 92544


def test_no_dummy_prefix_and_turn_tokens_single(tok: InternLM2Tokenizer) -> None:
    assert tok.encode_text("hello") == [tok.sp_model.piece_to_id("hello")]
    assert tok.encode_text(" ") == [tok.sp_model.piece_to_id("\u2581")]
    assert tok.encode_text("\nWhat") == [tok.sp_model.piece_to_id("\n"), tok.sp_model.piece_to_id("What")]
    ids = tok.encode_text("[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n")
    assert ids[0] == tok.turn_start_id and tok.turn_end_id in ids
    assert tok.encode_text("") == []
    # literal control strings in training text stay text
    assert tok.eos_token_id not in tok.encode_text("a </s> b")


def test_real_tokenizer_ids(real_tok: InternLM2Tokenizer) -> None:
    assert real_tok.encode_text("Hi") == [real_tok.sp_model.piece_to_id("Hi")]
    assert real_tok.encode_text(" ") == [262]
    assert real_tok.encode_text("\nWhat") == [364, 3993]
    assert real_tok.eos_token_id not in real_tok.encode_text("a </s> b")


def _official_ids(tok: InternLM2Tokenizer, case: dict) -> list[int]:
    """The official assembly: split at <ImageHere>, BOS on the first piece, 1225 slots per image."""
    text = case["conv2text"]
    assert text.endswith("\n</s>")
    pieces = text[: -len("\n</s>")].split(IMAGE)
    out = [tok.bos_token_id]
    for k, piece in enumerate(pieces):
        if k:
            out += [-1] * 1225
        out += tok.encode_text(piece)
    return [*out, tok.eos_token_id]


def test_ids_equal_fixture(real_tok: InternLM2Tokenizer, cases: list[dict]) -> None:
    checked = 0
    for case in cases:
        if case["seq_len"] != case["untruncated_token_count"]:
            continue  # truncation cases are covered by the encoder tests
        assert _official_ids(real_tok, case) == case["input_ids_image_as_-1"], case["name"]
        checked += 1
    assert checked == 9


def test_call_adds_bos(tok: InternLM2Tokenizer) -> None:
    assert tok("Good morning, world")["input_ids"] == [tok.bos_token_id, *tok.encode_text("Good morning, world")]


def test_decode(tok: InternLM2Tokenizer) -> None:
    text = "[UNUSED_TOKEN_146]user\n大熊猫 eats bamboo 🐼[UNUSED_TOKEN_145]\n"
    ids = [tok.bos_token_id, *tok.encode_text(text), tok.eos_token_id]
    assert tok.decode(ids) == "<s>" + text + "</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\n大熊猫 eats bamboo 🐼\n"


def test_pickle_roundtrip(tok: InternLM2Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_text("pickled text 猫") == tok.encode_text("pickled text 猫")


def test_from_folder_and_missing(built_tokenizer: Path, tmp_path: Path) -> None:
    assert InternLM2Tokenizer.from_model_file(built_tokenizer.parent).vocab_size == 1000
    with pytest.raises(FileNotFoundError):
        InternLM2Tokenizer.from_model_file(tmp_path)


def test_save_and_autotokenizer_without_xcft(tok: InternLM2Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    tok.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
    assert (out / "tokenizer.model").is_file() and (out / "tokenization_internlm2.py").is_file()
    code = (
        "import sys\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "assert not [m for m in sys.modules if m.startswith('xcft')]\n"
        "print(t.turn_start_id, t.turn_end_id, t('Hi there')['input_ids'])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:2] == [str(tok.turn_start_id), str(tok.turn_end_id)] == ["999", "998"]
    assert res.stdout.strip().endswith(str([1, *tok.encode_text("Hi there")]))
