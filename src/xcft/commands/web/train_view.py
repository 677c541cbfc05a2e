"""The Train tab's views of a run: status block, loss figure, log, which buttons apply, the form it was started with.

Plain values only (HTML strings, a matplotlib figure, lists of form values); the page wiring lives
in :mod:`xcft.commands.web.train_tab`.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xcft.commands.web.train_form as train_form
import xcft.commands.web.ui as ui
from xcft.commands.web.runs import RunManager, RunStatus
from xcft.train import plots


def status_html(st: RunStatus | None) -> str:
    """The run's state, progress, losses and checkpoints (``data-*`` attributes for tests and scripts)."""
    if st is None:
        return '<div class="xcft-run xcft-status" data-state="none">no run yet: fill the form and press Start</div>'
    pct = f'<progress value="{st.step}" max="{max(st.max_steps, 1)}"></progress>' if st.max_steps else ""
    eta = f" · ETA {duration(st.eta_s)}" if st.eta_s is not None and st.active else ""
    steps = f"step {st.step} / {st.max_steps}{eta}" if st.max_steps else "waiting for the first step"
    last = f", last {st.loss[-1][1]:.4f}" if st.loss else ""
    ev = (
        f' · <span class="xcft-eval-points" data-n="{len(st.eval_loss)}">{len(st.eval_loss)} eval point(s)</span>'
        if st.eval_loss
        else ""
    )
    if st.sources:
        ev += f' · <span class="xcft-source-curves" data-n="{len(st.sources)}">{len(st.sources)} per-file curve(s)</span>'
    kind = {"failed": " xcft-error", "ended": " xcft-error", "finished": " xcft-ok"}.get(st.state, "")
    checkpoints = f" · checkpoints: {', '.join(html.escape(Path(c).name) for c in st.checkpoints)}" if st.checkpoints else ""
    return (
        f'<div class="xcft-run xcft-status{kind}" data-state="{st.state}" data-run="{html.escape(st.run_id)}">'
        f'<div><b class="xcft-run-state">{st.state}</b> — <span class="xcft-run-message">{html.escape(st.message)}</span></div>'
        f"{pct}<div>{steps} · "
        f'<span class="xcft-loss-points" data-n="{len(st.loss)}">{len(st.loss)} loss point(s){last}</span>{ev}</div>'
        f"<div>output: <code>{html.escape(st.output_dir)}</code>{checkpoints}</div></div>"
    )


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def loss_figure(st: RunStatus | None) -> Any:
    """The run's loss curve (the drawing of ``xcft train``'s loss.png)."""
    if st is None:
        return plots.loss_figure([], [], size=(7, 3.2))
    return plots.loss_figure(st.loss, st.eval_loss, sources=st.sources, metrics=st.metrics, size=(7, 3.2))


@dataclass(frozen=True)
class RunView:
    """Everything the Train tab shows about the selected run, and a key that changes when the plot must."""

    status: str
    log: str
    can_stop: bool
    can_resume: bool
    plot_key: tuple[Any, ...]
    run: RunStatus | None = None


def run_view(runs: RunManager, run_id: str | None) -> RunView:
    """The view of ``run_id`` (None: no run selected); an unreadable run shows its error."""
    if not run_id:
        return RunView(status_html(None), ui.log_html(""), False, False, ())
    try:
        st = runs.status(run_id)
    except Exception as exc:
        return RunView(ui.error(exc), ui.log_html(""), False, False, (run_id, "error"))
    curves = sum(len(v) for v in st.sources.values()) + sum(len(v) for v in st.metrics.values())
    key = (run_id, len(st.loss), len(st.eval_loss), curves, st.state)
    return RunView(status_html(st), ui.log_html(runs.log_tail(run_id)), st.active, st.can_resume, key, st)


def suggest_output_dir(workdir: Path, runs: RunManager) -> str:
    """A new folder under ``WORKDIR/output`` named by the time, not used by any folder or run yet."""
    taken = {Path(runs.output_dir(r)) for r in runs.run_ids()}
    stem = workdir.resolve() / "output" / time.strftime("%Y%m%d-%H%M%S")
    candidate, n = stem, 1
    while candidate.exists() or candidate in taken:
        n += 1
        candidate = stem.with_name(f"{stem.name}-{n}")
    return str(candidate)


def form_of_run(runs: RunManager, run_id: str, fields: Sequence[train_form.FormField]) -> list[Any]:
    """The form values the run was started with (its recorded ``xcft train`` arguments)."""
    return train_form.values_from_argv(fields, runs.argv(run_id))
