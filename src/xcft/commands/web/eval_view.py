"""The Eval tab's views of a run: status block, the metrics table, fixed/broken counts, and the samples.

Plain values only (HTML strings, table rows); the page wiring lives in
:mod:`xcft.commands.web.eval_tab`. The table's cells are ``xcft score``'s (the same rows its text
output prints, :func:`xcft.commands.score.scores_rows` / :func:`~xcft.commands.score.comparison_rows`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xcft.commands.web.ui as ui
from xcft.commands.score import comparison_rows, scores_rows
from xcft.commands.web.data_view import thumbnails_html
from xcft.commands.web.evals import EvalRuns, EvalStatus
from xcft.train.answer_metrics import Comparison, Scores
from xcft.train.predict import PromptSample

#: Which samples the sample view shows: every one, those the (last) model answered wrong, those whose verdict changed.
FILTERS = ("all", "wrong", "changed")
PAGE_SIZE = 20
EVAL_THUMB_SIDE = 96


def model_label(k: int, path: str) -> str:
    """How the page names the run's ``k``-th model (from 0): its number and folder name."""
    return f"{k + 1}: {Path(path).name}"


def status_html(st: EvalStatus | None) -> str:
    """The run's state and each model's progress (``data-*`` attributes for tests and scripts)."""
    if st is None:
        return '<div class="xcft-run xcft-status" data-state="none">no eval yet: fill in the data and a model, press Run</div>'
    kind = {"failed": " xcft-error", "ended": " xcft-error", "finished": " xcft-ok"}.get(st.state, "")
    models = []
    for k, (path, done) in enumerate(zip(st.settings.models, st.done)):
        models.append(
            f'<div class="xcft-eval-model" data-model="{k + 1}" data-done="{done}" data-total="{st.total}">'
            f"model {html.escape(model_label(k, path))}: {done} / {st.total} "
            f'<progress value="{done}" max="{max(st.total, 1)}"></progress> <code>{html.escape(path)}</code></div>'
        )
    skipped = f" ({st.skipped} sample(s) of the data left out: see the log)" if st.skipped else ""
    return (
        f'<div class="xcft-run xcft-status{kind}" data-state="{st.state}" data-run="{html.escape(st.run_id)}" '
        f'data-n="{sum(st.done)}" data-total="{st.total * len(st.done)}">'
        f'<div><b class="xcft-run-state">{st.state}</b> — <span class="xcft-run-message">{html.escape(st.message)}</span></div>'
        f"{''.join(models)}<div>data: <code>{html.escape(st.settings.data)}</code>, {st.total} sample(s){skipped}</div></div>"
    )


def metrics_table(result: Scores | Comparison | None) -> tuple[list[str], list[list[str]]]:
    """``xcft score``'s table: one row per data file and ``overall``; two models: each metric's two columns and the delta."""
    if result is None:
        return ["source", "n"], []
    if isinstance(result, Scores):
        return ["source", "n", *result.metrics], scores_rows(result)
    header = ["source", "n"]
    for m in result.after.metrics:  # the models by number, as the status and the samples name them
        header += [f"{m} 1", f"{m} 2", f"{m} Δ"]
    rows = [[group, n, *(c for cells3 in cells for c in cells3)] for group, n, cells in comparison_rows(result)]
    return header, rows


def changes_html(result: Scores | Comparison | None) -> str:
    """Which metric decides right and wrong, the failed samples, and (two models) how many were fixed and broken."""
    if result is None:
        return ""
    scores = result.after if isinstance(result, Comparison) else result
    if scores.primary is None:
        return ui.status("no verdict metric (exact, contains, first_word, choice) asked: no answer is right or wrong")
    text = (
        f'<span class="xcft-failed" data-n="{len(scores.failed)}">wrong by {scores.primary}: <b>{len(scores.failed)}</b></span>'
    )
    if isinstance(result, Comparison):
        text += (
            f' · <span class="xcft-fixed" data-n="{len(result.fixed)}">fixed (wrong → right): <b>{len(result.fixed)}</b></span>'
            f' · <span class="xcft-broken-n" data-n="{len(result.broken)}">broken (right → wrong): <b>{len(result.broken)}</b></span>'
        )
        if result.only_before or result.only_after:
            text += f" · compared on the samples both files hold ({result.only_before} only in 1, {result.only_after} only in 2)"
    if scores.unscored:
        text += f" · {scores.unscored} sample(s) without a reference not scored"
    return f'<div class="xcft-status xcft-counts">{text}</div>'


@dataclass
class EvalRow:
    """One sample of the run: what was asked, the reference, each model's answer and verdict."""

    source: str
    id: str
    index: int | None
    question: str
    reference: str | None
    answers: list[str | None] = field(default_factory=list)
    passed: list[bool | None] = field(default_factory=list)
    change: str | None = None  # "fixed" or "broken"


def sample_rows(predictions: Sequence[Sequence[dict[str, Any]]], result: Scores | Comparison | None) -> list[EvalRow]:
    """Every sample any model answered, in the first file's order, with each model's verdict by the primary metric."""
    n = len(predictions)
    rows: dict[tuple[str, str], EvalRow] = {}
    for k, lines in enumerate(predictions):
        for line in lines:
            key = (str(line["source"]), str(line["id"]))
            if key not in rows:
                rows[key] = EvalRow(
                    key[0],
                    key[1],
                    line.get("index"),
                    str(line.get("question") or ""),
                    line.get("reference"),
                    [None] * n,
                    [None] * n,
                )
            rows[key].answers[k] = str(line["prediction"])
    if isinstance(result, Comparison):
        scored = [result.before.samples, result.after.samples]
        for change, items in (("fixed", result.fixed), ("broken", result.broken)):
            for c in items:
                rows[(c["source"], c["id"])].change = change
    else:
        scored = [result.samples] if result is not None else []
    for k, samples in enumerate(scored):
        for s in samples:
            row = rows.get((s["source"], s["id"]))
            if row is not None:
                row.passed[k] = s["passed"]
    return list(rows.values())


