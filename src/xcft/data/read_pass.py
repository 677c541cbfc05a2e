"""One pass over a data set: every sample read, validated, encoded and counted, once.

:func:`read_pass` is the reading that training (:func:`xcft.data.dataset.read_data`) and
``check-data`` (:func:`xcft.data.check.run_check`) share: the files of a data.txt (or one JSON
file), each sample normalised, its images checked, encoded as training encodes it, and the
per-file accounting (usable samples, skips, per-epoch draw). It returns plain per-sample records
and every problem found; what to do with them (stop at the first error, or list them all) is the
caller's.

Images: ``decode_images`` decodes every distinct image once (thread pool; check-data), otherwise
only what the encoding needs is read: a 2.5 image's size from its file header (for its crop grid),
nothing for 2.0 (training decodes images in ``__getitem__``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from xcft.data.encode import Grid, ImageSpec, TokenizerLike, encode_conversation
from xcft.data.images import IMAGE_FIX, decode_with_size
from xcft.data.mixture import DataSpec, Source, draw_count, resolve_data
from xcft.data.pairs import PreferencePair, encode_pair, pair_skip_reason, read_any_file
from xcft.data.schema import Conversation, Problem
from xcft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DataPass",
    "FileSamples",
    "ProgressFn",
    "SampleRecord",
    "conversation_grids",
    "image_size",
    "read_pass",
]

#: ``progress(phase, done, total)``: phase is "reading", "images" or "encoding".
ProgressFn = Callable[[str, int, int], None]
PROGRESS_EVERY = 1000
HEADER_FIX = "replace or re-save the file"
GRID_FIX = "crop or pad the image"


@dataclass
class SampleRecord:
    """One sample as the pass found it. ``conversation`` None: it could not be normalised (a problem says why).

    ``encoded`` False: not encoded (no conversation, or an image that cannot be used). ``supervised``
    0 for an encoded sample: nothing left to train after truncation (skipped in training).
    """

    index: int
    conversation: Conversation | None  # a preference pair's chosen conversation
    encoded: bool = False
    length: int = 0  # tokens after truncation, image slots included
    untruncated_length: int = 0
    supervised: int = 0
    truncated: bool = False
    grids: list[Grid] | None = None  # 2.5: each image's crop grid
    image_tokens: list[int] = field(default_factory=list)  # slots of each of its images (usable samples)
    pair: PreferencePair | None = None  # preference data: the pair (length and supervised count both sides)

    @property
    def usable(self) -> bool:
        return self.encoded and self.supervised > 0


@dataclass
class FileSamples:
    """Every sample of one data file and the file's per-epoch draw (from its usable samples)."""

    source: Source
    records: list[SampleRecord]
    draw_count: int = 0
    pairs: bool = False  # a preference data file (its first record is a pair)

    @property
    def usable(self) -> list[SampleRecord]:
        return [r for r in self.records if r.usable]

    @property
    def skipped(self) -> int:
        """Samples encoded but left with no supervised token (training skips them)."""
        return sum(1 for r in self.records if r.encoded and not r.supervised)


@dataclass
class DataPass:
    """The result of :func:`read_pass`: the files (None spec: the data argument itself is unusable) and every problem."""

    spec: DataSpec | None
    files: list[FileSamples]
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def is_preference(self) -> bool:
        """The data holds preference pairs (every file, or a problem says it mixes them)."""
        return any(fs.pairs for fs in self.files)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image file's header (PIL reads no pixel data here)."""
    with Image.open(path) as img:
        return img.size


def _header_size(path: Path) -> tuple[str | None, tuple[int, int]]:
    """Like :func:`decode_with_size`, from the header only (the reason names the fix)."""
    try:
        return None, image_size(path)
    except Exception as exc:  # PIL raises many types for broken headers
        return f"cannot be read ({exc})", (0, 0)


