"""The Data tab: one check-data pass (summary, histogram, problems) and the sample view.

The handlers return named results (:class:`DataCheck`, :class:`SampleNav`); :func:`build` lays the
tab out and maps each result field to its component by name.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import gradio as gr

import xcft.commands.web.data_view as data_view
import xcft.commands.web.ui as ui
from xcft.errors import XcftError

#: Share of the progress bar per phase of the check-data pass.
PHASES = {"reading": (0.0, 0.1), "images": (0.1, 0.5), "encoding": (0.5, 1.0)}


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "" or int(value) <= 0:
        return None
    return int(value)


@dataclass
class DataCheck:
    """What one press of *Check* shows."""

    status: str
    summary: Any = None
    histogram: Any = None
    problems: Any = None
    count: str = ""
    index: data_view.DataIndex | None = None
    sample: str = ""
    sample_index: int | None = None
    nav: str = ""


def check(
    data: str,
    model: str,
    img_size: Any = 0,
    max_length: Any = 0,
    given_num: bool = True,
    level: str = "all",
    text: str = "",
    hd_num: Any = 0,
    progress: Callable[..., Any] | None = None,
) -> DataCheck:
    """The one check-data pass; a user error is the status line, in the page's words."""

    def report(phase: str, done: int, total: int) -> None:
        if progress is not None:
            lo, hi = PHASES.get(phase, (0.0, 1.0))
            progress(lo + (hi - lo) * (done / max(total, 1)), desc=f"{phase} {done}/{total}")

    try:
        start = time.perf_counter()
        index = data_view.build_index(
            data,
            model,
            _int_or_none(img_size),
            _int_or_none(max_length),
            bool(given_num),
            progress=report,
            hd_num=_int_or_none(hd_num),
        )
        took = time.perf_counter() - start
    except Exception as exc:
        return DataCheck(ui.error(exc, ui.DATA_FIELDS))
    if index.result.spec is None:  # the data path itself is wrong: its problem is the message
        first = index.result.problems[0] if index.result.problems else None
        return DataCheck(ui.status(ui.in_page_terms(str(first), ui.DATA_FIELDS) if first else "no data", "error"))
    kind = "ok" if index.result.ok else "error"
    status = (
        f'<div class="xcft-status xcft-{kind}" data-samples="{index.total}" data-seconds="{took:.2f}">'
        f"{html.escape(ui.in_page_terms(data_view.verdict(index), ui.DATA_FIELDS))} (checked in {took:.1f} s)</div>"
    )
    rows, matching = data_view.problem_rows(index, level, text)
    return DataCheck(
        status,
        summary=ui.table_frame(data_view.summary_rows(index), data_view.SUMMARY_HEADERS),
        histogram=data_view.length_histogram(index),
        problems=ui.table_frame(rows, data_view.PROBLEM_HEADERS),
        count=_problem_count(len(rows), matching),
        index=index,
        sample=_view_html(index, 0) if index.total else "",
        sample_index=0 if index.total else None,
    )


def _problem_count(shown: int, matching: int) -> str:
    if matching == 0:
        return "no problem matches"
    if shown < matching:
        return f"{matching} problem(s) match; the first {shown} are listed (narrow the filter to see others)"
    return f"{matching} problem(s)"


def filter_problems(index: data_view.DataIndex | None, level: str, text: str) -> tuple[Any, str]:
    if index is None:
        return None, ""
    rows, matching = data_view.problem_rows(index, level, text)
    return ui.table_frame(rows, data_view.PROBLEM_HEADERS), _problem_count(len(rows), matching)


def _view_html(index: data_view.DataIndex, overall: int) -> str:
    try:
        return data_view.sample_view(index, overall).html
    except Exception as exc:
        return ui.error(exc)


@dataclass
class SampleNav:
    """The sample view after a move: its HTML (None: unchanged), the index box, a note about the move."""

    sample: str | None
    index: Any
    nav: str = ""


def show_sample(index: data_view.DataIndex | None, overall: Any, sample_id: str = "", step: int = 0) -> SampleNav:
    """The sample at an overall index (moved by ``step``) or, when given, an id; out of range is said, not clamped."""
    if index is None:
        return SampleNav(None, overall, ui.status("check a data set first (press Check)", "error"))
    try:
        if sample_id and sample_id.strip():
            target = index.index_of_id(sample_id.strip())
        else:
            if overall is None or overall == "":
                raise XcftError("enter a sample index or id")
            target = int(overall) + step
            last = index.total - 1
            if step > 0 and target > last:
                return SampleNav(None, overall, ui.status(f"this is the last sample (index {last})"))
            if step < 0 and target < 0:
                return SampleNav(None, overall, ui.status("this is the first sample (index 0)"))
            if not 0 <= target <= last:
                raise XcftError(f"no sample with index {target}: the indexes go from 0 to {last}")
        return SampleNav(data_view.sample_view(index, target).html, target)
    except Exception as exc:
        return SampleNav(None, overall, ui.error(exc))


def _problem_sample(index: data_view.DataIndex | None, evt: gr.SelectData) -> SampleNav:
    row = evt.row_value or []
    overall = row[-1] if row else None
    if overall in (None, ""):
        return SampleNav(None, gr.skip(), ui.status("this problem concerns the whole file (or a data.txt line), not one sample"))
    return show_sample(index, int(overall))


