"""The Eval tab: ``xcft predict`` of one or two models on a data set, scored as ``xcft score`` scores.

*Run* starts the predictions as a child process (:class:`~xcft.commands.web.evals.EvalRuns`);
a timer refreshes the selected run's progress and log, and once every model has answered, the
metrics table, the fixed/broken counts and the samples (all, wrong or changed, a page at a time).
Reloading the page selects the newest run and puts the form back to what it was started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

import xcft.commands.web.eval_view as eval_view
import xcft.commands.web.ui as ui
from xcft.commands.options import METRICS_HELP
from xcft.commands.web.evals import EvalRuns, EvalSettings, predict_option
from xcft.errors import XcftError
from xcft.model.template_xcomposer2 import PROMPT_LAYOUTS

REFRESH_S = 1.0
#: The layout choice that passes none: the one the model folder records.
MODEL_LAYOUT = "the model's own"


def _whole(value: Any, name: str) -> int:
    """A number field's value as an int; an empty field is said, not a TypeError."""
    if value is None or value == "":
        raise XcftError(f"{name} is empty; enter a number")
    return int(value)


def _limit(value: Any) -> int | None:
    """The limit field: empty or 0 (what an emptied number field sends) is every sample."""
    return None if value is None or value == "" or int(value) == 0 else int(value)


def run(runs: EvalRuns, data: str, model_1: str, model_2: str, max_new: Any, batch: Any, metrics: str, layout: str, limit: Any):
    """Start an eval from the form: (status line, the new run's id or None)."""
    try:
        settings = EvalSettings(
            data or "",
            (model_1 or "", model_2 or ""),
            _whole(max_new, "max new tokens"),
            _whole(batch, "batch size"),
            metrics or "",
            None if layout in (None, "", MODEL_LAYOUT) else layout,
            _limit(limit),
        )
        run_id, problems = runs.start(settings)
    except Exception as exc:
        return ui.error(exc, ui.EVAL_FIELDS), None
    errors = [p for p in problems if p.level == "error"]
    left_out = f"; {len(errors)} sample(s) left out: {errors[0]}" + (" ..." if len(errors) > 1 else "") if errors else ""
    return ui.status(f"started eval {run_id}{left_out}", "ok"), run_id


def stop(runs: EvalRuns, run_id: str | None) -> str:
    if not run_id:
        return ui.status("no eval selected", "error")
    try:
        return ui.status(runs.stop(run_id), "ok")
    except Exception as exc:
        return ui.error(exc)


def continue_run(runs: EvalRuns, run_id: str | None) -> str:
    if not run_id:
        return ui.status("no eval selected", "error")
    try:
        runs.continue_run(run_id)
    except Exception as exc:
        return ui.error(exc)
    return ui.status(f"continuing eval {run_id}: each model answers the samples it has not answered yet", "ok")


def form_of_run(runs: EvalRuns, run_id: str) -> list[Any]:
    """The form values the run was started with: data, the two models, max new tokens, batch, metrics, layout, limit."""
    s = runs.settings(run_id)
    models = [*s.models, ""][:2]
    return [s.data, *models, s.max_new_tokens, s.batch_size, s.metrics, s.layout or MODEL_LAYOUT, s.limit]


def _number(name: str, label: str, elem: str, **kw: Any) -> Any:
    f = predict_option(name)
    return gr.Number(
        value=f.default if isinstance(f.default, int) else None,
        precision=0,
        label=label,
        info=f.metadata["help"],
        elem_id=elem,
        **kw,
    )


@dataclass
class EvalTab:
    """The Eval tab's components other tabs fill."""

    data: Any
    model: Any  # model 1