def _image_grid(path: Path, spec: ImageSpec, size: tuple[int, int]) -> tuple[str | None, Grid | None]:
    try:
        return None, spec.grid(*size)
    except ValueError as exc:  # e.g. an aspect ratio the HD transform cannot handle
        return f"cannot be used: {exc}", None


def conversation_grids(conv: Conversation, spec: ImageSpec) -> list[Grid]:
    """2.5: the crop grid of each image of one sample, from the file headers (DataError when one cannot be used)."""
    grids: list[Grid] = []
    for path in conv.images:
        why, size = _header_size(path)
        if why is not None:
            raise DataError(f"{conv.where}: image {path} {why}. Fix: {HEADER_FIX}")
        why, grid = _image_grid(path, spec, size)
        if grid is None:
            raise DataError(f"{conv.where}: image {path} {why}. Fix: {GRID_FIX}")
        grids.append(grid)
    return grids


def _check_images(
    paths: list[Path], spec: ImageSpec, decode: bool, workers: int | None, progress: ProgressFn
) -> tuple[dict[Path, tuple[str, str]], dict[Path, Grid]]:
    """({path: (reason, fix)} of unusable images, {path: crop grid} for 2.5)."""
    bad: dict[Path, tuple[str, str]] = {}
    grids: dict[Path, Grid] = {}
    if not decode and not spec.hd:
        return bad, grids
    measure = decode_with_size if decode else _header_size
    n_workers = max(1, workers or os.cpu_count() or 1) if decode else 1
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for k, (path, (why, size)) in enumerate(zip(paths, pool.map(measure, paths))):
            if k % PROGRESS_EVERY == 0:
                progress("images", k, len(paths))
            if why is not None:
                bad[path] = (why, IMAGE_FIX if decode else HEADER_FIX)
                continue
            if spec.hd:
                why, grid = _image_grid(path, spec, size)
                if grid is None:
                    bad[path] = (why or "cannot be used", GRID_FIX)
                else:
                    grids[path] = grid
    return bad, grids


