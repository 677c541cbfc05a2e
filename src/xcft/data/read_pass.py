"""One pass over a data set: every sample read, validated, encoded and counted, once.

:func:`read_pass` is the reading that training (:func:`xcft.data.dataset.read_data`) and
``check-data`` (:func:`xcft.data.check.run_check`) share: the files of a data.txt (or one JSON
file), each sample normalised, its images checked, encoded as training encodes it, and the
per-file accounting (usable samples, skips, per-epoch draw). It returns plain per-sample records
and every problem found; what to do with them (stop at the first error, or list them all) is the
caller's.

Images: ``decode_images`` decodes every distinct image once (check-data), otherwise only what the
encoding needs is read: a 2.5 image's size from its file header (for its crop grid), nothing for
2.0 (training decodes images in ``__getitem__``).

Each file is read through the preprocessing cache (:mod:`xcft.data.cache`): its per-sample facts
are numpy columns (:class:`~xcft.data.table.SampleTable`), computed in parallel once and mapped by
every later reader; a sample's conversation is read from its JSON record when asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xcft.data.cache import load_table
from xcft.data.cache_options import CacheOptions
from xcft.data.encode import Grid, ImageSpec, TokenizerLike
from xcft.data.mixture import DataSpec, Source, draw_count, resolve_data
from xcft.data.schema import Conversation, Problem
from xcft.data.table import GRID_FIX, HEADER_FIX, SampleRecord, SampleTable, TableContext, header_size, image_grid
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
    "source_table",
]

#: ``progress(phase, done, total)``: phase is "reading" (files) or "encoding" (samples of a file).
ProgressFn = Callable[[str, int, int], None]


@dataclass
class FileSamples:
    """Every sample of one data file (a :class:`~xcft.data.table.SampleTable`) and the file's per-epoch draw."""

    source: Source
    table: SampleTable
    draw_count: int = 0

    @property
    def usable_index(self) -> np.ndarray:
        return self.table.usable_index

    @property
    def skipped(self) -> int:
        """Samples encoded but left with no supervised token (training skips them)."""
        return self.table.skipped

    @property
    def records(self) -> list[SampleRecord]:
        """Every sample as a record (reads each JSON record: for small files and tests)."""
        return list(self.table.records())

    @property
    def usable(self) -> list[SampleRecord]:
        return [self.table.record(int(k)) for k in self.usable_index]

    @property
    def pairs(self) -> bool:
        """A preference data file (its first record is a pair)."""
        return self.table.pairs


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
    why, size = header_size(path)
    if why is not None:
        raise OSError(f"{path} {why}")
    return size


def conversation_grids(conv: Conversation, spec: ImageSpec) -> list[Grid]:
    """2.5: the crop grid of each image of one sample, from the file headers (DataError when one cannot be used)."""
    grids: list[Grid] = []
    for path in conv.images:
        why, size = header_size(path)
        if why is not None:
            raise DataError(f"{conv.where}: image {path} {why}. Fix: {HEADER_FIX}")
        why, grid = image_grid(spec, size)
        if grid is None:
            raise DataError(f"{conv.where}: image {path} {why}. Fix: {GRID_FIX}")
        grids.append(grid)
    return grids


def source_table(
    spec: DataSpec,
    src: Source,
    tokenizer: TokenizerLike,
    image_spec: ImageSpec,
    max_length: int,
    *,
    decode_images: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cache: CacheOptions | None = None,
) -> SampleTable:
    """The table of one file of ``spec``, through the preprocessing cache (``progress`` None: the cache shows its own)."""
    ctx = TableContext(src.path, src.display, spec.search_dirs(src), tokenizer, image_spec, max_length, decode_images)
    return load_table(ctx, cache, workers=workers, progress=progress)


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
    cache: CacheOptions | None = None,
) -> DataPass:
    """Read, validate, encode and count every sample of ``data`` once; collect every problem (see the module docstring).

    Each file goes through the preprocessing cache (:mod:`xcft.data.cache`; ``cache`` None: the
    default folder): a file read before with the same tokenizer and settings is mapped, not read.
    ``workers``: image decoding threads when a cached file's images are checked.
    """
    report = progress or (lambda phase, done, total: None)
    spec, problems = resolve_data(data)
    if spec is None:
        return DataPass(None, [], problems)
    files: list[FileSamples] = []
    for k, src in enumerate(spec.sources):
        report("reading", k, len(spec.sources))
        per_sample = (lambda done, total: report("encoding", done, total)) if progress is not None else None
        table = source_table(
            spec,
            src,
            tokenizer,
            image_spec,
            max_length,
            decode_images=decode_images,
            workers=workers,
            progress=per_sample,
            cache=cache,
        )
        problems.extend(table.problems)
        fs = FileSamples(src, table)
        fs.draw_count = draw_count(len(fs.usable_index), src.number, given_num)
        problems.extend(_file_problems(fs, max_length))
        files.append(fs)
    kinds = [fs.pairs for fs in files if len(fs.table)]
    if any(kinds) and not all(kinds):
        pairs_at = next(fs for fs in files if len(fs.table) and fs.pairs).source.display
        sft_at = next(fs for fs in files if len(fs.table) and not fs.pairs).source.display
        problems.append(
            Problem(
                str(data),
                None,
                None,
                f"mixes preference pairs ({pairs_at}) and SFT conversations ({sft_at})",
                "give SFT data to --stage sft and pairs to --stage dpo or rm, in separate data.txt files",
            )
        )
    return DataPass(spec, files, problems)


def _file_problems(fs: FileSamples, max_length: int) -> list[Problem]:
    """A file whose every valid sample is skipped (an error), or whose number draws nothing (a warning)."""
    src, out = fs.source, []
    n_encoded = int(np.count_nonzero(fs.table.encoded))
    n_usable = len(fs.usable_index)
    if n_encoded and not n_usable:
        what = (
            f"no pair of this file can be trained (equal answers, or an answer cut away by max_length={max_length})"
            if fs.pairs
            else f"no sample of this file keeps a supervised token within max_length={max_length}"
        )
        out.append(
            Problem(
                src.display,
                None,
                None,
                f"{what} (all {n_encoded} skipped)",
                "raise --max-length (images take their slots in full), or shorten the samples",
                line=src.line,
            )
        )
    if n_usable and fs.draw_count == 0:
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
