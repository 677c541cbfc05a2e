"""Preference pairs: reading both record forms, their problems, and encoding a pair.

Two record forms (JSON array or JSON Lines):

* the official reward-model format: ``{"id", "image", "conversations_a": [...], "conversations_b": [...]}``
  where ``conversations_a`` is the chosen and ``conversations_b`` the rejected conversation; both
  repeat the prompt turns and differ in the last (assistant) turn. Other fields (``turn``,
  ``language``, ``model_a``, ``model_b``) are ignored.
* a compact form: ``{"id", "image", "conversations": [... ending with a user turn], "chosen": "...",
  "rejected": "..."}``.

Each side is normalised by :func:`xcft.data.schema.normalize_sample` (same roles, placeholders and
image rules as SFT data), so a pair is two :class:`Conversation` objects sharing their images.
A pair scores only its final answer: the labels of everything before it are -100
(``encode_conversation(..., last_answer_only=True)``). Reported per pair: prompts that differ, a
last turn that is not an answer, an empty answer, an image placeholder in an answer (errors); a
chosen answer equal to the rejected one, or an answer cut away by ``max_length`` (warnings: the
pair is skipped in training). A file is preference data when its first record is a pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcft.data.encode import EncodedSample, Grid, ImageSpec, TokenizerLike, encode_conversation
from xcft.data.mixture import load_spec
from xcft.data.schema import IMAGE_PLACEHOLDER, Conversation, Level, Problem, normalize_sample, read_records
from xcft.errors import DataError

#: Keys that make a record a preference pair (either form).
OFFICIAL_KEYS = ("conversations_a", "conversations_b")
COMPACT_KEYS = ("chosen", "rejected")
PAIR_FORMAT_FIX = (
    'write {"conversations_a": [...chosen...], "conversations_b": [...rejected...]} or '
    '{"conversations": [... user turn], "chosen": "...", "rejected": "..."}'
)


@dataclass
class PreferencePair:
    """A chosen and a rejected conversation: same turns except the last answer, same images."""

    chosen: Conversation
    rejected: Conversation

    @property
    def id(self) -> str:
        return self.chosen.id

    @property
    def index(self) -> int:
        return self.chosen.index

    @property
    def file(self) -> str:
        return self.chosen.file

    @property
    def images(self) -> list[Path]:
        return self.chosen.images

    @property
    def where(self) -> str:
        return self.chosen.where


def is_pair_record(record: Any) -> bool:
    """True for a record in either preference form."""
    return isinstance(record, dict) and any(k in record for k in (*OFFICIAL_KEYS, *COMPACT_KEYS))


def is_preference_file(records: Sequence[tuple[int | None, Any]]) -> bool:
    """A file is preference data when its first record is a pair (as the official loader decides per file)."""
    return bool(records) and is_pair_record(records[0][1])


def _side(record: dict[str, Any], turns: Any) -> dict[str, Any]:
    """One side of a pair as an SFT record (the pair's id and images, the side's turns)."""
    out = {k: v for k, v in record.items() if k in ("id", "image", "images")}
    out["conversations"] = turns
    return out


def normalize_pair(
    record: Any,
    *,
    file: str,
    index: int,
    search_dirs: Sequence[Path],
    line: int | None = None,
    check_images_exist: bool = True,
) -> tuple[PreferencePair | None, list[Problem]]:
    """Validate one preference record; the pair (None when it has errors) and its problems."""
    if not isinstance(record, dict):
        return None, [Problem(file, index, None, "sample is not a JSON object", PAIR_FORMAT_FIX, line=line)]
    sid = str(record.get("id", index))
    problems: list[Problem] = []

    def err(msg: str, fix: str, level: Level = "error") -> None:
        problems.append(Problem(file, index, sid, msg, fix, level, line))

    official = any(k in record for k in OFFICIAL_KEYS)
    if official:
        missing = [k for k in OFFICIAL_KEYS if k not in record]
        if missing:
            err(
                f'"{missing[0]}" is missing (the pair needs both conversations_a, chosen, and conversations_b, rejected)',
                PAIR_FORMAT_FIX,
            )
            return None, problems
        sides = {"conversations_a": record["conversations_a"], "conversations_b": record["conversations_b"]}
    else:
        missing = [k for k in ("conversations", *COMPACT_KEYS) if k not in record]
        if missing:
            err(f'"{missing[0]}" is missing (a compact pair needs conversations, chosen and rejected)', PAIR_FORMAT_FIX)
            return None, problems
        prompt = record["conversations"]
        for key in COMPACT_KEYS:
            if not isinstance(record[key], str):
                err(f'"{key}" must be the answer text (a string)', f'write "{key}": "the answer"')
        if problems:
            return None, problems
        if not isinstance(prompt, list) or not prompt:
            err('"conversations" must be a non-empty list of turns ending with the user turn', PAIR_FORMAT_FIX)
            return None, problems
        last = prompt[-1]
        if isinstance(last, dict) and str(last.get("from", last.get("role", ""))).strip().lower() not in ("user", "human"):
            err(
                '"conversations" of a compact pair must end with the user turn (the answers are "chosen" and "rejected")',
                "drop the final answer from conversations, or write the pair as conversations_a/conversations_b",
            )
            return None, problems
        sides = {key: [*prompt, {"from": "assistant", "value": record[key]}] for key in COMPACT_KEYS}

    convs: dict[str, Conversation] = {}
    seen: list[str] = []
    for key, turns in sides.items():
        conv, probs = normalize_sample(
            _side(record, turns),
            file=file,
            index=index,
            search_dirs=search_dirs,
            line=line,
            check_images_exist=check_images_exist,
        )
        for p in probs:
            if p.message in seen:  # the same finding on both sides (an image, the id): once
                continue
            seen.append(p.message)
            msg = p.message if not official else p.message.replace('"conversations"', f'"{key}"')
            if msg.startswith("turn") or msg.startswith("the conversation"):
                msg = f"{key}: {msg}"
            problems.append(Problem(p.file, p.index, p.id, msg, p.fix, p.level, p.line))
        if conv is not None:
            convs[key] = conv
    if len(convs) < 2:
        return None, problems
    chosen, rejected = convs.values()
    a_name, b_name = sides.keys()
    for name, conv in ((a_name, chosen), (b_name, rejected)):
        last = conv.messages[-1]
        if last.role != "assistant":
            err(
                f"{name}: the last turn is from the {last.role}; a pair ends with the answer",
                "end each conversation with the assistant answer",
            )
        elif not last.text:
            err(f"{name}: the answer is empty", "give the answer text, or drop the pair")
        elif IMAGE_PLACEHOLDER in last.text:
            err(
                f"{name}: the answer holds {IMAGE_PLACEHOLDER}; the images belong to the shared prompt",
                f"move {IMAGE_PLACEHOLDER} into a user turn",
            )
    if any(p.level == "error" for p in problems):
        return None, problems
    prompt_a, prompt_b = chosen.messages[:-1], rejected.messages[:-1]
    if prompt_a != prompt_b:
        k = next((i for i, (x, y) in enumerate(zip(prompt_a, prompt_b)) if x != y), min(len(prompt_a), len(prompt_b)))
        err(
            f"the prompts of {a_name} and {b_name} differ at turn {k} (a pair compares two answers to the same prompt)",
            "repeat the same turns before the last answer in both conversations",
        )
        return None, problems
    if chosen.messages[-1].text == rejected.messages[-1].text:
        err(
            "the chosen and the rejected answers are equal: the pair teaches nothing and is skipped in training",
            "drop the pair or fix one of the answers",
            level="warning",
        )
    return PreferencePair(chosen, rejected), problems


def is_pair_data(data: str | Path) -> bool:
    """Whether a data.txt (or one JSON file) holds preference pairs; DataError when it mixes pair and SFT files."""
    spec = load_spec(data)
    kinds = {is_preference_file(read_records(src.path, src.display)[0]) for src in spec.sources}
    if len(kinds) > 1:
        raise DataError(f"{data}: mixes preference pair files and conversation files. Fix: use them separately")
    return kinds == {True}


def not_a_pair(file: str, index: int, record: Any, line: int | None = None) -> Problem:
    """The problem of a record that is not a pair where pairs are expected."""
    sid = str(record.get("id", index)) if isinstance(record, dict) else None
    return Problem(
        file,
        index,
        sid,
        "not a preference pair (no conversations_a/conversations_b, no chosen/rejected) in preference data",
        PAIR_FORMAT_FIX,
        line=line,
    )


def read_pair_file(
    path: Path,
    *,
    search_dirs: Sequence[Path] | None = None,
    display: str | None = None,
    check_images_exist: bool = True,
    records: Sequence[tuple[int | None, Any]] | None = None,
) -> tuple[list[PreferencePair | None], list[Problem]]:
    """Read and normalise every pair of one file (None for pairs with errors, so indices stay the file's)."""
    path = Path(path)
    name = display or str(path)
    dirs = list(search_dirs) if search_dirs is not None else [path.parent]
    problems: list[Problem] = []
    if records is None:
        recs, problems = read_records(path, name)
    else:
        recs = list(records)
    out: list[PreferencePair | None] = []
    for index, (line, record) in enumerate(recs):
        if not is_pair_record(record):
            out.append(None)
            problems.append(not_a_pair(name, index, record, line))
            continue
        pair, probs = normalize_pair(
            record, file=name, index=index, search_dirs=dirs, line=line, check_images_exist=check_images_exist
        )
        out.append(pair)
        problems.extend(probs)
    return out, problems


@dataclass
class EncodedPair:
    chosen: EncodedSample
    rejected: EncodedSample

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def num_supervised(self) -> int:
        return self.chosen.num_supervised + self.rejected.num_supervised

    @property
    def scorable(self) -> bool:
        """Both answers keep at least one scored token."""
        return self.chosen.num_supervised > 0 and self.rejected.num_supervised > 0


def encode_pair(
    pair: PreferencePair, tokenizer: TokenizerLike, spec: ImageSpec, max_length: int, grids: Sequence[Grid] | None = None
) -> EncodedPair:
    """Both sides, each scoring only its final answer (its text, closing turn token and EOS)."""
    return EncodedPair(
        encode_conversation(pair.chosen, tokenizer, spec, max_length, grids, last_answer_only=True),
        encode_conversation(pair.rejected, tokenizer, spec, max_length, grids, last_answer_only=True),
    )


def pair_skip_reason(pair: PreferencePair, enc: EncodedPair, max_length: int) -> str | None:
    """Why a valid pair is not trained on (None: it is)."""
    if not enc.scorable:
        side = "chosen" if enc.chosen.num_supervised == 0 else "rejected"
        full = (enc.chosen if side == "chosen" else enc.rejected).untruncated_length
        return f"the {side} answer is empty after truncation to max_length={max_length} (full length {full})"
    if pair.chosen.messages[-1].text == pair.rejected.messages[-1].text:
        return "the chosen and the rejected answers are equal"
    return None


__all__ = [
    "COMPACT_KEYS",
    "OFFICIAL_KEYS",
    "EncodedPair",
    "PreferencePair",
    "encode_pair",
    "is_pair_data",
    "is_pair_record",
    "is_preference_file",
    "normalize_pair",
    "not_a_pair",
    "pair_skip_reason",
    "read_pair_file",
]