def read_pass(
    data: str | os.PathLike[str],
    tokenizer: TokenizerLike,
    image_spec: ImageSpec,
    max_length: int,
    given_num: bool = True,
    *,
    decode_images: bool = False,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> DataPass:
    """Read, validate, encode and count every sample of ``data`` once; collect every problem (see the module docstring)."""
    report = progress or (lambda phase, done, total: None)
    spec, problems = resolve_data(data)
    if spec is None:
        return DataPass(None, [], problems)
    per_file: list[list[Conversation | PreferencePair | None]] = []
    pair_files: list[bool] = []
    for k, src in enumerate(spec.sources):
        report("reading", k, len(spec.sources))
        items, probs, is_pairs = read_any_file(src.path, search_dirs=spec.search_dirs(src), display=src.display)
        problems.extend(probs)
        per_file.append(items)
        pair_files.append(is_pairs)
    if any(pair_files) and not all(pair_files):
        pairs_at, sft_at = pair_files.index(True), pair_files.index(False)
        problems.append(
            Problem(
                str(data),
                None,
                None,
                f"mixes preference pairs ({spec.sources[pairs_at].display}) and SFT conversations ({spec.sources[sft_at].display})",
                "give SFT data to --stage sft and pairs to --stage dpo or rm, in separate data.txt files",
            )
        )
    paths = sorted({p for convs in per_file for c in convs if c is not None for p in c.images})
    bad_images, grids = _check_images(paths, image_spec, decode_images, workers, report)

    files: list[FileSamples] = []
    total, done = sum(len(c) for c in per_file), 0
    for src, convs, is_pairs in zip(spec.sources, per_file, pair_files):
        records: list[SampleRecord] = []
        for k, conv in enumerate(convs):
            done += 1
            if done % PROGRESS_EVERY == 0:
                report("encoding", done, total)
            records.append(_encode(k, conv, src, tokenizer, image_spec, max_length, bad_images, grids, problems))
        fs = FileSamples(src, records, pairs=is_pairs)
        fs.draw_count = draw_count(len(fs.usable), src.number, given_num)
        problems.extend(_file_problems(fs, max_length))
        files.append(fs)
    return DataPass(spec, files, problems)


def _encode(
    k: int,
    item: Conversation | PreferencePair | None,
    src: Source,
    tokenizer: TokenizerLike,
    spec: ImageSpec,
    max_length: int,
    bad_images: dict[Path, tuple[str, str]],
    grids: dict[Path, Grid],
    problems: list[Problem],
) -> SampleRecord:
    pair: PreferencePair | None = None
    conv: Conversation | None
    if isinstance(item, PreferencePair):
        pair, conv = item, item.chosen
    else:
        conv = item
    record = SampleRecord(k, conv, pair=pair)
    if conv is None:
        return record
    bad = [(p, bad_images[p]) for p in conv.images if p in bad_images]
    for p, (why, fix) in bad:
        problems.append(Problem(src.display, conv.index, conv.id, f"image {p} {why}", fix))
    if bad:
        return record
    conv_grids = [grids[p] for p in conv.images] if spec.hd else None
    if pair is not None:
        return _encode_pair(record, pair, src, tokenizer, spec, max_length, conv_grids, problems)
    enc = encode_conversation(conv, tokenizer, spec, max_length, conv_grids)
    record.encoded, record.grids = True, conv_grids
    record.length, record.untruncated_length, record.truncated = len(enc), enc.untruncated_length, enc.truncated
    record.supervised = enc.num_supervised  # a count over every label: once per sample
    if record.supervised == 0:
        problems.append(
            Problem(
                src.display,
                conv.index,
                conv.id,
                f"no supervised token left after truncation to max_length={max_length} (full length "
                f"{enc.untruncated_length}); the sample is skipped in training",
                "shorten the user turns or images before the first answer, or raise --max-length",
                level="warning",
            )
        )
        return record
    record.image_tokens = [spec.slots(g) for g in conv_grids] if conv_grids is not None else [spec.slots()] * len(conv.images)
    return record


def _encode_pair(
    record: SampleRecord,
    pair: PreferencePair,
    src: Source,
    tokenizer: TokenizerLike,
    spec: ImageSpec,
    max_length: int,
    grids: list[Grid] | None,
    problems: list[Problem],
) -> SampleRecord:
    """A pair's record: both sequences' length and scored tokens; supervised 0 when training skips it."""
    enc = encode_pair(pair, tokenizer, spec, max_length, grids)
    record.encoded, record.grids = True, grids
    record.length, record.truncated = len(enc), enc.truncated
    record.untruncated_length = enc.chosen.untruncated_length + enc.rejected.untruncated_length
    record.supervised = enc.num_supervised
    why = pair_skip_reason(pair, enc, max_length)
    if why is not None:
        record.supervised = 0
        if not enc.scorable:  # equal answers were reported when the pair was read
            problems.append(
                Problem(
                    src.display,
                    pair.index,
                    pair.id,
                    f"{why}; the pair is skipped in training",
                    "shorten the prompt or its images, or raise --max-length",
                    level="warning",
                )
            )
        return record
    record.image_tokens = [spec.slots(g) for g in grids] if grids is not None else [spec.slots()] * len(pair.images)
    return record


def _file_problems(fs: FileSamples, max_length: int) -> list[Problem]:
    """A file whose every valid sample is skipped (an error), or whose number draws nothing (a warning)."""
    src, out = fs.source, []
    encoded = [r for r in fs.records if r.encoded]
    if encoded and not fs.usable:
        what = (
            "no pair of this file can be trained (equal answers, or an answer cut away by"
            if fs.pairs
            else ("no sample of this file keeps a supervised token within")
        )
        out.append(
            Problem(
                src.display,
                None,
                None,
                f"{what} max_length={max_length}{')' if fs.pairs else ''} (all {len(encoded)} skipped)",
                "raise --max-length (images take their slots in full), or shorten the samples",
                line=src.line,
            )
        )
    if fs.usable and fs.draw_count == 0:
        out.append(
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
    return out
