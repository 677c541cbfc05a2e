"""Checking a data set against a model's tokenizer and sizes, and finding one sample.

:func:`run_check` is the read pass training uses (:mod:`xcft.data.read_pass`) with every image
decoded once, turned into a per-file report; every problem found is kept, so a user with 40 broken
samples sees 40 problems. ``xcft check-data``, ``xcft inspect`` and the web page present the results.

For a 2.5 model each image's crop grid (and so its token count) at the chosen ``hd_num`` comes from
the size of that one decode; sizes and family are settled by :mod:`xcft.data.sizes`.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xcft.data.cache_options import CacheOptions
from xcft.data.encode import IGNORE_INDEX, IMAGE_SLOT, EncodedSample, Grid, ImageSpec, encode_conversation
from xcft.data.mixture import DataSpec, resolve_data
from xcft.data.pairs import EncodedPair, PreferencePair, encode_pair
from xcft.data.read_pass import FileSamples, ProgressFn, conversation_grids, read_pass, source_table
from xcft.data.schema import Conversation, Problem
from xcft.data.sizes import folder_sizes, resolve_sizes
from xcft.data.table import SampleTable, SampleView
from xcft.errors import XcftError
from xcft.model.configuration_xcomposer2 import FAMILY_2_0
from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- model settings


@dataclass
class Settings:
    tokenizer: Any
    img_size: int
    max_length: int
    notes: list[str] = field(default_factory=list)
    family: str = FAMILY_2_0
    hd_num: int | None = None  # 2.5: crop budget per image

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(self.img_size, self.hd_num)


def load_settings(
    model_dir: str | os.PathLike[str], img_size: int | None, max_length: int | None, hd_num: int | None = None
) -> Settings:
    """Tokenizer and sizes of a model folder, settled with the options by :func:`xcft.data.sizes.resolve_sizes`.

    config.json is read as plain JSON and the family from the weight files' headers: no model is loaded.
    """
    d = Path(model_dir)
    sizes = resolve_sizes(folder_sizes(d), img_size, max_length, hd_num)
    tok_path = d / "tokenizer.model"
    if not tok_path.is_file():
        raise XcftError(
            f"no tokenizer.model in {d}; --model must be a checkpoint folder that holds the InternLM2 tokenizer.model"
        )
    try:
        tokenizer = InternLM2Tokenizer.from_model_file(tok_path)
        tokenizer.turn_start_id, tokenizer.turn_end_id  # noqa: B018 - validates the model
    except Exception as exc:
        raise XcftError(f"{tok_path}: not a usable InternLM2 SentencePiece model ({exc})") from exc
    return Settings(tokenizer, sizes.img_size, sizes.max_length, list(sizes.notes), sizes.family, sizes.hd_num)


# --------------------------------------------------------------------------- reading everything


@dataclass
class FileReport:
    display: str
    path: str
    number: float | None
    samples: int = 0
    valid: int = 0  # samples without error
    usable: int = 0  # valid and with at least one supervised token
    drawn_per_epoch: int = 0
    images: int = 0
    lengths: list[int] = field(default_factory=list)
    supervised: int = 0
    truncated: int = 0  # samples longer than max_length (cut)
    skipped: int = 0
    image_tokens: list[int] = field(default_factory=list)  # slots of each image of the usable samples

    @classmethod
    def from_samples(cls, fs: FileSamples) -> FileReport:
        """The counts of one file of the read pass (from its columns; no record is read)."""
        t = fs.table
        encoded = np.flatnonzero(t.encoded)
        usable = fs.usable_index
        img_off = np.asarray(t.img_off)
        per_sample_images = img_off[1:] - img_off[:-1]
        usable_mask = np.zeros(len(t), dtype=bool)
        usable_mask[usable] = True
        image_of_usable = np.repeat(usable_mask, per_sample_images)  # per image: its sample is usable
        usable_slots = np.asarray(t.slots)[image_of_usable]
        return cls(
            fs.source.display,
            str(fs.source.path),
            fs.source.number,
            samples=len(t),
            valid=len(encoded),
            usable=len(usable),
            drawn_per_epoch=fs.draw_count,
            images=int(per_sample_images[encoded].sum()),
            lengths=np.asarray(t.length)[usable].tolist(),
            supervised=int(np.asarray(t.supervised, dtype=np.int64)[usable].sum()),
            truncated=int(np.count_nonzero(np.asarray(t.truncated)[encoded])),
            skipped=fs.skipped,
            image_tokens=usable_slots.tolist(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.display,
            "path": self.path,
            "number": self.number,
            "samples": self.samples,
            "valid": self.valid,
            "usable": self.usable,
            "drawn_per_epoch": self.drawn_per_epoch,
            "images": self.images,
            "tokens": length_stats(self.lengths),
            "supervised_tokens": self.supervised,
            "truncated": self.truncated,
            "over_max_length": self.truncated,
            "image_tokens": length_stats(self.image_tokens),
            "skipped_no_supervised_token": self.skipped,
        }


def length_stats(lengths: list[int]) -> dict[str, float | int | None]:
    if not lengths:
        return {"min": None, "median": None, "max": None}
    med = statistics.median(lengths)
    return {"min": min(lengths), "median": int(med) if float(med).is_integer() else med, "max": max(lengths)}


@dataclass
class CheckResult:
    spec: DataSpec | None
    files: list[FileReport]
    problems: list[Problem]
    settings: Settings
    # every sample, per file in data.txt order (None where a sample could not be normalised), read
    # from its record on access, so that a caller can show any sample without a new pass
    conversations: list[Sequence[Conversation | None]] = field(default_factory=list)
    # preference data: every pair, per file (empty for SFT files), read on access; ``conversations``
    # then holds each pair's chosen conversation
    pairs: list[Sequence[PreferencePair | None]] = field(default_factory=list)
    tables: list[SampleTable] = field(default_factory=list)  # each file's columns (ids, lengths ...)

    @property
    def is_preference(self) -> bool:
        return any(len(p) for p in self.pairs)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors and sum(f.drawn_per_epoch for f in self.files) > 0

    @property
    def total(self) -> FileReport:
        """Every file's counts added up (display name ``total``)."""
        total = FileReport("total", "", None)
        for f in self.files:
            total.samples += f.samples
            total.valid += f.valid
            total.usable += f.usable
            total.drawn_per_epoch += f.drawn_per_epoch
            total.images += f.images
            total.lengths += f.lengths
            total.supervised += f.supervised
            total.truncated += f.truncated
            total.skipped += f.skipped
            total.image_tokens += f.image_tokens
        return total


