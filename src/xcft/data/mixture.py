"""``data.txt`` parsing and the per-epoch draw.

A ``data.txt`` line is ``<path> <number>``; blank lines and lines starting with ``#`` are ignored;
the path may contain spaces (the line is split at its last whitespace); a relative path is relative
to the folder holding ``data.txt``. A single ``.json``/``.jsonl`` file may be given instead: every
sample once per epoch.

The draw of epoch E is a pure function of ``(seed, E)`` and the file sizes, so every rank computes
the same one, epochs differ, and a restarted run redraws exactly what it had.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xcft.data.schema import Problem, raise_first

#: The help of ``--given_num`` (``check-data``, ``train`` ...): what the numbers of data.txt mean.
GIVEN_NUM_HELP = (
    "data.txt numbers are sample counts in thousands drawn per epoch (true, the default and what the official "
    "scripts pass) or ratios of each file's size (false)"
)

JSON_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Source:
    """One training file and how much of it an epoch draws.

    ``number`` is None for a JSON file given directly (all samples once). ``display`` is the path as
    written by the user (used in messages).
    """

    path: Path
    number: float | None
    line: int | None
    display: str


@dataclass(frozen=True)
class DataSpec:
    """What the data argument names: the files, and the folders image paths are resolved against."""

    sources: list[Source]
    root: Path  # the data.txt folder (or the JSON file's folder)
    data_txt: Path | None

    def search_dirs(self, source: Source) -> list[Path]:
        """Image paths: the data.txt folder first, then the JSON file's own folder."""
        dirs = [self.root]
        if source.path.parent.resolve() != self.root.resolve():
            dirs.append(source.path.parent)
        return dirs


def parse_data_txt(path: Path) -> tuple[list[Source], list[Problem]]:
    """Parse a data.txt; every bad line becomes a :class:`Problem` with its line number."""
    name = str(path)
    problems: list[Problem] = []
    sources: list[Source] = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return [], [
            Problem(
                name,
                None,
                None,
                f"cannot read data file: {exc.strerror or exc}",
                "give an existing data.txt or a .json/.jsonl file",
            )
        ]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [], [Problem(name, None, None, f"data.txt is not UTF-8 (offset {exc.start})", "re-save it as UTF-8")]
    root = path.parent
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.rsplit(None, 1)
        if len(parts) != 2:
            problems.append(
                Problem(
                    name,
                    None,
                    None,
                    f"expected '<path> <number>', got {s!r}",
                    "add the number of samples per epoch (in thousands, e.g. `data/a.json 0.5`)",
                    line=lineno,
                )
            )
            continue
        file_part, num_part = parts[0].strip(), parts[1]
        try:
            number = float(num_part)
        except ValueError:
            problems.append(
                Problem(
                    name,
                    None,
                    None,
                    f"{num_part!r} is not a number",
                    "end the line with a number: thousands of samples (given_num) or a ratio",
                    line=lineno,
                )
            )
            continue
        if not math.isfinite(number) or number < 0:
            problems.append(
                Problem(name, None, None, f"number {num_part} must be finite and >= 0", "use e.g. 0.5 or 2", line=lineno)
            )
            continue
        fp = Path(file_part).expanduser()
        if not fp.is_absolute():
            fp = root / fp
        if not fp.is_file():
            problems.append(
                Problem(
                    name,
                    None,
                    None,
                    f"file {file_part!r} not found (looked at {fp.absolute()})",
                    "paths in data.txt are relative to the folder that holds data.txt",
                    line=lineno,
                )
            )
            continue
        sources.append(Source(fp, number, lineno, file_part))
    if not sources and not problems:
        problems.append(Problem(name, None, None, "data.txt names no file", "add lines `<path> <number>`"))
    return sources, problems


def resolve_data(data: str | os.PathLike[str]) -> tuple[DataSpec | None, list[Problem]]:
    """Interpret the data argument: a data.txt, or one .json/.jsonl file."""
    p = Path(data).expanduser()
    if not p.exists():
        return None, [Problem(str(data), None, None, "data path not found", "give a data.txt or a .json/.jsonl file")]
    if p.is_dir():
        return None, [
            Problem(str(data), None, None, "data path is a folder", "give the data.txt inside it (or a .json/.jsonl file)")
        ]
    if p.suffix.lower() in JSON_SUFFIXES:
        return DataSpec([Source(p, None, None, str(data))], p.parent, None), []
    sources, problems = parse_data_txt(p)
    return DataSpec(sources, p.parent, p), problems


def load_spec(data: str | Path) -> DataSpec:
    """:func:`resolve_data` for training: raise on the first problem."""
    spec, problems = resolve_data(data)
    raise_first(problems)
    assert spec is not None
    return spec


def draw_count(size: int, number: float | None, given_num: bool = True) -> int:
    """Samples drawn from a file of ``size`` samples per epoch.

    ``given_num``: ``number`` is thousands of samples (``0.02`` = 20); otherwise a ratio of ``size``.
    ``number`` None (a JSON file given directly) means every sample once.
    """
    if size <= 0:
        return 0
    if number is None:
        return size
    raw = number * 1000.0 if given_num else number * size
    # round to nearest; 1e-9 guards 0.02*1000 = 20.000000000000004 and 0.29*1000 = 289.99999999999994
    return math.floor(raw + 0.5 + 1e-9)


def epoch_draw(counts: Sequence[int], sizes: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """The draw of one epoch: an ``int64 [K, 2]`` array of ``(file index, sample index)`` rows.

    Per file: ``count <= size`` samples without replacement; more is ``count // size`` full passes
    plus ``count % size`` further samples without replacement (every sample at least once, extra
    draws spread evenly). The whole draw is then shuffled. Pure function of its arguments.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x5CF7]))
    parts: list[np.ndarray] = []
    for f, (count, size) in enumerate(zip(counts, sizes)):
        if count <= 0 or size <= 0:
            continue
        full, rest = divmod(int(count), int(size))
        idx = [np.arange(size, dtype=np.int64)] * full
        if rest:
            idx.append(np.sort(rng.choice(size, size=rest, replace=False)).astype(np.int64))
        chosen = np.concatenate(idx)
        parts.append(np.stack([np.full(len(chosen), f, dtype=np.int64), chosen], axis=1))
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    draw = np.concatenate(parts)
    return draw[rng.permutation(len(draw))]


__all__ = ["GIVEN_NUM_HELP", "DataSpec", "Source", "draw_count", "epoch_draw", "load_spec", "parse_data_txt", "resolve_data"]
