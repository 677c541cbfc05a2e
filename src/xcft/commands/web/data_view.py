"""The Data tab's model: one check-data pass over a data set, then any sample on demand.

:class:`DataIndex` holds the :class:`~xcft.data.check.CheckResult` of one pass (summary, problems
and every normalised sample), so showing a sample costs one encode and a few thumbnails, not a
re-read of the files. Everything here returns plain values (rows, HTML, a matplotlib figure); the
page wiring lives in :mod:`xcft.commands.web.app`.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from xcft.data import report as check_report
from xcft.data.check import (
    CheckResult,
    ProgressFn,
    Settings,
    encode_for,
    length_stats,
    load_settings,
    run_check,
    sample_runs,
)
from xcft.data.encode import EncodedSample
from xcft.data.report import LEVEL_WORDS, describe_images
from xcft.data.schema import Conversation, Problem
from xcft.errors import XcftError
from xcft.model.image_processing_xcomposer2 import to_rgb

SUMMARY_HEADERS = [
    "file",
    "samples",
    "usable",
    "drawn/epoch",
    "images",
    "tokens min",
    "tokens median",
    "tokens max",
    "supervised",
    "truncated",
]
PROBLEM_HEADERS = ["level", "file", "line", "sample", "id", "message", "fix", "overall index"]
#: The level filter's choices, as the table words them.
LEVELS = tuple(LEVEL_WORDS[level] for level in check_report.LEVELS)
#: Rows sent to the browser at most; the filter narrows the rest down.
MAX_PROBLEM_ROWS = 500
THUMB_SIDE = 160
#: Histograms drawn at most (one per file); more files are listed as left out.
MAX_HISTOGRAMS = 12


@dataclass
class DataIndex:
    """One checked data set: its summary, problems and samples, addressable by overall index or id."""

    data: str
    result: CheckResult
    offsets: list[int] = field(default_factory=list)  # overall index of each file's first sample

    @property
    def settings(self) -> Settings:
        return self.result.settings

    @property
    def total(self) -> int:
        return sum(len(c) for c in self.result.conversations)

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, sample number in that file) of an overall index, as ``xcft inspect --index`` counts."""
        if not 0 <= index < self.total:
            raise XcftError(f"{self.data}: no sample with index {index} (there are {self.total} samples)")
        for f in range(len(self.offsets) - 1, -1, -1):
            if index >= self.offsets[f]:
                return f, index - self.offsets[f]
        raise AssertionError("unreachable")

    def index_of_id(self, sample_id: str) -> int:
        """The overall index of the first sample with this id (looked up in the tables' id columns)."""
        for f, table in enumerate(self.result.tables):
            hits = table.find_id(sample_id)
            if len(hits):
                return self.offsets[f] + int(hits[0])
        raise XcftError(f"{self.data}: no sample with id {sample_id!r}; check-data lists the samples per file")

    def _file_number(self, display: str) -> int | None:
        for f, report in enumerate(self.result.files):
            if report.display == display:
                return f
        return None

    def overall_index(self, problem: Problem) -> int | None:
        f = self._file_number(problem.file)
        if f is None or problem.index is None:
            return None
        return self.offsets[f] + problem.index


def build_index(
    data: str,
    model_dir: str,
    img_size: int | None,
    max_length: int | None,
    given_num: bool = True,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    hd_num: int | None = None,
) -> DataIndex:
    """Run the check-data pass (raises :class:`XcftError` for a bad model folder or sizes)."""
    if not str(data).strip():
        raise XcftError("no data given; enter the path of a data.txt or a .json/.jsonl file")
    if not str(model_dir).strip():
        raise XcftError("no model folder given; enter a checkpoint folder holding tokenizer.model and config.json")
    settings = load_settings(model_dir.strip(), img_size, max_length, hd_num)
    result = run_check(data.strip(), settings, given_num=given_num, workers=workers, progress=progress)
    offsets, n = [], 0
    for convs in result.conversations:
        offsets.append(n)
        n += len(convs)
    return DataIndex(data.strip(), result, offsets)


