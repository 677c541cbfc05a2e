"""Preference data: pairs of a chosen and a rejected answer to the same prompt.

Two record forms are read (JSON array or JSON Lines, mixtures through ``data.txt`` as for SFT):

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
pair is skipped in training).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xcft.data.dataset import FileData, XComposerDataset, conversation_grids, make_item, pad_batch
from xcft.data.encode import IGNORE_INDEX, EncodedSample, Grid, ImageSpec, TokenizerLike, encode_conversation
from xcft.data.mixture import DataSpec, draw_count, load_spec
from xcft.data.schema import IMAGE_PLACEHOLDER, Conversation, Level, Problem, normalize_sample, raise_first, read_records
from xcft.errors import DataError

logger = logging.getLogger(__name__)

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
            problems.append(
                Problem(
                    name,
                    index,
                    str(record.get("id", index)) if isinstance(record, dict) else None,
                    "not a preference pair (no conversations_a/conversations_b, no chosen/rejected) in a preference data file",
                    PAIR_FORMAT_FIX,
                    line=line,
                )
            )
            continue
        pair, probs = normalize_pair(
            record, file=name, index=index, search_dirs=dirs, line=line, check_images_exist=check_images_exist
        )
        out.append(pair)
        problems.extend(probs)
    return out, problems


def read_any_file(
    path: Path, *, search_dirs: Sequence[Path] | None = None, display: str | None = None
) -> tuple[list[Conversation | PreferencePair | None], list[Problem], bool]:
    """One data file as SFT samples or preference pairs, decided by its first record: (items, problems, is_pairs)."""
    path = Path(path)
    name = display or str(path)
    records, problems = read_records(path, name)
    if is_preference_file(records):
        pairs, probs = read_pair_file(path, search_dirs=search_dirs, display=name, records=records)
        return list(pairs), problems + probs, True
    dirs = list(search_dirs) if search_dirs is not None else [path.parent]
    out: list[Conversation | PreferencePair | None] = []
    for index, (line, record) in enumerate(records):
        conv, probs = normalize_sample(record, file=name, index=index, search_dirs=dirs, line=line)
        out.append(conv)
        problems.extend(probs)
    return out, problems, False


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


def read_pair_data(
    data: str | Path,
    tokenizer: TokenizerLike,
    img_size: int,
    max_length: int,
    given_num: bool = True,
    *,
    hd_num: int | None = None,
) -> list[FileData]:
    """Read, validate and encode every pair of a data.txt or a JSON file (raises DataError on bad data).

    Returns :class:`FileData` whose ``conversations`` are the chosen and ``rejected`` the rejected
    conversations; ``lengths`` are the pair's two sequence lengths added (what one pair costs).
    """
    spec: DataSpec = load_spec(data)
    image_spec = ImageSpec(int(img_size), hd_num)
    grid_cache: dict[Path, Grid] = {}
    files: list[FileData] = []
    for src in spec.sources:
        pairs, problems = read_pair_file(src.path, search_dirs=spec.search_dirs(src), display=src.display)
        raise_first(problems)
        chosen: list[Conversation] = []
        rejected: list[Conversation] = []
        lengths: list[int] = []
        grids: list[list[Grid]] = []
        skipped = 0
        for pair in pairs:
            assert pair is not None, "raise_first stops at a pair with errors"
            pair_grids = conversation_grids(pair.chosen, image_spec, grid_cache) if image_spec.hd else None
            enc = encode_pair(pair, tokenizer, image_spec, max_length, pair_grids)
            why = pair_skip_reason(pair, enc, max_length)
            if why is not None:
                skipped += 1
                logger.warning("%s: %s; skipped", pair.where, why)
                continue
            chosen.append(pair.chosen)
            rejected.append(pair.rejected)
            lengths.append(len(enc))
            if pair_grids is not None:
                grids.append(pair_grids)
        if pairs and not chosen:
            raise DataError(
                f"{src.display}: no pair can be trained (all {skipped} skipped: equal answers, or an answer cut away "
                f"by max_length={max_length}). Fix: raise max_length or fix the pairs (xcft check-data lists them)"
            )
        count = draw_count(len(chosen), src.number, given_num)
        files.append(FileData(src.display, src.path, chosen, lengths, count, skipped, grids, rejected))
    return files


class PreferenceDataset(XComposerDataset):
    """The pairs drawn for the current epoch (same draw rules as SFT data).

    An item holds ``chosen_*`` and ``rejected_*`` sequences (``input_ids``, ``labels``,
    ``image_mask``), the pair's images once (``pixel_values``, 2.5: ``image_grids``) and
    ``pair_key`` [2] = (file, sample) for reference log-probs computed ahead of training.
    """

    def __init__(self, files: Sequence[FileData], *args: Any, end_token: int | None = None, **kwargs: Any) -> None:
        if any(len(f.rejected) != len(f.conversations) for f in files):
            raise ValueError("preference data needs the rejected side of every pair: read it with read_pair_data")
        super().__init__(files, *args, **kwargs)
        #: a token appended to both sequences after their EOS (the reward model's reward token), unscored
        self.end_token = end_token
        #: reference log-probs (chosen, rejected) per file and pair, once computed (precompute_ref_log_probs)
        self.ref_logps: list[np.ndarray] | None = None

    def pair(self, i: int) -> PreferencePair:
        f, j = (int(x) for x in self.draw[i])
        return PreferencePair(self.files[f].conversations[j], self.files[f].rejected[j])

    def encode_pair_at(self, f: int, j: int) -> tuple[PreferencePair, EncodedPair]:
        fd = self.files[f]
        pair = PreferencePair(fd.conversations[j], fd.rejected[j])
        grids = fd.grids[j] if self.image_spec.hd else None
        return pair, encode_pair(pair, self.tokenizer, self.image_spec, self.max_length, grids)

    def item(self, f: int, j: int) -> dict[str, torch.Tensor]:
        """The item of pair ``j`` of file ``f`` (also used to compute reference log-probs)."""
        pair, enc = self.encode_pair_at(f, j)
        chosen = make_item(
            pair.chosen, enc.chosen, self.pad_token_id, self.img_size, fast_jpeg=self.fast_jpeg, hd_num=self.hd_num
        )
        rejected_ids = torch.tensor(enc.rejected.input_ids, dtype=torch.long)
        rejected_mask = rejected_ids < 0
        rejected_ids[rejected_mask] = self.pad_token_id
        if enc.rejected.num_images != enc.chosen.num_images:
            raise DataError(f"{pair.where}: the two answers keep different images after truncation; raise max_length")
        sides = {
            "chosen": (chosen["input_ids"], chosen["labels"], chosen["image_mask"]),
            "rejected": (rejected_ids, torch.tensor(enc.rejected.labels, dtype=torch.long), rejected_mask),
        }
        out: dict[str, torch.Tensor] = {}
        for side, (ids, labels, mask) in sides.items():
            if self.end_token is not None:
                ids, labels, mask = append_token(ids, labels, mask, self.end_token)
            out |= {f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_image_mask": mask}
        out |= {
            "pixel_values": chosen["pixel_values"],
            "num_images": torch.tensor(enc.chosen.num_images),
            "pair_key": torch.tensor([f, j], dtype=torch.long),
        }
        if "image_grids" in chosen:
            out["image_grids"] = chosen["image_grids"]
        if self.ref_logps is not None:
            out["ref_logps"] = torch.from_numpy(self.ref_logps[f][j].copy())
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} drawn pairs")
        f, j = (int(x) for x in self.draw[i])
        return self.item(f, j)

    def keys(self) -> list[tuple[int, int]]:
        """Every (file, pair) of the data once (what reference log-probs are computed for)."""
        return [(f, j) for f, fd in enumerate(self.files) for j in range(len(fd.conversations))]


def append_token(
    ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, token: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One more, unscored text token at the end of a sequence (ids, labels, image mask)."""
    return (
        torch.cat([ids, torch.tensor([token], dtype=ids.dtype)]),
        torch.cat([labels, torch.tensor([IGNORE_INDEX], dtype=labels.dtype)]),
        torch.cat([mask, torch.tensor([False])]),
    )


