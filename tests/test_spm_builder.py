"""The on-the-spot tokenizer follows the InternLM2 conventions and builds fast and deterministically."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from xcft.data.spm_builder import DEMO_COLOURS, DEMO_SHAPES, TURN_END, TURN_START, build_tokenizer
from xcft.errors import XcftError


@pytest.fixture(scope="module")
def built(built_tokenizer: Path) -> Path:
    """The conftest tokenizer: build_tokenizer with the default corpus and vocabulary."""
    return built_tokenizer


def _proto(path: Path) -> pb.ModelProto:
    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    return m


def test_special_ids_and_layout(built: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(built))
    assert sp.vocab_size() == 1000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    # bytes follow the meta pieces, the turn tokens are the last two ids (real model: 92542, 92543)
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    assert sp.piece_to_id(TURN_END) == 998 and sp.piece_to_id(TURN_START) == 999


def test_turn_tokens_are_single_pieces_and_no_dummy_prefix(built: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(built))
    text = f"{TURN_START}user\nWhat colour is the shape?{TURN_END}\n{TURN_START}assistant\nred{TURN_END}"
    pieces = sp.encode(text, out_type=str)
    assert pieces[0] == TURN_START and pieces[-1] == TURN_END
    assert pieces.count(TURN_START) == 2 and pieces.count(TURN_END) == 2
    assert "\n" in pieces
    # no dummy prefix: a text start gets no "▁"; a real leading space does
    assert sp.encode("red", out_type=str) == ["red"]
    assert sp.encode(" red", out_type=str) == ["▁red"]
    # the demo's answers are single pieces, so "first word" accuracy is first-token accuracy
    for word in DEMO_COLOURS + DEMO_SHAPES:
        assert len(sp.encode(word)) == 1, word


@pytest.mark.parametrize("text", ["中文 é ☃", "  two  spaces\tand\ttabs\n\nnewlines  ", "x = 12345;", "\u00a0nbsp"])
def test_byte_fallback_and_whitespace_round_trip(built: Path, text: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(built))
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert sp.decode(ids) == text  # identity normaliser, no whitespace squeezing


def test_digits_are_split(built: Path) -> None:
    assert spm.SentencePieceProcessor(model_file=str(built)).encode("2024", out_type=str) == ["2", "0", "2", "4"]


def test_normalizer_settings_match_real_tokenizer(built: Path, real_tokenizer: Path) -> None:
    ours, real = _proto(built), _proto(real_tokenizer)
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(ours.normalizer_spec, field) == getattr(real.normalizer_spec, field), field
    for field in ("model_type", "split_digits", "byte_fallback", "unk_id", "bos_id", "eos_id", "pad_id"):
        assert getattr(ours.trainer_spec, field) == getattr(real.trainer_spec, field), field


def test_deterministic_fast_and_custom_corpus(tmp_path: Path, built: Path) -> None:
    t0 = time.perf_counter()
    again = build_tokenizer(tmp_path / "a")
    assert time.perf_counter() - t0 < 5.0
    assert again.read_bytes() == built.read_bytes()
    corpus = [f"line {i} about apples and oranges, number {i * 7}" for i in range(300)]
    small = build_tokenizer(tmp_path / "b", corpus=corpus, vocab_size=300)
    sp = spm.SentencePieceProcessor(model_file=str(small))
    assert sp.vocab_size() <= 300 and sp.piece_to_id(TURN_START) == sp.vocab_size() - 1
    assert sp.decode(sp.encode("apples ☃")) == "apples ☃"


def test_bad_arguments_raise_user_errors(tmp_path: Path) -> None:
    with pytest.raises(XcftError, match="vocab_size"):
        build_tokenizer(tmp_path, vocab_size=100)
    with pytest.raises(XcftError, match="empty"):
        build_tokenizer(tmp_path, corpus=["", "  "])


def test_loads_with_internlm2_tokenizer(built: Path) -> None:
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    tok = InternLM2Tokenizer(vocab_file=str(built))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(TURN_START) == 999
    ids = tok("red", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["red"]