# --------------------------------------------------------------------------- summary and problems


def _stats(lengths: list[int]) -> list[Any]:
    """min, median, max of token counts as table cells ("-" when there are none)."""
    st = length_stats(lengths)
    return [("-" if st[k] is None else st[k]) for k in ("min", "median", "max")]


def summary_rows(index: DataIndex) -> list[list[Any]]:
    """One row per file and a total row (the check-data table, split into columns)."""
    rows: list[list[Any]] = []
    for f in index.result.files:
        st = _stats(f.lengths)
        rows.append([f.display, f.samples, f.usable, f.drawn_per_epoch, f.images, *st, f.supervised, f.truncated])
    files = index.result.files
    st = _stats([n for f in files for n in f.lengths])
    rows.append(
        [
            "total",
            sum(f.samples for f in files),
            sum(f.usable for f in files),
            sum(f.drawn_per_epoch for f in files),
            sum(f.images for f in files),
            *st,
            sum(f.supervised for f in files),
            sum(f.truncated for f in files),
        ]
    )
    return rows


def verdict(index: DataIndex) -> str:
    """The check-data closing line, after what was checked (the CLI's wording)."""
    s = index.settings
    notes = "".join(f"note: {n}. " for n in s.notes)
    head = f"{index.total} samples in {len(index.result.files)} file(s); {describe_images(s)}, max_length {s.max_length}. "
    return notes + head + check_report.verdict(index.result)


def problem_rows(
    index: DataIndex, level: str = "all", text: str = "", limit: int = MAX_PROBLEM_ROWS
) -> tuple[list[list[Any]], int]:
    """Problems matching the level and a case-insensitive text filter: (first ``limit`` rows, number matching)."""
    needle = (text or "").strip().lower()
    rows: list[list[Any]] = []
    matching = 0
    for p in index.result.problems:
        if level not in ("", "all", None) and level not in (p.level, LEVEL_WORDS[p.level]):
            continue
        if needle and needle not in f"{p.file} {p.id} {p.message} {p.fix}".lower():
            continue
        matching += 1
        if len(rows) < limit:
            overall = index.overall_index(p)
            rows.append(
                [
                    LEVEL_WORDS[p.level],
                    p.file,
                    "" if p.line is None else p.line,
                    "" if p.index is None else p.index,
                    "" if p.id is None else p.id,
                    p.message,
                    p.fix,
                    "" if overall is None else overall,
                ]
            )
    return rows, matching


# --------------------------------------------------------------------------- one sample


@dataclass
class SampleView:
    index: int
    html: str
    encoded: EncodedSample | None