def build(runs: EvalRuns, page: gr.Blocks) -> EvalTab:
    """Lay out the Eval tab and wire it (inside a ``gr.Tab``)."""
    gr.Markdown(
        "Answer every sample of a data set with one model, or with two to compare them (e.g. the base model and "
        "a finetune or LoRA adapter): one `xcft predict` per model, scored as `xcft score` scores."
    )
    with gr.Row():
        e_data = gr.Textbox(label="data", info=predict_option("data").metadata["help"], elem_id="eval-data")
        e_model_1 = gr.Textbox(label="model 1", info=predict_option("model_dir").metadata["help"], elem_id="eval-model-1")
        e_model_2 = gr.Textbox(
            label="model 2 (optional)",
            info="a second model, compared with model 1 (e.g. the finetune of a base)",
            elem_id="eval-model-2",
        )
    with gr.Row():
        e_max = _number("max_new_tokens", "max new tokens", "eval-max-new-tokens")
        e_batch = _number("batch_size", "batch size", "eval-batch-size")
        e_metrics = gr.Textbox(label="metrics (empty: all)", info=METRICS_HELP, elem_id="eval-metrics")
        e_layout = gr.Dropdown(
            [MODEL_LAYOUT, *PROMPT_LAYOUTS],
            value=MODEL_LAYOUT,
            label="prompt layout",
            info=predict_option("layout").metadata["help"],
            elem_id="eval-layout",
        )
        e_limit = _number("limit", "limit (empty or 0: every sample)", "eval-limit")
    form = [e_data, e_model_1, e_model_2, e_max, e_batch, e_metrics, e_layout, e_limit]
    with gr.Row():
        e_run = gr.Button("Run", variant="primary", elem_id="eval-run")
        e_stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="eval-stop")
        e_continue = gr.Button("Continue", interactive=False, elem_id="eval-continue")
        e_sel = gr.Dropdown([], label="eval", value=None, allow_custom_value=True, elem_id="eval-id", scale=2)
    e_action = gr.HTML(elem_id="eval-action")
    e_status = gr.HTML(eval_view.status_html(None), elem_id="eval-status")
    e_changes = gr.HTML(elem_id="eval-changes")
    e_table = gr.Dataframe(
        headers=["source", "n"], label="scores (xcft score)", interactive=False, wrap=True, elem_id="eval-table"
    )
    with gr.Row():
        e_filter = gr.Radio(
            list(eval_view.FILTERS),
            value="all",
            label="samples (wrong: the last model's answer; changed: fixed or broken)",
            elem_id="eval-filter",
            scale=3,
        )
        e_page = gr.Number(value=1, precision=0, minimum=1, label="page", elem_id="eval-page", scale=1)
    e_samples = gr.HTML(elem_id="eval-samples")
    e_log = gr.HTML(ui.log_html(""), elem_id="eval-log")
    e_key = gr.State(None)  # what the results show: redrawn only when it changes
    e_timer = gr.Timer(REFRESH_S)
    quiet: dict[str, Any] = {"show_progress": "hidden"}

    result_outputs = [e_table, e_changes, e_samples]

    def results(run_id, which, page_no):
        r = eval_view.results_view(runs, run_id, which or "all", int(page_no or 1))
        return ui.table_frame(r.rows, r.header), r.changes, r.samples

    def refresh(run_id, last_key, which, page_no):
        view = eval_view.eval_view(runs, run_id)
        buttons = gr.update(interactive=view.can_stop), gr.update(interactive=view.can_continue)
        shown = results(run_id, which, page_no) if view.key != last_key else [gr.skip()] * len(result_outputs)
        return view.status, view.log, view.key, *buttons, *shown

    view_outputs = [e_status, e_log, e_key, e_stop, e_continue, *result_outputs]
    e_timer.tick(refresh, [e_sel, e_key, e_filter, e_page], view_outputs, **quiet)

    def on_run(*values):
        message, run_id = run(runs, *values)
        return message, (gr.update(choices=runs.run_ids(), value=run_id) if run_id else gr.skip())

    e_run.click(on_run, form, [e_action, e_sel])
    e_stop.click(lambda r: stop(runs, r), [e_sel], [e_action])
    e_continue.click(lambda r: continue_run(runs, r), [e_sel], [e_action])

    def on_select(run_id, which):
        shown = refresh(run_id, None, which, 1)
        if not run_id:
            return (*shown, 1, *[gr.skip()] * len(form))
        try:
            values = form_of_run(runs, run_id)
        except Exception as exc:
            return (ui.error(exc), *shown[1:], 1, *[gr.skip()] * len(form))
        return (*shown, 1, *values)

    e_sel.change(on_select, [e_sel, e_filter], [*view_outputs, e_page, *form], **quiet)
    e_filter.change(lambda r, w: (*results(r, w, 1), 1), [e_sel, e_filter], [*result_outputs, e_page], **quiet)
    gr.on([e_page.submit, e_page.blur], results, [e_sel, e_filter, e_page], result_outputs, **quiet)

    def on_page_load():
        ids = runs.run_ids()
        return gr.update(choices=ids, value=ids[0] if ids else None)

    page.load(on_page_load, None, [e_sel], **quiet)
    return EvalTab(e_data, e_model_1)
