"""Checking a data set against a model's tokenizer and sizes, and finding one sample.

:func:`run_check` reads every file and decodes every image once (images in a thread pool), encodes
every valid sample, and collects a per-file report and every problem found, so a user with 40 broken
samples sees 40 problems. ``xcft check-data``, ``xcft inspect`` and the web page present the results.

For a 2.5 model each image's crop grid (and so its token count) at the chosen ``hd_num`` comes from
the size of that one decode; sizes and family are settled by :mod:`xcft.data.sizes`.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcft.data.dataset import conversation_grids
from xcft.data.encode import IGNORE_INDEX, IMAGE_SLOT, EncodedSample, Grid, ImageSpec, encode_conversation
from xcft.data.images import IMAGE_FIX, decode_with_size
from xcft.data.mixture import DataSpec, draw_count, resolve_data
from xcft.data.preference import EncodedPair, PreferencePair, encode_pair, pair_skip_reason, read_any_file
from xcft.data.schema import Conversation, Problem
from xcft.data.sizes import folder_sizes, resolve_sizes
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


#: ``progress(phase, done, total)``: phase is "reading", "images" or "encoding".
ProgressFn = Callable[[str, int, int], None]
PROGRESS_EVERY = 1000


@dataclass
class CheckResult:
    spec: DataSpec | None
    files: list[FileReport]
    problems: list[Problem]
    settings: Settings
    # every sample read, per file in data.txt order (None where a sample could not be normalised),
    # kept so that a caller can show any sample without reading the files again
    conversations: list[list[Conversation | None]] = field(default_factory=list)
    # preference data: every pair read, per file (empty lists for SFT files); ``conversations``
    # then holds each pair's chosen conversation
    pairs: list[list[PreferencePair | None]] = field(default_factory=list)

    @property
    def is_preference(self) -> bool:
        return any(self.pairs)

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
) -> CheckResult:
    """Read, decode and encode everything once; collect every problem.

    ``progress`` is called now and then with the phase and its counts (for a progress bar).
    """
    report_progress = progress or (lambda phase, done, total: None)
    spec, problems = resolve_data(data)
    files: list[FileReport] = []
    if spec is None:
        return CheckResult(None, files, problems, settings)
    per_file: list[list[Conversation | PreferencePair | None]] = []
    pair_files: list[str] = []
    for k, src in enumerate(spec.sources):
        report_progress("reading", k, len(spec.sources))
        convs, probs, is_pairs = read_any_file(src.path, search_dirs=spec.search_dirs(src), display=src.display)
        problems.extend(probs)
        per_file.append(convs)
        files.append(FileReport(src.display, str(src.path), src.number, samples=len(convs)))
        if is_pairs:
            pair_files.append(src.display)
    if pair_files and len(pair_files) < len(spec.sources):
        sft = next(f.display for f in files if f.display not in pair_files)
        problems.append(
            Problem(
                str(data),
                None,
                None,
                f"mixes preference pairs ({pair_files[0]}) and SFT conversations ({sft})",
                "give SFT data to --stage sft and pairs to --stage dpo, in separate data.txt files",
            )
        )

    # decode every distinct image once, in parallel
    paths = sorted({p for convs in per_file for c in convs if c is not None for p in c.images})
    n_workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        decoded: dict[Path, tuple[str | None, tuple[int, int]]] = {}
        for k, (path, result) in enumerate(zip(paths, pool.map(decode_with_size, paths))):
            decoded[path] = result
            if k % PROGRESS_EVERY == 0:
                report_progress("images", k, len(paths))
    decode_errors = {p: why for p, (why, _) in decoded.items()}
    image_spec = settings.image_spec
    grids: dict[Path, Grid] = {}
    if image_spec.hd:
        for p, (why, size) in decoded.items():
            if why is None:
                try:
                    grids[p] = image_spec.grid(*size)
                except ValueError as exc:  # e.g. too elongated for the HD transform
                    decode_errors[p] = f"cannot be used ({exc})"

    n_samples = sum(len(convs) for convs in per_file)
    done = 0
    for src, report, convs in zip(spec.sources, files, per_file):
        for conv in convs:
            done += 1
            if done % PROGRESS_EVERY == 0:
                report_progress("encoding", done, n_samples)
            if conv is None:
                continue
            bad = [(p, decode_errors[p]) for p in conv.images if decode_errors.get(p)]
            for p, why in bad:
                problems.append(Problem(src.display, conv.index, conv.id, f"image {p} {why}", IMAGE_FIX))
            if bad:
                continue
            report.valid += 1
            report.images += len(conv.images)
            conv_grids = [grids[p] for p in conv.images] if image_spec.hd else None
            if isinstance(conv, PreferencePair):
                _check_pair(conv, conv_grids, settings, report, problems)
                continue
            enc = encode_conversation(conv, settings.tokenizer, image_spec, settings.max_length, conv_grids)
            if enc.truncated:
                report.truncated += 1
            n_supervised = enc.num_supervised  # a count over every label: once per sample
            if n_supervised == 0:
                report.skipped += 1
                problems.append(
                    Problem(
                        src.display,
                        conv.index,
                        conv.id,
                        f"no supervised token left after truncation to max_length={settings.max_length} (full length {enc.untruncated_length}); the sample is skipped in training",
                        "shorten the user turns or images before the first answer, or raise --max-length",
                        level="warning",
                    )
                )
                continue
            report.usable += 1
            report.lengths.append(len(enc))
            report.image_tokens += (
                [image_spec.slots(g) for g in conv_grids] if conv_grids is not None else [image_spec.slots()] * len(conv.images)
            )
            report.supervised += n_supervised
        report.drawn_per_epoch = draw_count(report.usable, src.number, given_num)
        if report.valid and not report.usable:
            problems.append(
                Problem(
                    src.display,
                    None,
                    None,
                    f"no sample of this file keeps a supervised token within max_length={settings.max_length}",
                    "raise --max-length (images take their slots in full), or shorten the samples",
                    line=src.line,
                )
            )
        if report.usable and report.drawn_per_epoch == 0:
            problems.append(
                Problem(
                    src.display,
                    None,
                    None,
                    f"the number {src.number} draws no sample per epoch",
                    "raise the number in data.txt (given_num: thousands of samples, 0.001 = 1)",
                    level="warning",
                    line=src.line,
                )
            )
    pair_lists = [
        [c if isinstance(c, PreferencePair) else None for c in convs] if convs and name in pair_files else []
        for convs, name in zip(per_file, (f.display for f in files))
    ]
    chosen = [[c.chosen if isinstance(c, PreferencePair) else c for c in convs] for convs in per_file]
    return CheckResult(spec, files, problems, settings, chosen, pair_lists)


def _check_pair(
    pair: PreferencePair, grids: list[Grid] | None, settings: Settings, report: FileReport, problems: list[Problem]
) -> None:
    """A valid pair's share of the report (both sequences' lengths and scored tokens), or why training skips it."""
    enc = encode_pair(pair, settings.tokenizer, settings.image_spec, settings.max_length, grids)
    if enc.truncated:
        report.truncated += 1
    why = pair_skip_reason(pair, enc, settings.max_length)
    if why is not None:
        report.skipped += 1
        if enc.scorable:  # equal answers: reported when the pair was read
            return
        problems.append(
            Problem(
                pair.file,
                pair.index,
                pair.id,
                f"{why}; the pair is skipped in training",
                "shorten the prompt or its images, or raise --max-length",
                level="warning",
            )
        )
        return
    report.usable += 1
    report.lengths += [len(enc.chosen), len(enc.rejected)]
    report.image_tokens += (
        [settings.image_spec.slots(g) for g in grids] if grids is not None else [settings.image_spec.slots()] * len(pair.images)
    )
    report.supervised += enc.num_supervised


# --------------------------------------------------------------------------- one sample


def find_sample(
    data: str, settings: Settings, index: int | None, sample_id: str | None
) -> tuple[Conversation | PreferencePair | None, list[Problem], str]:
    spec, problems = resolve_data(data)
    errs = [p for p in problems if p.level == "error"]
    if spec is None or errs:
        return None, errs, ""
    offset = 0
    for src in spec.sources:
        convs, probs, _ = read_any_file(src.path, search_dirs=spec.search_dirs(src), display=src.display)
        if not convs:
            file_errs = [p for p in probs if p.level == "error" and p.index is None]
            if file_errs and index is not None and index >= offset:
                # the wanted sample may be in this unreadable file
                return None, file_errs, ""
        for k, conv in enumerate(convs):
            g = offset + k
            hit = (index is not None and g == index) or (
                sample_id is not None and (conv.id if conv is not None else _raw_id(probs, k)) == sample_id
            )
            if hit:
                mine = [p for p in probs if p.index == k]
                where = f"{src.display}: sample {k} (overall index {g})"
                return conv, mine, where
        offset += len(convs)
    what = f"index {index} (there are {offset} samples)" if index is not None else f"id {sample_id!r}"
    raise XcftError(f"{data}: no sample with {what}; check-data lists the samples per file")


def _raw_id(problems: list[Problem], k: int) -> str | None:
    for p in problems:
        if p.index == k:
            return p.id
    return None


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
