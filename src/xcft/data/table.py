"""The per-sample facts of one data file as numpy columns, and how they are computed (in parallel).

A :class:`SampleTable` is what the read pass knows about every sample of one file: where its JSON
record lies in the file (byte range, JSON Lines line), its id, whether it was normalised and
encoded, its encoded and untruncated lengths, supervised token count, and per image its resolved
path, crop grid (2.5) and slot count. Columns are plain arrays, so a table of a million samples costs tens of
megabytes, maps from disk (:mod:`xcft.data.cache`) and is shared by DataLoader workers; a sample's
:class:`~xcft.data.schema.Conversation` is rebuilt from its JSON record when asked for
(:meth:`SampleTable.conversation`), never kept.

:func:`build_table` computes a table: the parent process finds the records' byte ranges (one scan
of the file, objects discarded), worker processes normalise, check images and encode chunks of
records (``workers``; fork), the parent joins the chunks in file order.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xcft.data.encode import Grid, ImageSpec, TokenizerLike, encoded_size
from xcft.data.images import IMAGE_FIX, decode_with_size
from xcft.data.pairs import PreferencePair, encode_pair, is_pair_record, normalize_pair, not_a_pair, pair_skip_reason
from xcft.data.schema import Conversation, Problem, jsonl_problem, normalize_sample, read_records
from xcft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "GRID_FIX",
    "HEADER_FIX",
    "SampleRecord",
    "SampleTable",
    "TableContext",
    "build_table",
    "default_workers",
    "header_size",
    "image_grid",
]

HEADER_FIX = "replace or re-save the file"
GRID_FIX = "crop or pad the image"
#: samples per task of a worker process
CHUNK = 2000
#: below this many samples a file is read in the calling process (starting workers costs more)
PARALLEL_MIN = 4 * CHUNK
_WS = re.compile(r"[ \t\n\r]*")
# str.splitlines() breaks lines at these besides \n and \r
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@dataclass
class SampleRecord:
    """One sample as the pass found it. ``conversation`` None: it could not be normalised (a problem says why).

    ``encoded`` False: not encoded (no conversation, or an image that cannot be used). ``supervised``
    0 for an encoded sample: nothing left to train after truncation (skipped in training).
    """

    index: int
    conversation: Conversation | None
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


#: the scalar fields of a record, each one column of the table (name -> dtype)
SCALARS: dict[str, Any] = {
    f.name: (np.bool_ if f.type in ("bool", bool) else np.int32)
    for f in dataclasses.fields(SampleRecord)
    if f.type in ("bool", "int", bool, int) and f.name != "index"
}


def default_workers() -> int:
    """Processes for building: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def header_size(path: str | os.PathLike[str]) -> tuple[str | None, tuple[int, int]]:
    """``(None, (width, height))`` from the image file's header (no pixel data read), or ``(reason, (0, 0))``."""
    try:
        with Image.open(path) as img:
            return None, img.size
    except Exception as exc:  # PIL raises many types for broken headers
        return f"cannot be read ({exc})", (0, 0)


def image_grid(spec: ImageSpec, size: tuple[int, int]) -> tuple[str | None, Grid | None]:
    """``(None, grid)`` of an image of ``size`` pixels, or ``(reason, None)`` when the HD transform cannot use it."""
    try:
        return None, spec.grid(*size)
    except ValueError as exc:  # e.g. an aspect ratio the HD transform cannot handle
        return f"cannot be used: {exc}", None


# --------------------------------------------------------------------------- the table