def run_check(
    data: str | os.PathLike[str],
    settings: Settings,
    given_num: bool = True,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    cache: CacheOptions | None = None,
) -> CheckResult:
    """The read pass (:func:`~xcft.data.read_pass.read_pass`) with every image decoded; a report per file.

    ``progress`` is called now and then with the phase and its counts (for a progress bar).
    """
    found = read_pass(
        data,
        settings.tokenizer,
        settings.image_spec,
        settings.max_length,
        given_num,
        decode_images=True,
        workers=workers,
        progress=progress,
        cache=cache,
    )
    files = [FileReport.from_samples(fs) for fs in found.files]
    conversations: list[Sequence[Conversation | None]] = [SampleView(fs.table, np.arange(len(fs.table))) for fs in found.files]
    pairs: list[Sequence[PreferencePair | None]] = [
        SampleView(fs.table, np.arange(len(fs.table)), kind="pair") if fs.pairs else [] for fs in found.files
    ]
    return CheckResult(found.spec, files, found.problems, settings, conversations, pairs, [fs.table for fs in found.files])


# --------------------------------------------------------------------------- one sample


def find_sample(
    data: str, settings: Settings, index: int | None, sample_id: str | None, cache: CacheOptions | None = None
) -> tuple[Conversation | PreferencePair | None, list[Problem], str]:
    """One sample by overall index (data.txt order) or id, read through the preprocessing cache; its problems; where it is."""
    spec, problems = resolve_data(data)
    errs = [p for p in problems if p.level == "error"]
    if spec is None or errs:
        return None, errs, ""
    offset = 0
    for src in spec.sources:
        table = source_table(spec, src, settings.tokenizer, settings.image_spec, settings.max_length, cache=cache)
        n = len(table)
        if not n:
            file_errs = [p for p in table.problems if p.level == "error" and p.index is None]
            if file_errs and index is not None and index >= offset:
                # the wanted sample may be in this unreadable file
                return None, file_errs, ""
        if index is not None:
            k = index - offset if offset <= index < offset + n else None
        else:
            hits = table.find_id(str(sample_id))
            k = int(hits[0]) if len(hits) else None
        if k is not None:
            sample = table.pair(k) if table.pairs else table.conversation(k)
            where = f"{src.display}: sample {k} (overall index {offset + k})"
            return sample, [p for p in table.problems if p.index == k], where
        offset += n
    what = f"index {index} (there are {offset} samples)" if index is not None else f"id {sample_id!r}"
    raise XcftError(f"{data}: no sample with {what}; check-data lists the samples per file")


