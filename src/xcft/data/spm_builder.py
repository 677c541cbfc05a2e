"""Build a small InternLM2-style SentencePiece tokenizer on the spot.

Tiny test and demo models need a ``tokenizer.model`` that behaves like the real InternLM2
one (same special tokens, no dummy prefix, byte fallback, the same whitespace and digit
handling) but has a vocabulary of about a thousand pieces, so that the embedding and output
matrices stay small enough to train on a CPU in minutes. The real model file cannot be
shrunk (its pieces are merged from 92k BPE entries), so we train a fresh one with
sentencepiece's own trainer from an in-memory corpus; nothing is downloaded.

The settings copied from the real ``tokenizer.model`` (read with ``sentencepiece_model_pb2``):
``model_type=BPE``, ``normalization_rule_name=identity`` (no NFKC), ``add_dummy_prefix=False``,
``remove_extra_whitespaces=False``, ``split_digits=True``, ``byte_fallback=True``,
``character_coverage=0.9999``, ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece. As in the real
model, the 256 byte pieces follow the three meta pieces and the user-defined pieces
(``[UNUSED_TOKEN_145]`` closes a turn, ``[UNUSED_TOKEN_146]`` opens one) are the last ids.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from xcft.errors import XcftError

logger = logging.getLogger(__name__)

__all__ = ["DEMO_COLOURS", "DEMO_SHAPES", "TURN_END", "TURN_START", "build_tokenizer", "default_corpus"]

TURN_END = "[UNUSED_TOKEN_145]"
TURN_START = "[UNUSED_TOKEN_146]"
#: Kept in this order at the end of the vocabulary, like the real tokenizer (…, 145, 146).
USER_DEFINED = (TURN_END, TURN_START)

#: Words the synthetic demo asks about; each should become a single piece.
DEMO_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink", "brown", "grey")
DEMO_SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")

_SUBJECTS = (
    "the cat",
    "a dog",
    "my friend",
    "the teacher",
    "our team",
    "the model",
    "a small bird",
    "the river",
    "this image",
    "the picture",
    "the student",
    "a farmer",
    "the robot",
    "my sister",
    "the old man",
    "the city",
)
_VERBS = (
    "sees",
    "likes",
    "draws",
    "paints",
    "finds",
    "moves",
    "holds",
    "shows",
    "describes",
    "counts",
    "watches",
    "remembers",
    "answers",
    "compares",
    "follows",
    "builds",
)
_OBJECTS = (
    "a picture",
    "the answer",
    "two apples",
    "the sky",
    "a long road",
    "three books",
    "the window",
    "a bright light",
    "the question",
    "some water",
    "the mountain",
    "a quiet garden",
    "the number",
    "a wooden table",
    "the small box",
    "every detail",
)
_ADVERBS = ("quickly", "slowly", "today", "again", "carefully", "at night", "in the morning", "often", "never", "here")
_QUESTIONS = (
    "What colour is the shape?",
    "What shape is this?",
    "Are the two shapes the same colour?",
    "Are the shapes the same?",
    "What is in the image?",
    "Describe the picture.",
    "How many shapes are there?",
    "Which one is larger?",
    "Where is the shape?",
    "What is the capital of France?",
    "What is two plus three?",
    "Please answer with one word.",
    "Can you help me?",
    "What do you see?",
    "Is it big or small?",
)
_FACTS = (
    "The sun rises in the east.",
    "Water boils at 100 degrees.",
    "Paris is the capital of France.",
    "A week has 7 days.",
    "Two plus three is five.",
    "The sky is blue.",
    "Snow is white.",
    "Grass is green.",
    "Bees make honey.",
    "Fish live in water.",
    "Ice is cold.",
    "Fire is hot.",
    "A triangle has three sides.",
    "A square has four sides.",
    "The moon goes round the earth.",
    "Cats like to sleep.",
)
_WORDS = (
    "yes",
    "no",
    "same",
    "different",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "large",
    "small",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hello",
    "thanks",
    "please",
    "image",
    "shape",
    "colour",
    "color",
    "answer",
    "question",
    "user",
    "assistant",
    "system",
    "model",
    "train",
    "data",
    "sample",
    "because",
    "there",
    "which",
    "where",
    "when",
    "what",
    "why",
    "how",
    "who",
    "this",
    "that",
    "these",
    "those",
    "paris",
    "france",
    "london",
    "water",
    "earth",
    "moon",
    "sun",
    "apple",
    "banana",
    "house",
    "tree",
    "car",
)


def _sentences(rng: random.Random, n: int) -> Iterator[str]:
    """Varied English sentences in the shapes a chat model sees: plain text, questions, numbers."""
    for i in range(n):
        kind = i % 6
        if kind == 0:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ADVERBS)}."
            yield s[0].upper() + s[1:]
        elif kind == 1:
            c, sh = rng.choice(DEMO_COLOURS), rng.choice(DEMO_SHAPES)
            yield rng.choice(
                (
                    f"The {sh} is {c}.",
                    f"There is a {c} {sh} on a grey background.",
                    f"A {c} {sh} and a {rng.choice(DEMO_COLOURS)} {rng.choice(DEMO_SHAPES)}.",
                    f"I see a {c} {sh} near the {rng.choice(('top', 'bottom', 'left', 'right', 'middle'))}.",
                )
            )
        elif kind == 2:
            yield rng.choice(_QUESTIONS)
        elif kind == 3:
            yield rng.choice(_FACTS)
        elif kind == 4:
            a, b = rng.randint(0, 999), rng.randint(0, 99)
            yield f"{a} + {b} = {a + b}, and {rng.randint(1900, 2030)} was the year; item #{rng.randint(1, 64)}: {rng.random():.2f}"
        else:
            yield " ".join(rng.choice(_WORDS + DEMO_COLOURS + DEMO_SHAPES) for _ in range(rng.randint(3, 9)))


def _chat_samples(rng: random.Random, n: int) -> Iterator[str]:
    """Conversations in the exact chat template, so the turn headers and newlines get pieces."""
    for _ in range(n):
        c, sh = rng.choice(DEMO_COLOURS), rng.choice(DEMO_SHAPES)
        q, a = rng.choice(
            (
                ("What colour is the shape?", c),
                ("What shape is this?", sh),
                ("Are the two shapes the same colour?", rng.choice(("yes", "no"))),
                (rng.choice(_QUESTIONS), rng.choice(_FACTS)),
            )
        )
        yield f"{TURN_START}user\n{q}{TURN_END}\n{TURN_START}assistant\n{a}{TURN_END}\n"
        yield f"{TURN_START}system\nYou are a helpful assistant.{TURN_END}\n"


def default_corpus(seed: int = 0) -> list[str]:
    """A few thousand short, varied lines (generated, deterministic) covering the demo vocabulary."""
    rng = random.Random(seed)
    lines = list(_sentences(rng, 2400)) + list(_chat_samples(rng, 400))
    lines += list(DEMO_COLOURS) + list(DEMO_SHAPES) + list(_WORDS)
    lines += [" ".join(w.capitalize() for w in _WORDS[i : i + 6]) for i in range(0, len(_WORDS), 6)]
    lines += ["  indented  text\twith tabs\n and\n\nnewlines  ", "0123456789 ,.;:!?'\"()[]{}<>/\\|-_=+*&^%$@~`"]
    return lines


def _move_user_defined_last(model_bytes: bytes) -> bytes:
    """Reorder pieces so the user-defined ones are the last ids, as in the real InternLM2 model.

    The trainer puts user-defined pieces right after ``<unk> <s> </s>``. Their ids carry no
    meaning for encoding (they are matched as whole strings and scores are kept), so moving them
    only renumbers the other pieces; it keeps byte pieces at 3..258 like the real tokenizer.
    """
    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    pieces = list(proto.pieces)
    user = [p for p in pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]
    order = {p.piece: i for i, p in enumerate(user)}
    # other user-defined pieces first (the real model's [UNUSED_TOKEN_130] comes before 145/146), the turn tokens last
    user.sort(key=lambda p: (1, USER_DEFINED.index(p.piece)) if p.piece in USER_DEFINED else (0, order[p.piece]))
    rest = [p for p in pieces if p.type != pb.ModelProto.SentencePiece.USER_DEFINED]
    copies = [pb.ModelProto.SentencePiece() for _ in rest + user]
    for dst, src in zip(copies, rest + user):
        dst.CopyFrom(src)
    del proto.pieces[:]
    proto.pieces.extend(copies)
    return proto.SerializeToString()


def build_tokenizer(
    out_dir: str | Path,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1000,
    *,
    extra_pieces: Sequence[str] = (),
) -> Path:
    """Train an InternLM2-convention SentencePiece model and write ``out_dir/tokenizer.model``.

    ``corpus`` is any iterable of text lines (default: :func:`default_corpus`). Training is
    single-threaded with no input sampling or shuffling, so the same corpus always gives the
    same file. ``extra_pieces``: more single-piece special tokens (e.g. the reward model's
    ``[UNUSED_TOKEN_130]``), placed before the turn tokens. Returns the path of the written model.
    """
    min_vocab = 3 + 256 + len(USER_DEFINED) + len(extra_pieces) + 1
    if vocab_size < min_vocab:
        raise XcftError(
            f"tokenizer vocab_size {vocab_size} is too small: the byte-fallback pieces and special tokens alone "
            f"need {min_vocab - 1}; use at least {min_vocab}"
        )
    lines = [s for s in (default_corpus() if corpus is None else corpus) if s and s.strip()]
    if not lines:
        raise XcftError("the tokenizer corpus is empty: pass at least a few lines of text (or None for the default)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=0.9999,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=[*extra_pieces, *USER_DEFINED],
            hard_vocab_limit=False,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as exc:  # sentencepiece reports bad settings/corpora as RuntimeError
        raise XcftError(f"could not train a tokenizer with vocab_size {vocab_size}: {exc}") from exc
    path = out / "tokenizer.model"
    path.write_bytes(_move_user_defined_last(buf.getvalue()))
    logger.debug("wrote %s", path)
    return path