@dataclass
class DataTab:
    """The Data tab's components other tabs read."""

    data: Any
    model: Any
    checked: Any  # the event of a finished check (for .then)


def build() -> DataTab:
    """Lay out the Data tab and wire it (inside a ``gr.Tab``)."""
    with gr.Row():
        d_data = gr.Textbox(label="data.txt or .json/.jsonl", placeholder="/path/to/data.txt", scale=3, elem_id="data-path")
        d_model = gr.Textbox(label="model folder (tokenizer, img_size, max_length)", scale=3, elem_id="data-model")
        d_img = gr.Number(label="img_size (0: the model's)", value=0, precision=0, scale=1, elem_id="data-img-size")
        d_max = gr.Number(label="max_length (0: the model's)", value=0, precision=0, scale=1, elem_id="data-max-length")
        d_hd = gr.Number(label="hd_num (2.5 models; 0: the default)", value=0, precision=0, scale=1, elem_id="data-hd-num")
        d_given = gr.Checkbox(label="given_num (numbers are thousands)", value=True, scale=1)
    d_check = gr.Button("Check", variant="primary", elem_id="data-check")
    c: dict[str, Any] = {}  # one component per DataCheck field, by the field's name
    c["status"] = gr.HTML(elem_id="data-status")
    c["summary"] = gr.Dataframe(
        headers=data_view.SUMMARY_HEADERS,
        label="summary per file (check-data)",
        interactive=False,
        elem_id="data-summary",
        wrap=True,
        column_widths=["28%", *(["8%"] * 9)],
    )
    c["histogram"] = gr.Plot(show_label=False, format="png", elem_id="data-hist")
    with gr.Row():
        d_level = gr.Dropdown(["all", *data_view.LEVELS], value="all", label="level", scale=1, elem_id="problems-level")
        d_filter = gr.Textbox(label="filter (file, id or text)", scale=3, elem_id="problems-filter")
    c["count"] = gr.Markdown(elem_id="problems-count")
    c["problems"] = gr.Dataframe(
        headers=data_view.PROBLEM_HEADERS,
        label="problems (click a row to open its sample)",
        interactive=False,
        elem_id="data-problems",
        wrap=True,
        max_height=360,
        column_widths=["7%", "16%", "5%", "6%", "8%", "30%", "21%", "7%"],
    )
    with gr.Row():
        c["sample_index"] = gr.Number(
            label="sample index (overall, data.txt order)", value=None, precision=0, elem_id="sample-index"
        )
        d_id = gr.Textbox(label="or sample id", elem_id="sample-id")
        d_show = gr.Button("Show", elem_id="sample-show")
        d_prev = gr.Button("◀ Previous", elem_id="sample-prev")
        d_next = gr.Button("Next ▶", elem_id="sample-next")
    c["nav"] = gr.HTML(elem_id="sample-nav")
    c["sample"] = gr.HTML(elem_id="sample-view")
    c["index"] = gr.State(None)
    assert set(c) == {f.name for f in fields(DataCheck)}, "every result field has its component"

    def on_check(data, model, img, max_len, given, level, text, hd, progress=gr.Progress()):  # noqa: B008
        view = check(data, model, img, max_len, given, level, text, hd, progress)
        # a fresh mark on every answer, so the page (and a test) can tell a new result from the last one
        view.status = f'<div class="xcft-check" data-done="{time.time():.6f}">{view.status}</div>'
        return {comp: getattr(view, name) for name, comp in c.items()}

    inputs = [d_data, d_model, d_img, d_max, d_given, d_level, d_filter, d_hd]
    # the progress bar goes over the status line only, not over every output
    checked = gr.on(
        [d_check.click, d_data.submit],
        on_check,
        inputs,
        list(c.values()),
        concurrency_limit=2,
        show_progress_on=[c["status"]],
    )
    gr.on(
        [d_level.change, d_filter.submit, d_filter.blur],
        filter_problems,
        [c["index"], d_level, d_filter],
        [c["problems"], c["count"]],
    )

    nav_outputs = [c["sample"], c["sample_index"], c["nav"]]

    def nav(view: SampleNav) -> tuple[Any, Any, str]:
        return (gr.skip() if view.sample is None else view.sample), view.index, view.nav

    state = [c["index"], c["sample_index"]]
    gr.on([d_show.click, d_id.submit], lambda s, i, sid: nav(show_sample(s, i, sid)), [*state, d_id], nav_outputs)
    c["sample_index"].submit(lambda s, i: nav(show_sample(s, i)), state, nav_outputs)
    d_prev.click(lambda s, i: nav(show_sample(s, i, step=-1)), state, nav_outputs)
    d_next.click(lambda s, i: nav(show_sample(s, i, step=1)), state, nav_outputs)

    def on_problem(index: data_view.DataIndex | None, evt: gr.SelectData) -> tuple[Any, Any, str]:
        return nav(_problem_sample(index, evt))

    c["problems"].select(on_problem, [c["index"]], nav_outputs)
    return DataTab(d_data, d_model, checked)