@dataclass(frozen=True)
class Run:
    """A stretch of an encoded sample: an image's slots, or text whose tokens are all trained or all not."""

    start: int
    end: int
    image: int = 0  # 1-based image number for an image run, else 0
    grid: Grid | None = None  # the image's crop grid (2.5)
    text: str = ""
    trained: bool = False


def sample_runs(enc: EncodedSample, tokenizer: Any) -> list[Run]:
    """The sample as runs (images, and text decoded together where its trained-ness does not change)."""
    runs: list[Run] = []
    ids, labels = enc.input_ids, enc.labels
    i, image_no = 0, 0
    while i < len(ids):
        j = i
        if ids[i] == IMAGE_SLOT:
            while j < len(ids) and ids[j] == IMAGE_SLOT:
                j += 1
            image_no += 1
            grid = enc.image_grids[image_no - 1] if image_no <= len(enc.image_grids) else None
            runs.append(Run(i, j, image=image_no, grid=grid))
        else:
            trained = labels[i] != IGNORE_INDEX
            while j < len(ids) and ids[j] != IMAGE_SLOT and (labels[j] != IGNORE_INDEX) == trained:
                j += 1
            runs.append(Run(i, j, text=tokenizer.decode(ids[i:j], skip_special_tokens=False), trained=trained))
        i = j
    return runs


def render_sample(enc: EncodedSample, tokenizer: Any, color: bool) -> str:
    """Decoded tokens with supervised spans marked («…» or ANSI) and image slots summarised."""
    on, off = ("\x1b[1;32m", "\x1b[0m") if color else ("«", "»")
    out: list[str] = []
    for run in sample_runs(enc, tokenizer):
        if run.image:
            crops = f"{run.grid[0]}×{run.grid[1]} crops, " if run.grid is not None else ""
            out.append(f"<image {run.image}: {crops}{run.end - run.start} slots>")
        else:
            out.append(f"{on}{run.text}{off}" if run.trained else run.text)
    return "".join(out)


def encode_pair_for(pair: PreferencePair, settings: Settings) -> EncodedPair:
    """Encode one preference pair as training would (each side scores only its final answer)."""
    spec = settings.image_spec
    grids = conversation_grids(pair.chosen, spec) if spec.hd else None
    return encode_pair(pair, settings.tokenizer, spec, settings.max_length, grids)


def encode_for(conv: Conversation, settings: Settings) -> EncodedSample:
    """Encode one sample as training would with these settings (2.5: grids from the image headers)."""
    spec = settings.image_spec
    grids = conversation_grids(conv, spec) if spec.hd else None
    return encode_conversation(conv, settings.tokenizer, spec, settings.max_length, grids)


__all__ = [
    "CheckResult",
    "FileReport",
    "ProgressFn",
    "Run",
    "Settings",
    "encode_for",
    "encode_pair_for",
    "find_sample",
    "length_stats",
    "load_settings",
    "render_sample",
    "run_check",
    "sample_runs",
]