def pair_image_index(num_images: Sequence[int]) -> torch.Tensor:
    """For rows ordered chosen 0..P-1 then rejected 0..P-1: each image occurrence's index among the pairs' images."""
    offsets = np.concatenate([[0], np.cumsum(num_images)]).astype(int)
    one_side = [o + k for o, n in zip(offsets[:-1].tolist(), num_images) for k in range(int(n))]
    return torch.tensor(one_side + one_side, dtype=torch.long)


@dataclass
class PairCollator:
    """Pairs -> one batch: rows chosen 0..P-1 then rejected 0..P-1, right-padded together.

    Each pair's images appear once in ``pixel_values`` (``image_grids``); ``image_index`` tells the
    model which encoded image each row's image slots take, so an image is encoded once per pair.
    ``ref_logps`` [P, 2] is passed on when the items carry precomputed reference log-probs.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [
            {"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"], "image_mask": f[f"{side}_image_mask"]}
            for side in ("chosen", "rejected")
            for f in features
        ]
        batch = pad_batch(rows, self.pad_token_id)
        counts = [int(f["num_images"]) for f in features]
        pixels = [f["pixel_values"] for f in features if f["pixel_values"].shape[0]]
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        batch["image_counts"] = torch.tensor(counts + counts, dtype=torch.long)
        batch["image_index"] = pair_image_index(counts) if pixels else None
        if any("image_grids" in f for f in features):
            grids = [f["image_grids"] for f in features if f["image_grids"].shape[0]]
            batch["image_grids"] = torch.cat(grids) if grids else None
        batch["pair_key"] = torch.stack([f["pair_key"] for f in features])
        if all("ref_logps" in f for f in features):
            batch["ref_logps"] = torch.stack([f["ref_logps"] for f in features])
        return batch


__all__ = [
    "EncodedPair",
    "PairCollator",
    "PreferenceDataset",
    "PreferencePair",
    "append_token",
    "encode_pair",
    "is_pair_record",
    "is_preference_file",
    "normalize_pair",
    "pair_image_index",
    "pair_skip_reason",
    "read_any_file",
    "read_pair_data",
    "read_pair_file",
]