def filter_rows(rows: Sequence[EvalRow], which: str) -> list[EvalRow]:
    """``all``; ``wrong``: the last model's answer is wrong; ``changed``: the verdict changed between the two models."""
    if which == "wrong":
        return [r for r in rows if r.passed and r.passed[-1] is False]
    if which == "changed":
        return [r for r in rows if r.change]
    return list(rows)


def _answer_html(k: int, model: str, answer: str | None, passed: bool | None) -> str:
    mark, cls = {True: ("right", " xcft-right"), False: ("wrong", " xcft-wrong"), None: ("", "")}[passed]
    if answer is None:
        body = '<span class="xcft-empty-answer">(not answered yet)</span>'
    elif not answer.strip():
        body = '<span class="xcft-empty-answer">(empty answer)</span>'
    else:
        body = html.escape(answer)
    verdict = f' <span class="xcft-verdict">{mark}</span>' if mark else ""
    return (
        f'<div class="xcft-answer{cls}" data-model="{k + 1}" data-passed="{"" if passed is None else str(passed).lower()}">'
        f'<b>{html.escape(model_label(k, model))}</b>{verdict}: <span class="xcft-answer-text">{body}</span></div>'
    )


def sample_html(row: EvalRow, models: Sequence[str], sample: PromptSample | None) -> str:
    """One sample: where it is, its images, the question (and how many turns came before), the reference, the answers."""
    index = sample.index if sample is not None else row.index
    where = f"{row.source}: sample {index} (id {row.id})"
    change = f' <span class="xcft-change xcft-{row.change}">{row.change}</span>' if row.change else ""
    images = (
        thumbnails_html(sample.images, side=EVAL_THUMB_SIDE)
        if sample is not None
        else '<div class="xcft-thumbs">(sample not in the data now)</div>'
    )
    history = f'<div class="xcft-history">after {len(sample.history)} earlier turn(s)</div>' if sample and sample.history else ""
    reference = "(none: not scored)" if row.reference is None else row.reference
    answers = "".join(_answer_html(k, m, a, p) for k, (m, a, p) in enumerate(zip(models, row.answers, row.passed)))
    return (
        f'<div class="xcft-eval-sample" data-id="{html.escape(row.id)}" data-source="{html.escape(row.source)}" '
        f'data-change="{row.change or ""}">{images}<div class="xcft-eval-text">'
        f'<div class="xcft-where">{html.escape(where)}{change}</div>{history}'
        f'<div class="xcft-question"><b>question</b>: {html.escape(row.question)}</div>'
        f'<div class="xcft-reference"><b>reference</b>: {html.escape(reference)}</div>{answers}</div></div>'
    )


def samples_html(
    rows: Sequence[EvalRow], models: Sequence[str], samples: dict[tuple[str, str], PromptSample], page: int = 1
) -> tuple[str, int]:
    """One page of the samples (``page`` from 1, clamped); (HTML, number of pages)."""
    pages = max(1, -(-len(rows) // PAGE_SIZE))
    page = min(max(1, int(page or 1)), pages)
    shown = rows[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    head = (
        f'<div class="xcft-eval-page" data-n="{len(rows)}" data-page="{page}" data-pages="{pages}">'
        f"{len(rows)} sample(s)" + (f" · page {page} of {pages}" if pages > 1 else "") + "</div>"
    )
    body = "".join(sample_html(r, models, samples.get((r.source, r.id))) for r in shown)
    return f'<div class="xcft-sample xcft-eval-samples">{head}{body}</div>', pages


@dataclass(frozen=True)
class EvalView:
    """Everything the Eval tab shows about the selected run, and a key that changes when the results must be redrawn."""

    status: str
    log: str
    can_stop: bool
    can_continue: bool
    key: tuple[Any, ...]
    run: EvalStatus | None = None


def eval_view(runs: EvalRuns, run_id: str | None) -> EvalView:
    """The status and log of ``run_id`` (None: no run selected); an unreadable run shows its error."""
    if not run_id:
        return EvalView(status_html(None), ui.log_html(""), False, False, ())
    try:
        st = runs.status(run_id)
    except Exception as exc:
        return EvalView(ui.error(exc), ui.log_html(""), False, False, (run_id, "error"))
    return EvalView(
        status_html(st), ui.log_html(runs.log_tail(run_id)), st.active, st.can_continue, (run_id, st.state, *st.done), st
    )


@dataclass(frozen=True)
class Results:
    """The results part of the tab: the table, the counts and one page of samples."""

    header: list[str]
    rows: list[list[str]]
    changes: str
    samples: str
    pages: int = 1


def results_view(runs: EvalRuns, run_id: str | None, which: str = "all", page: int = 1) -> Results:
    """The metrics table, the fixed/broken counts and the filtered samples of a run that is not writing."""
    empty = Results(["source", "n"], [], "", "", 1)
    if not run_id:
        return empty
    try:
        result = runs.results(run_id)
        if result is None:
            st = runs.status(run_id)
            why = "predicting: the scores come when every model has answered" if st.active else "no answers to score"
            return Results(["source", "n"], [], ui.status(why), "", 1)
        settings = runs.settings(run_id)
        header, rows = metrics_table(result)
        shown = filter_rows(sample_rows(runs.predictions(run_id), result), which)
        html_, pages = samples_html(shown, settings.models, runs.prompt_samples(run_id), page)
        return Results(header, rows, changes_html(result), html_, pages)
    except Exception as exc:
        return Results(["source", "n"], [], ui.error(exc), "", 1)