class SampleTable:
    """Columns of one file's samples (see the module docstring); ``len(table)`` is the file's sample count."""

    def __init__(
        self,
        path: Path,
        display: str,
        search_dirs: Sequence[Path],
        columns: dict[str, np.ndarray],
        problems: list[Problem],
        *,
        file_size: int,
        file_mtime_ns: int,
    ) -> None:
        self.path = Path(path)
        self.display = display
        self.search_dirs = [Path(d) for d in search_dirs]
        self.columns = columns
        self.problems = problems
        self.file_size = file_size
        self.file_mtime_ns = file_mtime_ns
        self._fh: Any = None
        self._fh_pid = -1

    def __len__(self) -> int:
        return len(self.columns["start"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"], state["_fh_pid"] = None, -1  # file handles are per process
        return state

    def __getattr__(self, name: str) -> np.ndarray:
        cols = self.__dict__.get("columns")
        if cols is not None and name in cols:
            return cols[name]
        raise AttributeError(name)

    # -- derived index arrays

    @property
    def usable_index(self) -> np.ndarray:
        """Indices of the samples training uses: encoded, with a supervised token left."""
        return np.flatnonzero(self.columns["encoded"] & (self.columns["supervised"] > 0))

    @property
    def skipped(self) -> int:
        """Samples encoded but left with no supervised token (training skips them)."""
        return int(np.count_nonzero(self.columns["encoded"] & (self.columns["supervised"] == 0)))

    def image_paths(self, k: int) -> list[Path]:
        a, b = int(self.columns["img_off"][k]), int(self.columns["img_off"][k + 1])
        return [self.path_at(int(i)) for i in self.columns["img_path"][a:b]]

    def path_at(self, i: int) -> Path:
        off = self.columns["path_off"]
        return Path(_text(self.columns["path_blob"][int(off[i]) : int(off[i + 1])]))

    @property
    def num_paths(self) -> int:
        return len(self.columns["path_off"]) - 1

    def sample_id(self, k: int) -> str | None:
        """Sample ``k``'s id as normalisation reads it (its index when it has none; None for a record that is no object)."""
        off = self.columns["id_off"]
        a, b = int(off[k]), int(off[k + 1])
        return _text(self.columns["id_blob"][a:b]) if self.columns["has_id"][k] else None

    def find_id(self, sample_id: str) -> np.ndarray:
        """Indices of the samples whose id is ``sample_id``, in file order (compared in the mapped column, no record read)."""
        target = np.frombuffer(_blob(sample_id), dtype=np.uint8)
        if not len(target):
            return np.zeros(0, np.int64)
        off = np.asarray(self.columns["id_off"])
        candidates = np.flatnonzero((np.diff(off) == len(target)) & np.asarray(self.columns["has_id"], dtype=bool))
        blob = np.asarray(self.columns["id_blob"])
        found = [np.zeros(0, np.int64)]
        for a in range(0, len(candidates), _ID_BLOCK):  # bounded temporaries however long the file
            block = candidates[a : a + _ID_BLOCK]
            rows = blob[off[block][:, None] + np.arange(len(target))]
            found.append(block[(rows == target).all(axis=1)])
        return np.concatenate(found)

    def grids(self, k: int) -> list[Grid]:
        a, b = int(self.columns["img_off"][k]), int(self.columns["img_off"][k + 1])
        return [(int(r), int(c)) for r, c in self.columns["grid"][a:b]]

    def image_tokens(self, k: int) -> list[int]:
        a, b = int(self.columns["img_off"][k]), int(self.columns["img_off"][k + 1])
        return [int(n) for n in self.columns["slots"][a:b]]

    # -- records

    def _file(self) -> Any:
        if self._fh is None or self._fh_pid != os.getpid():
            fh = open(self.path, "rb")  # noqa: SIM115 - kept open for the process's reads
            st = os.fstat(fh.fileno())
            if st.st_size != self.file_size or st.st_mtime_ns != self.file_mtime_ns:
                fh.close()
                raise DataError(
                    f"{self.display}: the file changed after it was read (size or modification time differs). "
                    "Fix: restart so the data is read again, and leave data files alone while training"
                )
            self._fh, self._fh_pid = fh, os.getpid()
        return self._fh

    def raw_record(self, k: int) -> Any:
        """Sample ``k``'s JSON value, read from the file."""
        start, end = int(self.columns["start"][k]), int(self.columns["end"][k])
        fh = self._file()
        fh.seek(start)
        return json.loads(fh.read(end - start))

    @property
    def pairs(self) -> bool:
        """A preference data file (its first record is a pair): samples are pairs."""
        return bool(self.columns["pairs"][0])

    def pair(self, k: int) -> PreferencePair | None:
        """Pair ``k`` of a preference file normalised again from its record (None where it could not be)."""
        pair = self._normalized(k, normalize_pair, "pair")
        if pair is not None:
            pair.chosen.images = pair.rejected.images = self.image_paths(k)
        return pair

    def _normalized(self, k: int, normalize: Any, what: str) -> Any:
        """Record ``k`` normalised again by ``normalize`` (None where it was not a usable record at build time)."""
        if not self.columns["has_conversation"][k]:
            return None
        line = int(self.columns["line"][k])
        result, _ = normalize(
            self.raw_record(k),
            file=self.display,
            index=int(k),
            search_dirs=self.search_dirs,
            line=line if line >= 0 else None,
            check_images_exist=False,
        )
        if result is None:  # the record normalised at build time; only a changed file gets here
            raise DataError(f"{self.display}: {what} {k} no longer reads as it did. Fix: restart so the data is read again")
        return result

    def conversation(self, k: int) -> Conversation | None:
        """Sample ``k`` normalised again from its record (None where it could not be), its images as resolved at build.

        A preference file's sample is its pair's chosen conversation.
        """
        if self.pairs:
            pair = self.pair(k)
            return pair.chosen if pair is not None else None
        conv = self._normalized(k, normalize_sample, "sample")
        if conv is not None:
            conv.images = self.image_paths(k)
        return conv

    def record(self, k: int) -> SampleRecord:
        """Sample ``k`` as a :class:`SampleRecord` (reads its JSON record)."""
        cols = self.columns
        pair = self.pair(k) if self.pairs else None
        conv = pair.chosen if pair is not None else None if self.pairs else self.conversation(k)
        rec = SampleRecord(int(k), conv, pair=pair, **{n: SCALARS[n](cols[n][k]).item() for n in SCALARS})
        if rec.encoded and self.columns["hd"][0]:
            rec.grids = self.grids(k)
        if rec.usable:
            rec.image_tokens = self.image_tokens(k)
        return rec

    def records(self) -> Iterator[SampleRecord]:
        return (self.record(k) for k in range(len(self)))


class SampleView(Sequence[Any]):
    """A sequence over some samples of a table, read on access.

    ``kind``: what an element is: ``"conversation"`` (a pair's chosen one), ``"grids"`` (its crop
    grids), ``"pair"`` or ``"rejected"`` (a pair's rejected conversation).
    """

    def __init__(self, table: SampleTable, index: np.ndarray, *, grids: bool = False, kind: str = "conversation") -> None:
        self.table = table
        self.rows = np.asarray(index, dtype=np.int64)  # sample numbers in the table
        self.kind = "grids" if grids else kind

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return SampleView(self.table, self.rows[j], kind=self.kind)
        k = int(self.rows[j])
        if self.kind == "grids":
            return self.table.grids(k)
        if self.kind == "pair":
            return self.table.pair(k)
        if self.kind == "rejected":
            pair = self.table.pair(k)
            return pair.rejected if pair is not None else None
        return self.table.conversation(k)

    def take(self, positions: Sequence[int] | np.ndarray) -> SampleView:
        """The samples at ``positions`` of this view."""
        return SampleView(self.table, self.rows[np.asarray(positions, dtype=np.int64)], kind=self.kind)


# --------------------------------------------------------------------------- finding the records


@dataclass
class _Spans:
    start: np.ndarray  # byte offsets
    end: np.ndarray
    line: np.ndarray  # JSON Lines line number, -1 for an array element


def _array_spans(text: str) -> list[tuple[int, int]] | None:
    """Character spans of the elements of a well-formed, non-empty top-level JSON array; None otherwise."""
    decoder = json.JSONDecoder()
    n = len(text)
    i = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if i >= n or text[i] != "[":
        return None
    i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    if i >= n or text[i] == "]":  # an empty array: read_records names the problem
        return None
    spans: list[tuple[int, int]] = []
    while True:
        try:
            _, j = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            return None
        spans.append((i, j))
        i = _WS.match(text, j).end()  # type: ignore[union-attr]
        if i < n and text[i] == ",":
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            continue
        if i < n and text[i] == "]" and _WS.match(text, i + 1).end() == n:  # type: ignore[union-attr]
            return spans
        return None


def _line_spans(text: str, name: str) -> tuple[list[tuple[int, int]], list[int], list[Problem]]:
    """JSON Lines: the character span and line number of each parsable line, and a problem for each other one."""
    spans: list[tuple[int, int]] = []
    lines: list[int] = []
    problems: list[Problem] = []
    pos = 0
    for lineno, line in enumerate(text.splitlines(keepends=True), start=1):
        ending = 2 if line.endswith("\r\n") else 1 if line and line[-1] in _LINE_BREAKS else 0
        body = line[: len(line) - ending]
        if body.strip():
            try:
                json.loads(body)
            except (RecursionError, ValueError) as exc:
                problems.append(jsonl_problem(exc, body, lineno, name))
            else:
                spans.append((pos, pos + len(body)))
                lines.append(lineno)
        pos += len(line)
    if not spans and not problems:
        problems.append(Problem(name, None, None, "file is empty", "put one JSON object per line in it"))
    return spans, lines, problems


def _byte_offsets(text: str, spans: list[tuple[int, int]], bom: int) -> tuple[np.ndarray, np.ndarray]:
    """Character spans (ascending) as byte offsets into the UTF-8 file."""
    flat = np.fromiter((x for s in spans for x in s), dtype=np.int64, count=2 * len(spans))
    if text.isascii():
        flat += bom
    else:
        pos_c, pos_b = 0, bom
        for t, c in enumerate(flat.tolist()):
            pos_b += len(text[pos_c:c].encode("utf-8"))
            pos_c = c
            flat[t] = pos_b
    return flat[0::2].copy(), flat[1::2].copy()


def find_records(path: Path, display: str) -> tuple[_Spans | None, list[Problem]]:
    """Where each record of a JSON array or JSON Lines file lies; None and the problems when the file is unusable.

    The problems are :func:`~xcft.data.schema.read_records`'s, which reads the unusual cases (and a
    ``.json`` file that holds JSON Lines) itself.
    """
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None, read_records(path, display)[1]
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    del raw
    jsonl = path.suffix.lower() == ".jsonl"
    problems: list[Problem] = []
    if not text.strip():
        return None, read_records(path, display)[1]
    if jsonl:
        spans, lines, problems = _line_spans(text, display)
    else:
        array = _array_spans(text)
        if array is None:
            records, problems = read_records(path, display)
            if problems or not records:
                return None, problems
            spans, lines, problems = _line_spans(text, display)  # a .json file holding JSON Lines
        else:
            spans, lines = array, [-1] * len(array)
    if not spans:
        return None, problems
    start, end = _byte_offsets(text, spans, bom)
    return _Spans(start, end, np.asarray(lines, dtype=np.int32)), problems


# --------------------------------------------------------------------------- encoding chunks of records


@dataclass
class TableContext:
    """What encoding a file's records needs (inherited by the worker processes)."""

    path: Path
    display: str
    search_dirs: list[Path]
    tokenizer: TokenizerLike
    spec: ImageSpec
    max_length: int
    decode_images: bool
    pairs: bool = False  # a preference data file (set by build_table from its first record)


class _MemoTokenizer:
    """The tokenizer with ``encode_text`` remembered for short texts (turn tokens, role headers recur in every sample).

    Ids are the tokenizer's own; only repeated calls are saved. One per worker process.
    """

    MAX_TEXT = 64
    MAX_ENTRIES = 20_000  # bounds the memory of a long build; the recurring texts come first

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._tokenizer = tokenizer
        self._memo: dict[str, list[int]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def encode_text(self, text: str) -> list[int]:
        if len(text) > self.MAX_TEXT:
            return self._tokenizer.encode_text(text)
        hit = self._memo.get(text)
        if hit is None:
            hit = self._tokenizer.encode_text(text)
            if len(self._memo) < self.MAX_ENTRIES:
                self._memo[text] = hit
        return list(hit)


@dataclass
class _Chunk:
    scalars: dict[str, np.ndarray]
    has_conversation: np.ndarray
    n_images: np.ndarray  # images of each sample's conversation (0 without one)
    image_paths: list[str]
    ids: list[str | None]  # each record's id (None: a record that is no object)
    grids: np.ndarray  # [M, 2]
    slots: np.ndarray  # [M]
    problems: list[Problem]


def _check_image(
    path: Path, ctx: TableContext, seen: dict[Path, tuple[str | None, str, Grid | None]]
) -> tuple[str | None, str, Grid | None]:
    """(reason it cannot be used or None, the fix, its crop grid) of one image, remembered per worker."""
    hit = seen.get(path)
    if hit is not None:
        return hit
    why: str | None = None
    fix, grid = "", None
    if ctx.decode_images or ctx.spec.hd:
        why, size = decode_with_size(path) if ctx.decode_images else header_size(path)
        fix = IMAGE_FIX if ctx.decode_images else HEADER_FIX
        if why is None and ctx.spec.hd:
            why, grid = image_grid(ctx.spec, size)
            fix = GRID_FIX
    seen[path] = (why, fix, grid)
    return seen[path]


class _Memo:
    """What one building process remembers across its chunks: image checks, path stats and short encodings.

    Real sets reuse a few thousand images across hundreds of thousands of samples, so each image is
    decoded and each path stat'ed once per process, not once per chunk.
    """

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.images: dict[Path, tuple[str | None, str, Grid | None]] = {}
        self.files: dict[Path, bool] = {}
        self.tokenizer = _MemoTokenizer(tokenizer)

    def is_file(self, path: Path) -> bool:
        hit = self.files.get(path)
        if hit is None:
            hit = self.files[path] = path.is_file()
        return hit


def _encode_chunk(ctx: TableContext, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray, first: int, memo: _Memo) -> _Chunk:
    """Normalise, check and encode the records ``first ..`` of the file (their byte spans given)."""
    n = len(starts)
    scalars = {name: np.zeros(n, dtype=dt) for name, dt in SCALARS.items()}
    has_conv = np.zeros(n, dtype=np.bool_)
    n_images = np.zeros(n, dtype=np.int32)
    paths: list[str] = []
    ids: list[str | None] = []
    grids: list[Grid] = []
    slots: list[int] = []
    problems: list[Problem] = []
    seen = memo.images
    tokenizer = memo.tokenizer
    is_file = memo.is_file

    with open(ctx.path, "rb") as fh:
        base = int(starts[0])
        fh.seek(base)
        blob = fh.read(int(ends[-1]) - base)
    for t in range(n):
        k = first + t
        line = int(lines[t])
        record = json.loads(blob[int(starts[t]) - base : int(ends[t]) - base])
        pair: PreferencePair | None = None
        if ctx.pairs:
            if not is_pair_record(record):
                problem = not_a_pair(ctx.display, k, record, line if line >= 0 else None)
                problems.append(problem)
                ids.append(problem.id)
                continue
            pair, probs = normalize_pair(
                record, file=ctx.display, index=k, search_dirs=ctx.search_dirs, line=line if line >= 0 else None
            )
            conv = pair.chosen if pair is not None else None
        else:
            conv, probs = normalize_sample(
                record, file=ctx.display, index=k, search_dirs=ctx.search_dirs, line=line if line >= 0 else None, is_file=is_file
            )
        problems.extend(probs)
        ids.append(conv.id if conv is not None else next((p.id for p in probs if p.id is not None), None))
        if conv is None:
            continue
        has_conv[t] = True
        n_images[t] = len(conv.images)
        paths.extend(str(p) for p in conv.images)
        checks = [_check_image(p, ctx, seen) for p in conv.images]
        for p, (why, fix, _) in zip(conv.images, checks):
            if why is not None:
                problems.append(Problem(ctx.display, conv.index, conv.id, f"image {p} {why}", fix))
        usable_images = all(why is None for why, _, _ in checks)
        conv_grids = [g for _, _, g in checks] if ctx.spec.hd and usable_images else None
        sample_slots = [0] * len(conv.images)
        sample_grids: list[Grid] = [(0, 0)] * len(conv.images)
        if usable_images and pair is not None:
            _encode_pair_into(ctx, tokenizer, pair, conv_grids, scalars, t, problems)  # type: ignore[arg-type]
            if conv_grids is not None:
                sample_grids = list(conv_grids)  # type: ignore[arg-type]
            if scalars["supervised"][t]:
                sample_slots = (
                    [ctx.spec.slots(g) for g in conv_grids] if conv_grids is not None else [ctx.spec.slots()] * len(conv.images)
                )
        elif usable_images:
            enc = encoded_size(conv, tokenizer, ctx.spec, ctx.max_length, conv_grids)  # type: ignore[arg-type]
            sup = enc.supervised
            for name, value in (
                ("encoded", True),
                ("length", enc.length),
                ("untruncated_length", enc.untruncated_length),
                ("supervised", sup),
                ("truncated", enc.truncated),
            ):
                scalars[name][t] = value
            if conv_grids is not None:
                sample_grids = list(conv_grids)  # type: ignore[arg-type]
            if sup == 0:
                problems.append(_no_supervised(ctx, conv, enc.untruncated_length))
            else:
                sample_slots = (
                    [ctx.spec.slots(g) for g in conv_grids] if conv_grids is not None else [ctx.spec.slots()] * len(conv.images)
                )
        grids.extend(sample_grids)
        slots.extend(sample_slots)
    return _Chunk(
        scalars,
        has_conv,
        n_images,
        paths,
        ids,
        np.asarray(grids, dtype=np.int16).reshape(-1, 2),
        np.asarray(slots, dtype=np.int32),
        problems,
    )


def _encode_pair_into(
    ctx: TableContext,
    tokenizer: Any,
    pair: PreferencePair,
    grids: list[Grid] | None,
    scalars: dict[str, np.ndarray],
    t: int,
    problems: list[Problem],
) -> None:
    """A pair's columns: both sequences' length and scored tokens; supervised 0 when training skips it."""
    enc = encode_pair(pair, tokenizer, ctx.spec, ctx.max_length, grids)
    scalars["encoded"][t] = True
    scalars["length"][t] = len(enc)
    scalars["truncated"][t] = enc.truncated
    scalars["untruncated_length"][t] = enc.chosen.untruncated_length + enc.rejected.untruncated_length
    scalars["supervised"][t] = enc.num_supervised
    why = pair_skip_reason(pair, enc, ctx.max_length)
    if why is None:
        return
    scalars["supervised"][t] = 0
    if not enc.scorable:  # equal answers were reported when the pair was read
        problems.append(
            Problem(
                ctx.display,
                pair.index,
                pair.id,
                f"{why}; the pair is skipped in training",
                "shorten the prompt or its images, or raise --max-length",
                level="warning",
            )
        )


def _no_supervised(ctx: TableContext, conv: Conversation, untruncated: int) -> Problem:
    return Problem(
        ctx.display,
        conv.index,
        conv.id,
        f"no supervised token left after truncation to max_length={ctx.max_length} (full length "
        f"{untruncated}); the sample is skipped in training",
        "shorten the user turns or images before the first answer, or raise --max-length",
        level="warning",
    )


class _Worker:
    """The context of a build's worker processes (set once per process by the pool's initializer)."""

    ctx: TableContext | None = None
    spans: _Spans | None = None
    memo: _Memo | None = None

    @classmethod
    def init(cls, ctx: TableContext, spans: _Spans) -> None:
        cls.ctx, cls.spans, cls.memo = ctx, spans, _Memo(ctx.tokenizer)

    @classmethod
    def run(cls, bounds: tuple[int, int]) -> _Chunk:
        a, b = bounds
        assert cls.ctx is not None and cls.spans is not None and cls.memo is not None
        s = cls.spans
        return _encode_chunk(cls.ctx, s.start[a:b], s.end[a:b], s.line[a:b], a, cls.memo)


def _chunks(ctx: TableContext, spans: _Spans, workers: int) -> Iterator[_Chunk]:
    n = len(spans.start)
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    if workers <= 1 or n < PARALLEL_MIN or "fork" not in multiprocessing.get_all_start_methods():
        memo = _Memo(ctx.tokenizer)
        for a, b in bounds:
            yield _encode_chunk(ctx, spans.start[a:b], spans.end[a:b], spans.line[a:b], a, memo)
        return
    # fork: the workers inherit the tokenizer and the spans instead of unpickling them
    with multiprocessing.get_context("fork").Pool(min(workers, len(bounds)), _Worker.init, (ctx, spans)) as pool:
        yield from pool.imap(_Worker.run, bounds)


def build_table(ctx: TableContext, workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> SampleTable:
    """Read every record of ``ctx.path`` (see the module docstring); ``progress(done, total)`` after each chunk."""
    st = ctx.path.stat()
    spans, problems = find_records(ctx.path, ctx.display)
    if spans is None:
        spans = _Spans(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))
    else:  # the file's kind follows its first record, as the official loader decides
        with open(ctx.path, "rb") as fh:
            fh.seek(int(spans.start[0]))
            ctx = dataclasses.replace(ctx, pairs=is_pair_record(json.loads(fh.read(int(spans.end[0] - spans.start[0])))))
    n = len(spans.start)
    scalars: dict[str, list[np.ndarray]] = {name: [] for name in SCALARS}
    has_conv: list[np.ndarray] = []
    n_images: list[np.ndarray] = []
    grids: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    path_ids: dict[str, int] = {}
    img_path: list[np.ndarray] = []
    sample_ids: list[str | None] = []
    done = 0
    for chunk in _chunks(ctx, spans, workers or default_workers()):
        for name in SCALARS:
            scalars[name].append(chunk.scalars[name])
        has_conv.append(chunk.has_conversation)
        n_images.append(chunk.n_images)
        grids.append(chunk.grids)
        slots.append(chunk.slots)
        img_path.append(np.fromiter((path_ids.setdefault(p, len(path_ids)) for p in chunk.image_paths), np.int32))
        sample_ids.extend(chunk.ids)
        problems.extend(chunk.problems)
        done += len(chunk.has_conversation)
        if progress is not None:
            progress(done, n)
    counts = np.concatenate(n_images) if n_images else np.zeros(0, np.int32)
    img_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=img_off[1:])
    path_blob, path_off = _strings(list(path_ids))
    id_blob, id_off = _strings([i or "" for i in sample_ids])
    columns = {
        "start": spans.start,
        "end": spans.end,
        "line": spans.line,
        "has_conversation": _cat(has_conv, np.bool_),
        **{name: _cat(parts, SCALARS[name]) for name, parts in scalars.items()},
        "img_off": img_off,
        "img_path": _cat(img_path, np.int32),
        "grid": np.concatenate(grids) if grids else np.zeros((0, 2), np.int16),
        "slots": _cat(slots, np.int32),
        "path_blob": path_blob,
        "path_off": path_off,
        "id_blob": id_blob,
        "id_off": id_off,
        "has_id": np.fromiter((i is not None for i in sample_ids), np.bool_, count=len(sample_ids)),
        "hd": np.array([ctx.spec.hd]),
        "pairs": np.array([ctx.pairs]),
    }
    return SampleTable(
        ctx.path, ctx.display, ctx.search_dirs, columns, problems, file_size=st.st_size, file_mtime_ns=st.st_mtime_ns
    )


#: ids compared per block by :meth:`SampleTable.find_id`
_ID_BLOCK = 1 << 18


def _blob(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(raw: np.ndarray) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


def _strings(items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one byte column and offsets (string ``i`` is ``blob[off[i]:off[i + 1]]``)."""
    blobs = [_blob(t) for t in items]
    off = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=off[1:])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), off


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