def sample_view(index: DataIndex, overall: int) -> SampleView:
    """The page's view of one sample: images, the decoded sequence with image slots and trained text marked."""
    f, k = index.locate(overall)
    report = index.result.files[f]
    conv = index.result.conversations[f][k]
    problems = [p for p in index.result.problems if p.file == report.display and p.index == k]
    where = f"{report.display}: sample {k} (overall index {overall})"
    parts = [f'<div class="xcft-sample" data-index="{overall}">']
    if conv is None:
        parts.append(f'<div class="xcft-where">{html.escape(where)}</div>')
        parts.append(_problems_html(problems))
        parts.append(
            '<div class="xcft-note">This sample cannot be read as a conversation, so it is not encoded; '
            "fix the problem above.</div></div>"
        )
        return SampleView(overall, "".join(parts), None)
    s = index.settings
    try:
        enc = encode_for(conv, s)  # as training encodes it (2.5: crop grids from the image headers)
    except Exception as exc:  # an image that cannot be read or tiled: its problem says why
        parts.append(f'<div class="xcft-where">{html.escape(where)}</div>')
        parts.append(_problems_html(problems))
        parts.append(f'<div class="xcft-note">This sample cannot be encoded: {html.escape(str(exc))}</div></div>')
        return SampleView(overall, "".join(parts), None)
    n_slots = sum(length for _, length in enc.image_spans)
    parts.append(f'<div class="xcft-where">{html.escape(where)}, id <code>{html.escape(repr(conv.id))}</code></div>')
    parts.append(
        '<div class="xcft-counts">'
        f'<span class="xcft-count" data-name="total"><b>{len(enc)}</b> tokens</span>'
        f'<span class="xcft-count" data-name="supervised"><b>{enc.num_supervised}</b> supervised</span>'
        f'<span class="xcft-count" data-name="image_slots"><b>{n_slots}</b> image slots '
        f"({enc.num_images} image(s))</span>"
        + (
            f'<span class="xcft-count xcft-truncated" data-name="untruncated">truncated: <b>{enc.untruncated_length}</b> '
            f"tokens before the cut at max_length {s.max_length}</span>"
            if enc.truncated
            else ""
        )
        + "</div>"
    )
    if problems:
        parts.append(_problems_html(problems))
    if conv.image_prepended:
        parts.append(
            '<div class="xcft-note">One image and no &lt;ImageHere&gt;: the image goes at the start of the first user turn.</div>'
        )
    parts.append(_thumbnails_html(conv, enc))
    parts.append(
        '<div class="xcft-legend"><mark class="xcft-trained">trained tokens</mark> '
        '<span class="xcft-slot">image slots</span> other tokens are context (not trained)</div>'
    )
    parts.append(f'<div class="xcft-seq">{render_sequence_html(enc, s.tokenizer)}</div>')
    if enc.num_supervised == 0:
        parts.append('<div class="xcft-note">No supervised token: training skips this sample.</div>')
    parts.append("</div>")
    return SampleView(overall, "".join(parts), enc)


def render_sequence_html(enc: EncodedSample, tokenizer: Any) -> str:
    """Runs of equal trained-ness decoded together; image slots as labelled blocks; the cut marked."""
    out: list[str] = []
    specials = [
        t
        for t in (
            tokenizer.bos_token,
            tokenizer.eos_token,
            tokenizer.convert_ids_to_tokens(tokenizer.turn_start_id),
            tokenizer.convert_ids_to_tokens(tokenizer.turn_end_id),
        )
        if t
    ]
    for run in sample_runs(enc, tokenizer):
        n = run.end - run.start
        if run.image:
            crops = f"{run.grid[0]}×{run.grid[1]} crops · " if run.grid is not None else ""
            out.append(f'<span class="xcft-slot" data-image="{run.image}">image {run.image} · {crops}{n} slots</span>')
            continue
        text = html.escape(run.text)
        for tok in specials:
            esc = html.escape(tok)
            text = text.replace(esc, f'<span class="xcft-special">{esc}</span>')
        out.append(
            f'<mark class="xcft-trained" data-tokens="{n}">{text}</mark>'
            if run.trained
            else f'<span class="xcft-context" data-tokens="{n}">{text}</span>'
        )
    if enc.truncated:
        dropped = f"; {enc.dropped_images} image(s) after the cut dropped" if enc.dropped_images else ""
        out.append(
            f'<span class="xcft-cut">✂ cut here at {len(enc)} tokens '
            f"({enc.untruncated_length - len(enc)} token(s) dropped{dropped})</span>"
        )
    return "".join(out)


def _problems_html(problems: list[Problem]) -> str:
    if not problems:
        return ""
    items = "".join(
        f'<li class="xcft-problem xcft-{p.level}"><b>{LEVEL_WORDS[p.level].upper()}</b> {html.escape(str(p))}</li>'
        for p in problems
    )
    return f'<ul class="xcft-problems">{items}</ul>'


def _thumbnails_html(conv: Conversation, enc: EncodedSample) -> str:
    return thumbnails_html(conv.images, kept=enc.num_images)


def thumbnails_html(paths: Sequence[str | os.PathLike[str]], kept: int | None = None, side: int = THUMB_SIDE) -> str:
    """The images as thumbnails with their file names; those after the first ``kept`` marked as dropped."""
    if not paths:
        return '<div class="xcft-thumbs xcft-noimage">text only (no image)</div>'
    figs = []
    for n, path in enumerate(paths, start=1):
        dropped = kept is not None and n > kept
        caption = f"{n}: {os.path.basename(str(path))}" + (" (dropped by truncation)" if dropped else "")
        src, why = thumbnail_data_uri(path, side)
        body = (
            f'<img src="{src}" alt="image {n}">'
            if src
            else f'<div class="xcft-broken">cannot decode: {html.escape(why or "")}</div>'
        )
        figs.append(
            f'<figure class="xcft-thumb{" xcft-dropped" if dropped else ""}" title="{html.escape(str(path))}">'
            f"{body}<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return f'<div class="xcft-thumbs">{"".join(figs)}</div>'


def thumbnail_data_uri(path: str | os.PathLike[str], side: int = THUMB_SIDE) -> tuple[str | None, str | None]:
    """A small JPEG of the image as a data: URI (the page needs no file access), or (None, reason)."""
    try:
        with Image.open(Path(path)) as img:
            img.draft("RGB", (side * 2, side * 2))  # JPEG: decode at reduced scale, enough for a thumbnail
            rgb = to_rgb(img)
            rgb.thumbnail((side, side))
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=80)
    except Exception as exc:  # PIL raises many kinds for broken files
        return None, f"{type(exc).__name__}: {exc}"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


# --------------------------------------------------------------------------- histogram


def length_histogram(index: DataIndex) -> Any:
    """A matplotlib Figure: token lengths per file, one panel each on its own scale, max_length marked."""
    from matplotlib.figure import Figure  # lazy: only for the histogram, slow to import

    files = [f for f in index.result.files if f.lengths][:MAX_HISTOGRAMS]
    n = max(1, len(files))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.4 * cols, 0.6 + 2.6 * rows), dpi=90)
    max_length = index.settings.max_length
    left_out = len([f for f in index.result.files if f.lengths]) - len(files)
    caption = "token lengths per file (image slots included; dashed: max_length)"
    fig.suptitle(caption + (f"; first {len(files)} files shown ({left_out} more)" if left_out > 0 else ""), fontsize=10)
    if not files:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no usable sample", ha="center", va="center")
        ax.set_axis_off()
    for k, f in enumerate(files):
        ax = fig.add_subplot(rows, cols, k + 1)
        # each file on its own scale (short files keep their shape); max_length drawn when it is near
        lo, hi = min(f.lengths), max(f.lengths)
        width = max(1.0, (hi - lo + 1) / 40)  # at most 40 bars, never narrower than one token
        edges = [lo - 0.5 + j * width for j in range(41) if lo - 0.5 + j * width < hi + 0.5] + [hi + 0.5]
        ax.hist(f.lengths, bins=edges, color="#4c78a8", edgecolor="white", linewidth=0.6)
        pad = max(1.0, 0.08 * (hi - lo))
        left, right = max(0.0, lo - pad), hi + pad
        if max_length <= hi + 0.5 * (hi - lo) + 2 * pad:
            right = max(right, max_length + pad)
            ax.axvline(max_length, color="#e45756", linestyle="--", linewidth=1)
        ax.set_xlim(left, right)
        ax.set_title(f"{_wrap(f.display)} ({len(f.lengths)})", fontsize=8)
        ax.set_xlabel("tokens", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _wrap(name: str, width: int = 42) -> str:
    """A file name over lines of at most ``width`` characters (whole, not cut)."""
    return "\n".join(name[i : i + width] for i in range(0, len(name), width)) or name
